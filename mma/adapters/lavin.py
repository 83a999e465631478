"""LaVIN's Mixture-of-Modality Adaptation (MMA), arXiv 2305.15023.

Per block a linear adapter with a shared down-projection and two grouped, zero-initialised up-projections mixed by
a softmax router. It sits on the output of the pre-attention norm of every LLM and ViT block. LLM routers read the
normed hidden state of the modality token at position 0, so each sample is routed by its modality; ViT routers
read each image's own class token, or, in a ViT without one (SigLIP), the mean of its tokens.

The adapter is linear, so for a fixed modality it folds into the next linear layers (``fold_lavin``): with ``n``
the normed input, ``h = A n + a`` and the routed up-projection ``[M; c]``::

    adapter(n) = n + M^T (A n + a) + c = P n + b,   P = I + M^T A,   b = M^T a + c
    q = W_q adapter(n) = (W_q P) n + W_q b          (the same for k and v)

LLaMA's projections have no bias, so the merged config sets ``attention_bias=True`` (o_proj gets a zero bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mma.adapters.base import AdapterSettings, register_adapter, register_fold
from mma.adapters.layers import AdaptedNorm, GroupedLinear, biased_linear
from mma.errors import ConfigError
from mma.layout import MODALITY_SLOT, SequenceLayout

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mma.model import VisionLanguageModel


@dataclass
class LaVIN(AdapterSettings):
    """LaVIN's Mixture-of-Modality Adaptation (7B defaults).

    Args:
        hidden: width of the shared down-projection.
        groups: groups of each up-projection.
        temperature: router softmax temperature (LaVIN: 10 for 7B, 5 for 13B).
        dropout: dropout on the down-projected activations.
        scale: multiplier of the adapter branch.
        router: two routed up-projections; False keeps one up-projection and no router.
        llm: adapters in every LLM block.
        vit: adapters in every ViT block.
    """

    hidden: int = 8
    groups: int = 2
    temperature: float = 10.0
    dropout: float = 0.1
    scale: float = 1.0
    router: bool = True
    llm: bool = True
    vit: bool = True

    name: ClassVar[str] = "lavin"

    def validate(self) -> None:
        self.check("hidden", self.hidden >= 1, "must be at least 1")
        self.check("groups", self.groups >= 1 and self.hidden % self.groups == 0, "must be >= 1 and divide hidden")
        self.check("temperature", self.temperature > 0, "must be greater than 0")
        self.check("dropout", 0 <= self.dropout < 1, "must be in [0, 1)")

    def layout(self) -> SequenceLayout:
        """LaVIN's routers read the modality token."""
        return SequenceLayout(modality_token=self.llm and self.router)


