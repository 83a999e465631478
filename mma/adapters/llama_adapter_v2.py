"""LLaMA-Adapter V2 (arXiv 2304.15010, with V1's zero-init attention, arXiv 2303.16199), as in METHODS.md section 2.

- Adaption prompts: the top ``prompt_layers`` attention modules are wrapped; each projects its own learnable prompt
  with the layer's k/v projections (no rotary embedding), lets the rotated queries attend it with a separate
  softmax, gates the result per head with ``tanh(g)`` (``g = 0``) and adds it to the heads that enter ``o_proj``.
- Early fusion: the first ``visual_layers`` attention modules take the projected visual tokens, layer-normed, as a
  prompt with its own zero-init gate; the tokens leave the LLM sequence (the layout's ``visual_in_sequence``).
- Bias and scale on the targeted linears (``BiasScaleLinear``), trainable RMSNorms (``TunedNorm``).
- Joint training: the projector, the visual norm and the early-fusion gates train on caption batches, everything
  else on instruction batches (``SourceBound``; see ``mma.adapters.base.source_parameters``).

Merge: bias and scale fold into the linears (``s * (W x + b0 + b) = (s W) x + s (b0 + b)``) and the norm deltas
into the norm weights; the adaption prompts are an attention branch a plain LLaMA has no weights for, so only an
adapter without prompts (``prompt_layers: 0``, ``visual_layers: 0``) merges.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from mma.adapters.base import (
    CAPTION,
    HAS_IMAGE,
    INSTRUCTION,
    VISUAL_TOKENS,
    AdapterSettings,
    register_adapter,
    register_fold,
)
from mma.adapters.layers import BiasScaleLinear, TunedNorm, ZeroInitGate, biased_linear
from mma.errors import ConfigError
from mma.layout import SequenceLayout

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mma.model import VisionLanguageModel

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LlamaAdapterV2(AdapterSettings):
    """LLaMA-Adapter V2 (the paper's 7B settings by default).

    Args:
        prompt_length: adaption prompt tokens in each prompted layer (paper: 10).
        prompt_layers: L, the number of top layers with a static prompt; unset: every layer after the first
            ``visual_layers`` (31 of LLaMA-7B's 32, the paper's setting); 0: none.
        visual_layers: K, the number of first layers whose prompt is the projected visual tokens (paper: 1); 0
            keeps the visual tokens in the sequence (LaVIN's layout) instead.
        gate: ``tanh``: a ``tanh(g)`` gate per head (the paper); ``scalar``: one ungated scalar per layer (peft's
            ``AdaptionPromptConfig``).
        bias_scale: ``y = s * (Wx + b)`` on the ``targets`` linears of every decoder block.
        targets: linear layers given bias and scale, by their name in the block.
        norms: train every RMSNorm of the LLM.
    """

    prompt_length: int = 10
    prompt_layers: int | None = None
    visual_layers: int = 1
    gate: Literal["tanh", "scalar"] = "tanh"
    bias_scale: bool = True
    targets: list[str] = field(default_factory=lambda: list(LINEARS))
    norms: bool = True

    name: ClassVar[str] = "llama-adapter-v2"

    def validate(self) -> None:
        self.check("prompt_length", self.prompt_length >= 0, "must be at least 0")
        self.check("prompt_layers", self.prompt_layers is None or self.prompt_layers >= 0, "must be at least 0")
        self.check("visual_layers", self.visual_layers >= 0, "must be at least 0")
        self.check("prompt_length", self.prompt_layers == 0 or self.prompt_length >= 1, "must be at least 1")
        self.check("targets", not set(self.targets) - set(LINEARS), f"must be among {LINEARS}")

    def layout(self) -> SequenceLayout:
        """Early fusion takes the visual tokens out of the sequence."""
        return SequenceLayout(visual_in_sequence=self.visual_layers == 0)

    def projector_source(self) -> str | None:
        """Under early fusion the projector feeds the caption-trained visual prompt."""
        return CAPTION if self.visual_layers else None


class VisualPromptNorm(nn.LayerNorm):
    """LayerNorm over the visual tokens before an early-fusion layer projects them: the tokens come from the
    projector at whatever scale it learned, while the layer's k/v projections expect normed hidden states (the
    released V2 code ends its visual projection with such a norm). Trained with the projection, on caption data."""

    part = "visual norm"
    train_source = CAPTION

    def adapter_params(self) -> list[str]:
        return ["weight", "bias"]


class AdaptionPromptAttention(nn.Module):
    """A HF LLaMA-family attention module plus zero-init gated prompt branches: a static learnable prompt and/or
    the sample's visual tokens. Each branch is ``gate * softmax(q k_p^T / sqrt(d)) v_p`` per head; the heads are
    added to the attention's own heads just before ``o_proj``, as in LLaMA-Adapter's code.

    The attention module runs unchanged: a forward hook on its ``q_proj`` hands over the queries it computes, and
    a pre-hook on its ``o_proj`` adds the branches to that layer's input, so no projection runs twice. The hooks act
    only during this wrapper's own call. Prompt keys/values are computed once per ``generate`` call (a
    ``GenerationCache``), not once per token.
    """

    part = "prompts"
    train_source = INSTRUCTION

    def __init__(self, attention: nn.Module, prompt_length: int, visual: bool, gate: str) -> None:
        super().__init__()
        self.attention = attention
        self.head_dim = attention.head_dim
        device = next(attention.parameters()).device
        heads, kind = (attention.config.num_attention_heads, "tanh") if gate == "tanh" else (1, "linear")
        hidden = attention.config.hidden_size
        # Standard normal, like the official code's nn.Embedding and peft; the closed gate keeps it silent at init.
        self.prompt = nn.Parameter(torch.randn(1, prompt_length, hidden, device=device)) if prompt_length else None
        self.prompt_gate = ZeroInitGate(heads, kind, INSTRUCTION).to(device) if prompt_length else None
        self.visual_gate = ZeroInitGate(heads, kind, CAPTION).to(device) if visual else None
        self.visual_norm = VisualPromptNorm(hidden, device=device) if visual else None
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._call: dict | None = None  # this call's inputs for the hooks; None outside ``forward``
        attention.q_proj.register_forward_hook(self._take_queries)
        attention.o_proj.register_forward_pre_hook(self._add_branches)

    def adapter_params(self) -> list[str]:
        return ["prompt"] if self.prompt is not None else []

    def wrapped_module(self) -> nn.Module:
        return self.attention

    def start_generation(self) -> None:
        self._cache = {}

    def end_generation(self) -> None:
        self._cache = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        visual, has_image = kwargs.pop(VISUAL_TOKENS, None), kwargs.pop(HAS_IMAGE, None)
        use_visual = self.visual_gate is not None and visual is not None
        if self.prompt is not None or use_visual:
            self._call = {"rotary": position_embeddings, "visual": visual if use_visual else None, "rows": has_image}
        try:
            return self.attention(
                hidden_states=hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                **kwargs,
            )
        finally:
            self._call = None

    def _take_queries(self, q_proj: nn.Module, args: tuple, queries: torch.Tensor) -> None:
        if self._call is not None:
            self._call["queries"] = queries  # (B, T, H * hd), before the rotary embedding

    def _add_branches(self, o_proj: nn.Module, args: tuple) -> tuple[torch.Tensor] | None:
        """``o_proj``'s input (B, T, H * hd) plus every gated prompt branch."""
        if self._call is None:
            return None
        heads = args[0]
        query = self._rotated(self._call["queries"], self._call["rotary"])  # (B, H, T, hd)
        branches = []
        if self.prompt is not None:
            keys_values = self._keys_values("prompt", self.prompt, heads.dtype)
            branches.append(self._attend(query, keys_values, self.prompt_gate()))
        if self._call["visual"] is not None:
            keys_values = self._keys_values("visual", self.visual_norm(self._call["visual"].float()), heads.dtype)
            rows = self._call["rows"].view(-1, 1, 1, 1)  # rows without an image get no visual branch
            branches.append(self._attend(query, keys_values, self.visual_gate(), rows))
        branch = sum(branches[1:], branches[0]).transpose(1, 2)  # (B, T, H, hd), a strided view
        return (heads.unflatten(-1, branch.shape[-2:]).add(branch.to(heads.dtype)).flatten(2),)

    def _rotated(self, queries: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, T, H * hd) -> (B, H, T, hd) with the rotary embedding applied, as the attention applies it."""
        query = queries.view(*queries.shape[:-1], -1, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rotary)
        return query * cos + rotate_half(query) * sin

    def _keys_values(self, name: str, prompt: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt (1 or B, P, d) -> keys and values (1 or B, kv_heads, P, hd) by the layer's own projections,
        fed in the activations' dtype."""
        if self._cache is not None and name in self._cache:
            return self._cache[name]
        prompt = prompt.to(dtype)
        keys_values = tuple(
            project(prompt).view(*prompt.shape[:-1], -1, self.head_dim).transpose(1, 2)
            for project in (self.attention.k_proj, self.attention.v_proj)
        )
        if self._cache is not None:
            self._cache[name] = keys_values
        return keys_values

    def _attend(
        self,
        query: torch.Tensor,
        keys_values: tuple[torch.Tensor, torch.Tensor],
        gate: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``gate * softmax(q k^T / sqrt(hd)) v`` per head, the prompt's own softmax: (B, H, T, hd).

        The gate (and the per-row mask ``rows``, (B, 1, 1, 1)) scales the P prompt values, not the T outputs:
        the same product, a pass over a tensor T / P times smaller, forward and backward.
        """
        keys, values = (t.to(query.dtype) for t in keys_values)
        query_heads, kv_heads = query.shape[1], keys.shape[1]
        if kv_heads != query_heads:  # one value copy per query head, so each can carry its own gate
            keys, values = (t.repeat_interleave(query_heads // kv_heads, dim=1) for t in (keys, values))
        values = values * gate.to(query.dtype).expand(query_heads).view(1, -1, 1, 1)
        if rows is not None:
            values = values * rows.to(values.dtype)
        keys, values = (t.expand(query.shape[0], -1, -1, -1) for t in (keys, values))
        return F.scaled_dot_product_attention(query, keys, values)


@register_adapter(LlamaAdapterV2)
def attach_llama_adapter_v2(model: VisionLanguageModel, config: LlamaAdapterV2) -> None:
    """Wrap linears (bias/scale), norms and attention modules of the frozen LLM in place; the ViT is untouched."""
    layers = model.llm.model.layers
    if config.prompt_layers is None:
        config = dataclasses.replace(config, prompt_layers=max(len(layers) - config.visual_layers, 0))
    _check(config, len(layers))
    if config.bias_scale:
        for layer in layers:
            for name in config.targets:
                _wrap(layer, name, BiasScaleLinear)
    if config.norms:
        norms = [name for name, m in model.llm.named_modules() if type(m).__name__.endswith("RMSNorm")]
        for name in norms:
            _wrap(model.llm, name, TunedNorm)
    for index, layer in enumerate(layers):
        prompted = index >= len(layers) - config.prompt_layers
        visual = index < config.visual_layers
        if prompted or visual:
            prompt_length = config.prompt_length if prompted else 0
            layer.self_attn = AdaptionPromptAttention(layer.self_attn, prompt_length, visual, config.gate)


def _check(config: LlamaAdapterV2, depth: int) -> None:
    """The ranges that depend on the LLM (its depth); the others are checked when the settings are made."""
    for name in ("prompt_layers", "visual_layers"):
        if not 0 <= getattr(config, name) <= depth:
            raise ConfigError(f"llama-adapter-v2: {name}={getattr(config, name)} must be in 0..{depth} (LLM depth)")
    if config.prompt_layers and config.prompt_length < 1:
        raise ConfigError(f"llama-adapter-v2: prompt_length={config.prompt_length} must be at least 1")


def _wrap(root: nn.Module, name: str, wrapper: type[nn.Module]) -> None:
    """Replace ``root``'s submodule at dotted ``name`` (searched below ``root`` when not a direct path) by
    ``wrapper(module)``, trained on instruction batches."""
    path = name if "." in name or hasattr(root, name) else _find(root, name)
    parent, _, attribute = path.rpartition(".")
    host = root.get_submodule(parent)
    setattr(host, attribute, wrapper(getattr(host, attribute), INSTRUCTION))


def _find(block: nn.Module, leaf: str) -> str:
    """The one submodule path of ``block`` ending in ``leaf`` (``q_proj`` -> ``self_attn.q_proj``)."""
    matches = [path for path, _ in block.named_modules() if path.rpartition(".")[2] == leaf]
    if len(matches) != 1:
        raise ConfigError(f"llama-adapter-v2: expected one {leaf!r} in each decoder block, found {matches}")
    return matches[0]


@register_fold(LlamaAdapterV2)
def fold_llama_adapter_v2(model: VisionLanguageModel, modality: str | None) -> PreTrainedModel:
    """Fold bias/scale into the targeted linears and norm deltas into the norms; refuse adaption prompts."""
    llm = model.llm
    if any(isinstance(m, AdaptionPromptAttention) for m in llm.modules()):
        raise ConfigError(
            "LLaMA-Adapter V2 adaption prompts are an attention branch a plain LLaMA has no weights for; only "
            "bias/scale and norms merge (prompt_layers: 0, visual_layers: 0)"
        )
    wrapped = [(name, m) for name, m in llm.named_modules() if isinstance(m, BiasScaleLinear | TunedNorm)]
    for name, module in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent), child, _folded(module))
    for layer in llm.model.layers:  # a biased family gets a (zero) bias in every member, as the config says
        for family, flag in ((layer.self_attn, "attention_bias"), (layer.mlp, "mlp_bias")):
            linears = {n: m for n, m in family.named_children() if isinstance(m, nn.Linear)}
            if any(m.bias is not None for m in linears.values()):
                setattr(llm.config, flag, True)
                for n, m in linears.items():
                    if m.bias is None:
                        setattr(family, n, biased_linear(m, m.weight, torch.zeros(m.out_features)))
    return llm


def _folded(module: BiasScaleLinear | TunedNorm) -> nn.Module:
    if isinstance(module, TunedNorm):
        module.norm.weight.copy_((module.norm.weight.float() + module.delta).to(module.norm.weight))
        return module.norm
    base, scale = module.base, module.scale.float()
    bias = base.bias.float() if base.bias is not None else torch.zeros_like(scale)
    return biased_linear(base, scale[:, None] * base.weight.float(), scale * (bias + module.bias.float()))
