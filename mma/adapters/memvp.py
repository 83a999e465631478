"""MemVP: Memory-Space Visual Prompting (Jie et al., ICML 2024, arXiv 2405.05615), with ADEM-VL's variants
(arXiv 2410.17779) as settings. Reference code: github.com/JieShibo/MemVP, github.com/Hao840/ADEM-VL.

No visual token enters the LLM sequence. The projected visual tokens ``V`` of each sample (zeros for a text-only
sample), scaled by ``visual_scale``, become extra keys and values of every FFN, each slot plus a learned position
embedding shared by all layers::

    y = FFN(x) + s * dropout(act(x K^T)) W,    K = V + E1,  W = V + E2         (x the FFN's normed input)

``E1`` (``memory_slots`` x d) starts small and random, ``E2`` at zero; ``V`` fills the first slots and the rest are
zero, so those slots hold a static learned memory that text-only samples read too. ADEM-VL's variants: the kernel
``silu(x) silu(K)^T`` (``memory_kernel: adem-vl``), zeroing each token's lowest fraction of memory scores
(``memory_drop_fraction``), a multiscale memory of average-pooled patch grids (``memory_grids``) and the image's
class token as one input token of the sequence, through a projector of its own (``class_token_input``: the layout's
``class_token_in_sequence``; text-only samples have no slot). In the ViT, every block's MLP gets a parallel adapter
``mlp(h) + s_v * up(dropout(gelu(down(h))))`` with ``up`` zero-init.

How the visual tokens reach the FFN: the model hands them to every decoder layer as the keyword argument
``VISUAL_TOKENS`` (the layout's ``visual_in_sequence: false``), but a transformers decoder layer passes its keyword
arguments to ``self_attn`` only, never to ``mlp``. So each FFN wrapper reads them from a forward pre-hook on its
decoder layer, which keeps the latest call's tokens; nothing in the layer's forward changes.

Identity at init: ``E2 = 0`` silences the static slots, and the projector's output layer starts at zero
(``projector_zero_init``), so ``V = 0``; the authors' projector is xavier-initialised, so their image samples
already read ``0.01 V`` as values at step 0. With ``class_token_input`` image samples hold one more token from
step 0, as in ADEM-VL. Not mergeable: the memory depends on the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mma.adapters.base import VISUAL_TOKENS, AdapterSettings, register_adapter
from mma.errors import ConfigError
from mma.layout import SequenceLayout

if TYPE_CHECKING:
    from mma.model import VisionLanguageModel


@dataclass
class MemVP(AdapterSettings):
    """MemVP (the authors' ScienceQA settings for LLaMA-7B by default).

    Args:
        memory_slots: memory length M, the rows of the position embeddings E1, E2 (authors: 320 for 7B, 400 for
            13B); the visual tokens fill the first slots, the rest hold a static learned memory.
        memory_scale: s, the multiplier of the memory term (authors: 0.1).
        visual_scale: multiplier of the projected visual tokens before they join the memory (authors: 0.01).
        memory_key_std: standard deviation of E1's normal init (authors: 0.02); E2 starts at zero.
        memory_dropout: dropout on the memory scores (MemVP: 0.1; ADEM-VL: none).
        memory_kernel: ``memvp``: scores ``silu(x K^T)``; ``adem-vl``: ``silu(x) silu(K)^T``.
        memory_drop_fraction: zero each token's lowest fraction of memory scores (ADEM-VL: 0.1).
        memory_grids: side lengths of the average-pooled patch grids that make the memory tokens, e.g. [16, 8]
            for ADEM-VL's 256 + 64 tokens from ViT-L/14's 16 x 16 grid (pooled before the projector); empty: the
            visual tokens as they come. Needs ``visual.tokens: patches``.
        class_token_input: the class token of the layer the patches come from, through a projector of its own,
            as one token of an image sample's sequence after ``Image: `` (ADEM-VL's default). Needs
            ``visual.tokens: patches`` and a ViT with a class token.
        projector_zero_init: zero the projector's output layer so that the model is the backbone at init; False
            keeps the authors' xavier init (the memory then changes image samples before any step).
        vit_hidden: width of each ViT block's parallel MLP adapter (authors: 12); 0: no ViT adapters.
        vit_scale: multiplier of the ViT adapters' output (authors: 0.1).
        vit_dropout: dropout inside the ViT adapters (authors: 0.1).
    """

    memory_slots: int = 320
    memory_scale: float = 0.1
    visual_scale: float = 0.01
    memory_key_std: float = 0.02
    memory_dropout: float = 0.1
    memory_kernel: Literal["memvp", "adem-vl"] = "memvp"
    memory_drop_fraction: float = 0.0
    memory_grids: list[int] = field(default_factory=list)
    class_token_input: bool = False
    projector_zero_init: bool = True
    vit_hidden: int = 12
    vit_scale: float = 0.1
    vit_dropout: float = 0.1

    name: ClassVar[str] = "memvp"
    merge_refusal: ClassVar[str] = (
        "its FFN memory holds each image's projected features as keys and values, and a plain causal LM has no "
        "weights that depend on the image"
    )

    def validate(self) -> None:
        self.check("memory_slots", self.memory_slots >= 1, "must be at least 1")
        for name in ("memory_scale", "visual_scale", "vit_scale"):
            self.check(name, getattr(self, name) > 0, "must be greater than 0")
        self.check("memory_key_std", self.memory_key_std >= 0, "must be at least 0")
        for name in ("memory_dropout", "memory_drop_fraction", "vit_dropout"):
            self.check(name, 0 <= getattr(self, name) < 1, "must be in [0, 1)")
        self.check("memory_kernel", self.memory_kernel in ("memvp", "adem-vl"), "must be memvp or adem-vl")
        self.check("memory_grids", all(side >= 1 for side in self.memory_grids), "must hold sides of at least 1")
        self.check("vit_hidden", self.vit_hidden >= 0, "must be at least 0")

    def layout(self) -> SequenceLayout:
        """The visual tokens go to the FFN memories, not into the sequence; the class token may."""
        return SequenceLayout(visual_in_sequence=False, class_token_in_sequence=self.class_token_input)


class MemoryPositions(nn.Module):
    """E1, E2 (M, d), shared by every layer's memory; turns a batch's visual tokens into memory keys and values."""

    part = "memory positions"

    def __init__(self, dim: int, config: MemVP, device: torch.device) -> None:
        super().__init__()
        self.key = nn.Parameter(config.memory_key_std * torch.randn(config.memory_slots, dim, device=device))
        self.value = nn.Parameter(torch.zeros(config.memory_slots, dim, device=device))
        self.visual_scale = config.visual_scale

    def adapter_params(self) -> list[str]:
        return ["key", "value"]

    def forward(self, visual: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual tokens (B, n, d) or None (no image in the batch) -> keys, values (B or 1, M, d) in ``dtype``:
        ``visual_scale * V`` zero-padded to M slots, plus E1 and E2."""
        key, value = self.key.to(dtype)[None], self.value.to(dtype)[None]  # (1, M, d)
        if visual is None:
            return key, value
        slots, tokens = key.shape[1], visual.shape[1]
        if tokens > slots:
            raise ConfigError(f"memvp: {tokens} visual tokens do not fit memory_slots={slots}")
        padded = F.pad(self.visual_scale * visual.to(dtype), (0, 0, 0, slots - tokens))  # (B, M, d)
        return padded + key, padded + value


