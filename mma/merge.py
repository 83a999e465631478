"""Fold an adapter into the LLM's own weights, leaving a plain ``transformers`` causal LM.

A method that can be folded registers a fold function (``@register_fold("lavin")``) that turns an adapted
``VisionLanguageModel`` into its bare LLM with changed weights. The result is the LLM alone: the ViT, projector
and modality token are not part of a causal LM, so it answers text prompts as the adapted model does for the
modality it was folded for.

LaVIN's adapter is linear and sits between the pre-attention RMSNorm and q/k/v. For a fixed modality its routing
weights are constants, so with ``n`` the normed input, ``h = A n + a`` and the routed up-projection ``[M; c]``::

    adapter(n) = n + M^T (A n + a) + c = P n + b,   P = I + M^T A,   b = M^T a + c
    q = W_q adapter(n) = (W_q P) n + W_q b          (the same for k and v)

LLaMA's projections have no bias, so the merged config sets ``attention_bias=True`` (o_proj gets a zero bias).

LLaMA-Adapter V2's bias and scale fold the same way (``s * (W x + b0 + b) = (s W) x + s (b0 + b)``) and its tuned
norms into the norm weight (``w + delta``); its adaption prompts are an extra attention branch that a plain LLaMA
has no weights for, so only an adapter without prompts (``prompt_layers: 0``, ``visual_layers: 0``) merges.
"""

from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from mma.adapters.lavin import RouterAdapter
from mma.adapters.layers import AdaptedNorm, BiasScaleLinear, TunedNorm
from mma.adapters.llama_adapter_v2 import AdaptionPromptAttention
from mma.errors import ConfigError
from mma.model import MODALITY_SLOT, VisionLanguageModel

# fold(model, modality) -> the model's LLM with the adapter folded in; modality is "text", "image" or None.
Fold = Callable[[VisionLanguageModel, str | None], PreTrainedModel]
_FOLDS: dict[str, Fold] = {}


def register_fold(name: str) -> Callable[[Fold], Fold]:
    """Decorator: the fold function of the registered adapter method ``name``."""

    def decorator(fold: Fold) -> Fold:
        _FOLDS[name] = fold
        return fold

    return decorator


def merge_adapter(model: VisionLanguageModel, adapter: str, modality: str | None = None) -> PreTrainedModel:
    """``model``'s LLM with the ``adapter`` method's weights folded in. The LLM is changed in place (no copy of a
    7B model is made), so ``model`` is spent afterwards."""
    if adapter not in _FOLDS:
        raise ConfigError(f"adapter {adapter!r} cannot be merged into the LLM; mergeable: {', '.join(sorted(_FOLDS))}")
    refuse_packed_weights(model.llm)
    with torch.no_grad():
        return _FOLDS[adapter](model, modality)


def refuse_packed_weights(llm: PreTrainedModel) -> None:
    """Folding needs float weights; packed ones (integer tensors, as 4-bit layers hold) are refused, as mma does not
    dequantise them. GGUF backbones are unpacked to float weights when loaded (``mma.backbones.llm``)."""
    packed = [name for name, param in llm.named_parameters() if not param.is_floating_point()]
    if packed:
        raise ConfigError(f"the LLM holds packed quantized weights ({packed[0]}, ...); mma cannot dequantise them")


@register_fold("lavin")
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
    """Each LLM adapter's routed up-projection ``(hidden + 1, dim)`` for one modality, in float32.

    Routers read the modality token, which attends only to itself: its hidden states are those of a one-token
    sequence, so running that token alone gives every router its input.
    """
    adapters = [m.adapter for m in model.llm.modules() if isinstance(m, AdaptedNorm)]
    inputs: dict[nn.Module, torch.Tensor] = {}

    def capture(adapter: nn.Module, args: tuple) -> None:
        inputs[adapter] = args[0]  # (1, 1, dim): the modality token's normed hidden state

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
    return [adapter.sample_up_projection(inputs[adapter].float())[0] for adapter in adapters]


def adapter_as_affine(adapter: RouterAdapter, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, b)`` with ``adapter(n) = P n + b`` for routed up-projection ``up`` (dropout off): (dim, dim), (dim,)."""
    down_weight, down_bias = adapter.down.weight.float(), adapter.down.bias.float()  # (hidden, dim), (hidden,)
    m, c = up[:-1], up[-1]  # (hidden, dim), (dim,)
    identity = torch.eye(m.shape[1], device=m.device)
    return identity + m.T @ down_weight, m.T @ down_bias + c


def biased_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A linear layer with ``weight`` and ``bias``, stored where and as ``linear`` stores its weight."""
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True, device="meta")
    folded.weight = nn.Parameter(weight.to(linear.weight), requires_grad=False)
    folded.bias = nn.Parameter(bias.to(linear.weight), requires_grad=False)
    return folded


@register_fold("llama-adapter-v2")
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


@register_fold("lora")
def fold_lora(model: VisionLanguageModel, modality: str | None) -> PreTrainedModel:
    """Add every LoRA update of the LLM into its base linear (peft's own ``merge``) and unwrap the layer.

    LoRA does not route, so the modality is irrelevant; LoRA in the ViT is not part of the LLM and stays out.
    """
    llm = model.llm
    layers = [(name, module) for name, module in llm.named_modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise ConfigError("this LoRA adapter has no LLM layers: there is nothing to merge")
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent), child, layer.get_base_layer())
    return llm
