"""Fold an adapter into the LLM's own weights, leaving a plain ``transformers`` causal LM.

A method that can be folded registers its fold in its own file (``@register_fold(LaVIN)``), which turns an adapted
``VisionLanguageModel`` into its bare LLM with changed weights. The result is the LLM alone: the ViT, projector
and modality token are not part of a causal LM, so it answers text prompts as the adapted model does for the
modality it was folded for.
"""

import torch
from transformers import PreTrainedModel

from mma.adapters import AdapterSettings, method_of, registered_adapters
from mma.adapters.base import get_adapter
from mma.errors import ConfigError
from mma.model import VisionLanguageModel


def mergeable_adapters() -> list[str]:
    """Names of the registered methods that have a fold."""
    return [name for name in registered_adapters() if get_adapter(name).fold is not None]


def merge_adapter(
    model: VisionLanguageModel, settings: AdapterSettings, modality: str | None = None
) -> PreTrainedModel:
    """``model``'s LLM with the adapter (built from ``settings``) folded in. The LLM is changed in place (no copy of
    a 7B model is made), so ``model`` is spent afterwards."""
    method = method_of(settings)
    if method.fold is None:
        mergeable = ", ".join(mergeable_adapters())
        reason = f": {settings.merge_refusal}" if settings.merge_refusal else ""
        raise ConfigError(f"adapter {method.name!r} cannot be merged into the LLM{reason}; mergeable: {mergeable}")
    refuse_packed_weights(model.llm)
    with torch.no_grad():
        return method.fold(model, modality)


def refuse_packed_weights(llm: PreTrainedModel) -> None:
    """Folding needs float weights; packed ones (integer tensors, as 4-bit layers hold) are refused, as mma does not
    dequantise them. GGUF backbones are unpacked to float weights when loaded (``mma.backbones.llm``)."""
    packed = [name for name, param in llm.named_parameters() if not param.is_floating_point()]
    if packed:
        raise ConfigError(f"the LLM holds packed quantized weights ({packed[0]}, ...); mma cannot dequantise them")