class MemoryFFN(nn.Module):
    """A decoder layer's FFN plus the visual memory: ``mlp(x) + s * dropout(scores(x, K)) W``.

    Shapes: x (B, T, d) -> (B, T, d); scores (B, T, M). The visual tokens come from a pre-hook on the decoder layer
    (``listen_to``). They are kept after the call, not cleared: transformers' gradient checkpointing replays a
    layer's ``forward`` in the backward pass without its hooks, and the replay must read the same tokens.
    """

    part = "memory"

    def __init__(self, mlp: nn.Module, positions: MemoryPositions, config: MemVP) -> None:
        super().__init__()
        self.mlp = mlp
        self.positions = positions  # the same module in every layer: its parameters are named once
        self.dropout = nn.Dropout(config.memory_dropout)
        self.scale = config.memory_scale
        self.kernel = config.memory_kernel
        self.drop_fraction = config.memory_drop_fraction
        self._visual: torch.Tensor | None = None

    def wrapped_module(self) -> nn.Module:
        return self.mlp

    def listen_to(self, layer: nn.Module) -> None:
        """Take the visual tokens of every call of ``layer`` (the decoder layer holding this FFN)."""
        layer.register_forward_pre_hook(self._take_visual, with_kwargs=True)

    def _take_visual(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        self._visual = kwargs.get(VISUAL_TOKENS)  # (B, n, d); absent when no sample of the batch has an image

    def scores(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), keys (B or 1, M, d) -> (B, T, M), each token's lowest ``drop_fraction`` zeroed."""
        if self.kernel == "memvp":
            scores = F.silu(x @ keys.transpose(1, 2))
        else:
            scores = F.silu(x) @ F.silu(keys).transpose(1, 2)
        dropped = int(self.drop_fraction * scores.shape[-1])
        if dropped:
            threshold = scores.kthvalue(dropped + 1, dim=-1, keepdim=True).values  # (B, T, 1)
            scores = scores.masked_fill(scores < threshold, 0)
        return self.dropout(scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys, values = self.positions(self._visual, x.dtype)  # (B or 1, M, d)
        scores = self.scores(x, keys)
        return torch.baddbmm(self.mlp(x), scores, values.expand(x.shape[0], -1, -1), alpha=self.scale)


class ParallelAdapter(nn.Module):
    """A ViT block's MLP plus a bottleneck beside it: ``mlp(h) + s * up(dropout(gelu(down(h))))``, no biases, ``up``
    zero-initialised (MemVP's CLIP adapter). h (N, L, C) -> (N, L, C)."""

    part = "parallel adapters"

    def __init__(self, mlp: nn.Module, dim: int, config: MemVP) -> None:
        super().__init__()
        device = next(mlp.parameters()).device
        self.mlp = mlp
        self.down = nn.Linear(dim, config.vit_hidden, bias=False, device=device)
        self.up = nn.Linear(config.vit_hidden, dim, bias=False, device=device)
        nn.init.zeros_(self.up.weight)
        self.dropout = nn.Dropout(config.vit_dropout)
        self.scale = config.vit_scale

    def adapter_params(self) -> list[str]:
        return ["down.weight", "up.weight"]

    def wrapped_module(self) -> nn.Module:
        return self.mlp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        down, up = self.down.weight.to(h.dtype), self.up.weight.to(h.dtype)
        return torch.add(self.mlp(h), F.linear(self.dropout(F.gelu(F.linear(h, down))), up), alpha=self.scale)


@register_adapter(MemVP)
def attach_memvp(model: VisionLanguageModel, config: MemVP) -> None:
    """Wrap every LLM decoder layer's ``mlp`` with one shared memory, every ViT block's ``mlp`` with a parallel
    adapter; pool the projector's input into ``memory_grids`` and zero its output layer when asked."""
    _check_memory_size(model, config)
    dim = model.llm.config.hidden_size
    layers = model.llm.model.layers
    positions = MemoryPositions(dim, config, next(layers[0].parameters()).device)
    for layer in layers:
        layer.mlp = MemoryFFN(layer.mlp, positions, config)
        layer.mlp.listen_to(layer)
    if config.vit_hidden:
        for block in model.tower.blocks:  # timm, CLIP, DINOv2 and SigLIP blocks all call their FFN ``mlp``
            block.mlp = ParallelAdapter(block.mlp, model.tower.width, config)
    if config.memory_grids:
        model.projector.register_forward_pre_hook(_pooled(config.memory_grids))
    if config.projector_zero_init:
        output = model.projector.net[-1]
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)


def _check_memory_size(model: VisionLanguageModel, config: MemVP) -> None:
    """The memory tokens fit the slots; pooled grids need a square patch grid at least as large."""
    tokens = model.num_visual_tokens
    if config.memory_grids:
        side = [size // patch for size, patch in zip(model.tower.image_size, model.tower.patch_size, strict=True)]
        if model.visual.tokens != "patches" or side[0] != side[1] or max(config.memory_grids) > side[0]:
            raise ConfigError(
                f"memvp: memory_grids={config.memory_grids} pool the square patch grid of visual.tokens: patches "
                f"(this ViT's grid: {side[0]} x {side[1]}, visual.tokens: {model.visual.tokens})"
            )
        tokens = sum(grid * grid for grid in config.memory_grids)
    if tokens > config.memory_slots:
        raise ConfigError(f"memvp: {tokens} visual tokens per image do not fit memory_slots={config.memory_slots}")


def _pooled(grids: list[int]) -> Callable[[nn.Module, tuple], tuple[torch.Tensor]]:
    """A projector pre-hook: patch features (N, P, C) -> (N, sum(g * g), C), each grid g an average pooling of the
    sqrt(P) x sqrt(P) patch grid (ADEM-VL pools the ViT's features, before the projector)."""

    def hook(projector: nn.Module, args: tuple) -> tuple[torch.Tensor]:
        features = args[0]
        side = round(features.shape[1] ** 0.5)
        grid = features.transpose(1, 2).unflatten(2, (side, side))  # (N, C, side, side)
        pooled = [F.adaptive_avg_pool2d(grid, g).flatten(2).transpose(1, 2) for g in grids]  # (N, g * g, C) each
        return (torch.cat(pooled, dim=1),)

    return hook
