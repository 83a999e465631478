"""Building blocks adapters share: a norm followed by an adapter, a grouped linear layer."""

import torch
from einops import rearrange
from torch import nn


class AdaptedNorm(nn.Module):
    """``adapter(norm(x))``, installed in place of a block's norm so the block's own forward runs unchanged."""

    def __init__(self, norm: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.adapter = adapter

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
