"""LaVIN's Mixture-of-Modality Adaptation (MMA), arXiv 2305.15023.

Per block a linear adapter with a shared down-projection and two grouped, zero-initialised up-projections mixed by
a softmax router. It sits on the output of the pre-attention norm of every LLM and ViT block. LLM routers read the
normed hidden state of the modality token at position 0, so each sample is routed by its modality; ViT routers
read each image's own class token.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
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
    token 0 of each sample; with ``cache_routing`` on, the first call's weights are kept for the calls that follow
    (decoding feeds one new token at a time, so token 0 is only seen at prefill).
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
        self.cache_routing = False
        self._cached_weights: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def adapter_params(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, dim) -> (batch, experts), from each sample's token 0."""
        if self.cache_routing and self._cached_weights is not None:
            return self._cached_weights
        weights = torch.softmax(self.router(x[:, 0]) / self.temperature, dim=-1)
        if self.cache_routing:
            self._cached_weights = weights
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.down(x.to(self.down.weight.dtype)))  # (B, T, hidden)
        if self.router is None:
            delta = self.up[0](h)
        else:
            w = self.routing_weights(x.to(self.router.weight.dtype))  # (B, 2)
            delta = w[:, None, 0:1] * self.up[0](h) + w[:, None, 1:2] * self.up[1](h)
        return x + (self.scale * delta).to(x.dtype)


@contextmanager
def cached_routing(model: nn.Module):
    """Compute routing weights once (at prefill) and reuse them until the block exits."""
    adapters = [m for m in model.modules() if isinstance(m, RouterAdapter)]
    for adapter in adapters:
        adapter.cache_routing, adapter._cached_weights = True, None
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.cache_routing, adapter._cached_weights = False, None


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
