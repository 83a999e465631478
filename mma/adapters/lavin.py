"""LaVIN's Mixture-of-Modality Adaptation (MMA), arXiv 2305.15023.

Per block a linear adapter with a shared down-projection and two grouped, zero-initialised up-projections mixed by
a softmax router. It sits on the output of the pre-attention norm of every LLM and ViT block. LLM routers read the
normed hidden state of the modality token at position 0, so each sample is routed by its modality; ViT routers
read each image's own class token.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mma.adapters.base import register_adapter
from mma.adapters.layers import AdaptedNorm, GroupedLinear


@dataclass
class MMAConfig:
    """LaVIN's settings (7B defaults).

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


class RouterAdapter(nn.Module):
    """``x + s * (w0 * B(h) + w1 * D(h))``, ``h = dropout(A(x))``, ``w = softmax(R(x[:, 0]) / t)``.

    Identity at init (B and D are zero). Shapes: x (batch, tokens, dim) -> same. The routing weights come from
    token 0 of each sample; during generation (a ``GenerationCache``) the first call's weights are kept for the
    calls that follow (decoding feeds one new token at a time, so token 0 is only seen at prefill).
    """

    def __init__(self, dim: int, config: MMAConfig) -> None:
        super().__init__()
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
        """(batch, tokens, dim) -> (batch, experts), from each sample's token 0."""
        if self.router is None:
            return x.new_ones(x.shape[0], 1)
        logits = F.linear(x[:, 0], self.router.weight.to(x.dtype), self.router.bias.to(x.dtype))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Work in the activations' dtype: casting the tiny adapter weights is free, casting x is a full pass.
        h = self.dropout(F.linear(x, self.down.weight.to(x.dtype), self.down.bias.to(x.dtype)))  # (B, T, hidden)
        h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)  # (B, T, hidden + 1): the ones pick up the bias
        return torch.baddbmm(x, h, self.sample_up_projection(x))  # x + h @ up, one pass over x


@register_adapter("lavin", MMAConfig)
def attach_lavin(model, config: MMAConfig) -> None:
    """Wrap the pre-attention norm of every LLM decoder layer and every ViT block with a ``RouterAdapter``."""
    if config.llm:
        if config.router:
            model.enable_modality_token()
        dim = model.llm.config.hidden_size
        for layer in model.llm.model.layers:
            layer.input_layernorm = AdaptedNorm(layer.input_layernorm, _on_device(RouterAdapter(dim, config), layer))
    if config.vit:
        for block in model.vit.blocks:
            block.norm1 = AdaptedNorm(block.norm1, _on_device(RouterAdapter(model.vit.embed_dim, config), block))


def _on_device(adapter: nn.Module, host: nn.Module) -> nn.Module:
    """Adapters live where their host block lives; they keep fp32 weights whatever the backbone dtype."""
    return adapter.to(next(host.parameters()).device)
