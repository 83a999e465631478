"""Building blocks adapters share: wrappers around a backbone's own modules, a zero-init gate, a grouped linear.

A wrapper keeps the backbone module it wraps as a child and says which (``WrapsModule``), so fingerprints, merges
and train mode can see through it to the bare backbone.
"""

from typing import Literal

import torch
from einops import rearrange
from torch import nn
from torch.func import functional_call


class AdaptedNorm(nn.Module):
    """``adapter(norm(x))``, installed in place of a block's norm so the block's own forward runs unchanged."""

    def __init__(self, norm: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.adapter = adapter

    def wrapped_module(self) -> nn.Module:
        return self.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.norm(x))


class GroupedLinear(nn.Module):
    """``Conv1d(in, out, kernel_size=1, groups=g)`` on the last axis: group i maps in/g inputs to out/g outputs.

    The weight keeps the conv's layout ``(out, in/g)`` so LaVIN checkpoints map onto it one to one.
    """

    def __init__(self, in_features: int, out_features: int, groups: int) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"features {in_features}->{out_features} do not split into {groups} groups")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "... (g i) -> ... g i", g=self.groups)
        weight = rearrange(self.weight, "(g o) i -> g o i", g=self.groups)
        y = torch.einsum("...gi,goi->...go", x, weight)
        return rearrange(y, "... g o -> ... (g o)") + self.bias


class ZeroInitGate(nn.Module):
    """A learned gate that starts closed, so the branch it scales is a no-op at init (METHODS.md section 4).

    ``tanh`` gates are ``tanh(g)`` (LLaMA-Adapter's zero-init attention), ``linear`` gates are ``g`` itself (peft's
    adaption prompt); ``g`` has ``size`` entries, e.g. one per attention head, and starts at 0.
    """

    part = "gates"

    def __init__(self, size: int, kind: Literal["tanh", "linear"] = "tanh", train_source: str | None = None) -> None:
        super().__init__()
        if kind not in ("tanh", "linear"):
            raise ValueError(f"gate kind must be 'tanh' or 'linear', got {kind!r}")
        self.kind = kind
        self.train_source = train_source
        self.weight = nn.Parameter(torch.zeros(size))

    def adapter_params(self) -> list[str]:
        return ["weight"]

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.weight) if self.kind == "tanh" else self.weight


class BiasScaleLinear(nn.Module):
    """``s * (base(x) + b)`` with a per-output-feature bias ``b = 0`` and scale ``s = 1`` (LLaMA-Adapter V2, Eq. 1).

    ``base`` is any frozen linear layer with ``out_features``: ``nn.Linear`` or a bitsandbytes 4-/8-bit one.
    """

    part = "bias/scale"

    def __init__(self, base: nn.Module, train_source: str | None = None) -> None:
        super().__init__()
        self.base = base
        self.train_source = train_source
        device = next(base.parameters()).device
        self.bias = nn.Parameter(torch.zeros(base.out_features, device=device))
        self.scale = nn.Parameter(torch.ones(base.out_features, device=device))

    def adapter_params(self) -> list[str]:
        return ["bias", "scale"]

    def wrapped_module(self) -> nn.Module:
        return self.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        scale = self.scale.to(y.dtype)
        return torch.addcmul(self.bias.to(y.dtype) * scale, y, scale)


class TunedNorm(nn.Module):
    """A norm whose weight trains as ``w + delta`` (``delta = 0`` at init): the same updates as tuning ``w``
    itself, while the backbone's own tensor stays frozen and untouched."""

    part = "norms"

    def __init__(self, norm: nn.Module, train_source: str | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.train_source = train_source
        self.delta = nn.Parameter(torch.zeros_like(norm.weight, dtype=torch.float32))

    def adapter_params(self) -> list[str]:
        return ["delta"]

    def wrapped_module(self) -> nn.Module:
        return self.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Summed in fp32, then stored as the norm stores its weight (as mixed precision rounds any weight for
        # compute): an fp32 weight would promote the norm's whole output to fp32, a full-width pass to undo.
        weight = (self.norm.weight.float() + self.delta).to(self.norm.weight.dtype)
        return functional_call(self.norm, {"weight": weight}, (x,))


def biased_linear(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A plain linear layer with ``weight`` and ``bias`` (merge folds), stored where and as ``linear`` stores its
    weight."""
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True, device="meta")
    folded.weight = nn.Parameter(weight.to(linear.weight), requires_grad=False)
    folded.bias = nn.Parameter(bias.to(linear.weight), requires_grad=False)
    return folded
