"""Assemble a vision-language model from typed specs: load frozen backbones, attach one adapter method."""

from dataclasses import dataclass, field

import torch

from mma.adapters import get_adapter, set_trainable_params
from mma.backbones import LLMSpec, ViTSpec, load_llm, load_vit
from mma.model import VisionLanguageModel, VisualConfig


@dataclass
class ModelConfig:
    """Everything that defines the model; a recipe's ``model.model`` section.

    Args:
        llm: the frozen language model.
        vit: the frozen image encoder.
        visual: visual tokens and projector.
        adapter: a registered adapter method (``mma params`` lists them in errors).
        adapter_config: settings of that method, checked against its config dataclass.
    """

    llm: LLMSpec = field(default_factory=LLMSpec)
    vit: ViTSpec = field(default_factory=ViTSpec)
    visual: VisualConfig = field(default_factory=VisualConfig)
    adapter: str = "lavin"
    adapter_config: dict = field(default_factory=dict)


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> VisionLanguageModel:
    """Backbones frozen, adapter attached, trainability set. ``device="meta"`` allocates no weights.

    The adapter name and settings are checked before any weights are read.
    """
    method = get_adapter(config.adapter)
    adapter_config = method.make_config(config.adapter_config)
    llm, tokenizer = load_llm(config.llm, device)
    vit = load_vit(config.vit, device)
    model = VisionLanguageModel(llm, tokenizer, vit, config.visual)
    method.attach(model, adapter_config)
    set_trainable_params(model)
    return model.train(False)