class RouterAdapter(nn.Module):
    """``x + s * (w0 * B(h) + w1 * D(h))``, ``h = dropout(A(x))``, ``w = softmax(R(x[:, 0]) / t)``.

    Identity at init (B and D are zero). Shapes: x (batch, tokens, dim) -> same. The routing weights come from
    token 0 of each sample (``route_from="mean"``: the mean token, for ViTs without a class token); during
    generation (a ``GenerationCache``) the first call's weights are kept for the calls that follow (decoding feeds
    one new token at a time, so token 0 is only seen at prefill).
    """

    def __init__(self, dim: int, config: LaVIN, route_from: Literal["first", "mean"] = "first") -> None:
        super().__init__()
        self.route_from = route_from
        self.down = nn.Linear(dim, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        n_experts = 2 if config.router else 1
        self.up = nn.ModuleList(GroupedLinear(config.hidden, dim, config.groups) for _ in range(n_experts))
        self.router = nn.Linear(dim, n_experts) if config.router else None
        self.temperature = config.temperature
        self.scale = config.scale
        self._caching = False
        self._cached_up: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def adapter_params(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def start_generation(self) -> None:
        self._caching, self._cached_up = True, None

    def end_generation(self) -> None:
        self._caching, self._cached_up = False, None

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, dim) -> (batch, experts), from each sample's token 0 (or mean token)."""
        if self.router is None:
            return x.new_ones(x.shape[0], 1)
        token = x[:, 0] if self.route_from == "first" else x.mean(dim=1)  # (batch, dim)
        logits = F.linear(token, self.router.weight.to(x.dtype), self.router.bias.to(x.dtype))
        return torch.softmax(logits.float() / self.temperature, dim=-1).to(x.dtype)

    def sample_up_projection(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's routed up-projection, ``(batch, hidden + 1, dim)``: row i < hidden maps hidden unit i,
        the last row is the bias; routing weights and scale are folded in. Cached during generation.

        ``sum_e w_e * up_e(h)`` is linear in the experts' weights, so mixing a few small matrices per sample
        replaces mixing full-width outputs per token.
        """
        if self._cached_up is not None:
            return self._cached_up
        experts = torch.stack(
            [  # (E, hidden + 1, dim): each grouped weight as a block-diagonal matrix, then bias
                torch.cat([torch.block_diag(*up.weight.chunk(up.groups, dim=0)).T, up.bias[None]]) for up in self.up
            ]
        ).to(x.dtype)
        up = self.scale * torch.einsum("be,erd->brd", self.routing_weights(x), experts)
        if self._caching:
            self._cached_up = up
        return up

    def expert_distance(self) -> float:
        """``|B - D| / mean(|B|, |D|)`` over the up-projections' weights and biases; 0 with one expert or none trained.

        Both experts start at zero. While every sample gets the same routing weights ``w``, their gradients are
        ``w0 G`` and ``w1 G``: Adam, invariant to a gradient's scale, moves them alike, and the router's gradient,
        proportional to ``B - D``, stays near zero. Experts grow apart where routing differs between samples.
        """
        if len(self.up) < 2:
            return 0.0
        first, second = (torch.cat([up.weight.flatten(), up.bias]).detach().float() for up in self.up)
        mean_norm = (first.norm() + second.norm()) / 2
        return 0.0 if mean_norm == 0 else ((first - second).norm() / mean_norm).item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Work in the activations' dtype: casting the tiny adapter weights is free, casting x is a full pass.
        h = self.dropout(F.linear(x, self.down.weight.to(x.dtype), self.down.bias.to(x.dtype)))  # (B, T, hidden)
        h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)  # (B, T, hidden + 1): the ones pick up the bias
        return torch.baddbmm(x, h, self.sample_up_projection(x))  # x + h @ up, one pass over x


@register_adapter(LaVIN)
def attach_lavin(model: VisionLanguageModel, config: LaVIN) -> None:
    """Wrap the pre-attention norm of every LLM decoder layer and every ViT block with a ``RouterAdapter``."""
    tower = model.tower
    for width in (model.llm.config.hidden_size, tower.width):
        if width % config.groups:
            raise ConfigError(f"adapter 'lavin': groups={config.groups} does not divide the backbone width {width}")
    if config.llm:
        dim = model.llm.config.hidden_size
        for layer in model.llm.model.layers:
            layer.input_layernorm = AdaptedNorm(layer.input_layernorm, _on_device(RouterAdapter(dim, config), layer))
    if config.vit:
        norm, route_from = tower.pre_attention_norm_name, "first" if tower.has_class_token else "mean"
        for block in tower.blocks:
            adapter = _on_device(RouterAdapter(tower.width, config, route_from), block)
            setattr(block, norm, AdaptedNorm(getattr(block, norm), adapter))


def _on_device(adapter: nn.Module, host: nn.Module) -> nn.Module:
    """Adapters live where their host block lives; they keep fp32 weights whatever the backbone dtype."""
    return adapter.to(next(host.parameters()).device)


@register_fold(LaVIN)
def fold_lavin(model: VisionLanguageModel, modality: str | None) -> PreTrainedModel:
    """Fold every LLM router adapter for one modality into q/k/v weights and biases."""
    if model.modality_embedding is not None and modality not in ("text", "image"):
        raise ConfigError("LaVIN adapters route by modality: choose the modality to fold for (text or image)")
    llm = model.llm
    layers = [layer for layer in llm.model.layers if isinstance(layer.input_layernorm, AdaptedNorm)]
    if not layers:
        raise ConfigError("this LaVIN adapter has no LLM adapters (llm: false): there is nothing to merge")
    ups = routed_up_projections(model, has_image=modality == "image")
    for layer, up in zip(layers, ups, strict=True):
        weight, bias = adapter_as_affine(layer.input_layernorm.adapter, up)
        layer.input_layernorm = layer.input_layernorm.norm
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attention, name)
            old_weight = old.weight.float()
            setattr(attention, name, biased_linear(old, old_weight @ weight, old_weight @ bias))
    for layer in llm.model.layers:
        if layer.self_attn.o_proj.bias is None:
            o_proj = layer.self_attn.o_proj
            layer.self_attn.o_proj = biased_linear(o_proj, o_proj.weight, torch.zeros(o_proj.out_features))
    llm.config.attention_bias = True
    return llm


def routed_up_projections(model: VisionLanguageModel, has_image: bool) -> list[torch.Tensor]:
    """Each LLM adapter's routed up-projection ``(hidden + 1, dim)`` for one modality, in float32."""
    inputs = modality_router_inputs(model, has_image)
    return [adapter.sample_up_projection(x[None, None])[0] for adapter, x in inputs.items()]


@torch.no_grad()
def modality_router_inputs(model: VisionLanguageModel, has_image: bool) -> dict[RouterAdapter, torch.Tensor]:
    """What every LLM router reads for one modality: the modality token's normed hidden state, (dim,) float32.

    The modality token attends only to itself, so its hidden states are those of a one-token sequence: running
    that token alone gives every router its input. In LLM order.
    """
    adapters = [m.adapter for m in model.llm.modules() if isinstance(m, AdaptedNorm)]
    inputs: dict[nn.Module, torch.Tensor] = {}

    def capture(adapter: nn.Module, args: tuple) -> None:
        inputs[adapter] = args[0][0, 0].float()  # args[0]: (1, 1, dim)

    hooks = [adapter.register_forward_pre_hook(capture) for adapter in adapters]
    device = model.llm.device
    batch = {
        "input_ids": torch.tensor([[MODALITY_SLOT]], device=device),
        "attention_mask": torch.ones(1, 1, dtype=torch.long, device=device),
        "has_image": torch.tensor([has_image], device=device),
    }
    try:
        model.hidden_states(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {adapter: inputs[adapter] for adapter in adapters}


def adapter_as_affine(adapter: RouterAdapter, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, b)`` with ``adapter(n) = P n + b`` for routed up-projection ``up`` (dropout off): (dim, dim), (dim,)."""
    down_weight, down_bias = adapter.down.weight.float(), adapter.down.bias.float()  # (hidden, dim), (hidden,)
    m, c = up[:-1], up[-1]  # (hidden, dim), (dim,)
    identity = torch.eye(m.shape[1], device=m.device)
    return identity + m.T @ down_weight, m.T @ down_bias + c
