"""Assemble a vision-language model from typed specs: load frozen backbones, attach one adapter method."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mma.adapters import get_adapter, set_trainable_params
from mma.backbones import LLMSpec, ViTSpec, load_llm, load_vit
from mma.errors import ConfigError
from mma.model import VisionLanguageModel, VisualConfig


@dataclass
class ModelConfig:
    """Everything that defines the model; a recipe's ``model.model`` section.

    Args:
        llm: the frozen language model.
        vit: the frozen image encoder.
        visual: visual tokens and projector.
        adapter: a registered adapter method (``mma params`` lists them in errors).
        adapter_config: settings of that method, checked against its config dataclass: a mapping, or the path of
            a YAML preset such as ``adapters/lavin.yaml``.
    """

    llm: LLMSpec = field(default_factory=LLMSpec)
    vit: ViTSpec = field(default_factory=ViTSpec)
    visual: VisualConfig = field(default_factory=VisualConfig)
    adapter: str = "lavin"
    adapter_config: dict | str = field(default_factory=dict)


def load_preset(settings: dict | str) -> dict:
    """Adapter settings given inline, or read from a YAML preset file."""
    if isinstance(settings, dict):
        return settings
    path = Path(settings)
    if not path.is_file():
        raise ConfigError(f"adapter preset {settings!r} does not exist")
    loaded = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(loaded, dict):
        raise ConfigError(f"adapter preset {settings!r} is not a mapping of settings")
    return loaded


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> VisionLanguageModel:
    """Backbones frozen, adapter attached, trainability set. ``device="meta"`` allocates no weights.

    The adapter name and settings are checked before any weights are read.
    """
    method = get_adapter(config.adapter)
    adapter_config = method.make_config(load_preset(config.adapter_config))
    llm, tokenizer = load_llm(config.llm, device)
    vit = load_vit(config.vit, device)
    model = VisionLanguageModel(llm, tokenizer, vit, config.visual)
    method.attach(model, adapter_config)
    set_trainable_params(model)
    return model.train(False)
