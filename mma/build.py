"""Assemble a vision-language model from typed specs: load frozen backbones, attach one adapter method."""

from dataclasses import asdict, dataclass, field

import torch

from mma.adapters import AdapterSettings, LaVIN, method_of, set_trainable_params, settings_from_spec, settings_spec
from mma.backbones import LLMSpec, ViTSpec, load_llm, load_vit, vision_tower
from mma.errors import ConfigError
from mma.model import VisionLanguageModel, VisualConfig


@dataclass
class ModelConfig:
    """Everything that defines the model; a recipe's ``model.model`` section.

    Args:
        llm: the frozen language model.
        vit: the frozen vision backbone (timm ViT or Hugging Face CLIP / DINOv2 / SigLIP).
        visual: visual tokens and projector.
        adapter: the adapter method and its settings: a settings class by name (``LaVIN``, ``LlamaAdapterV2``,
            ``LoRA``, ``MemVP``, ``NoAdapter``) with ``init_args``, or a preset file (``adapters/lavin.yaml``).
        seed: seed of the projector's and the adapters' initialisation (seeded sweeps vary it); None continues the
            random generator as the backbone loaders leave it.
    """

    llm: LLMSpec = field(default_factory=LLMSpec)
    vit: ViTSpec = field(default_factory=ViTSpec)
    visual: VisualConfig = field(default_factory=VisualConfig)
    adapter: AdapterSettings = field(default_factory=LaVIN)
    seed: int | None = None


def model_config_dict(config: ModelConfig) -> dict:
    """Plain data of ``config`` (the adapter as ``class_path``/``init_args``): what checkpoints and exported
    adapters store, and what the CLI parses back."""
    plain = {name: asdict(getattr(config, name)) for name in ("llm", "vit", "visual")}
    return {**plain, "adapter": settings_spec(config.adapter), "seed": config.seed}


def model_config_from_dict(data: dict) -> ModelConfig:
    """The typed ``ModelConfig`` of ``model_config_dict`` output (adapters of format 1 stored ``adapter`` as a
    name beside ``adapter_config``)."""
    try:
        adapter = data["adapter"] if isinstance(data["adapter"], dict) else data
        return ModelConfig(
            llm=LLMSpec(**data["llm"]),
            vit=ViTSpec(**data["vit"]),
            visual=VisualConfig(**data["visual"]),
            adapter=settings_from_spec(adapter),
            seed=data.get("seed"),
        )
    except (KeyError, TypeError) as err:
        raise ConfigError(f"model settings cannot be read: {err}") from None


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> VisionLanguageModel:
    """Backbones frozen, adapter attached, trainability set. ``device="meta"`` allocates no weights.

    The adapter settings were checked when they were made; the sequence layout comes from them.
    """
    method = method_of(config.adapter)
    llm, tokenizer = load_llm(config.llm, device)
    tower = vision_tower(load_vit(config.vit, device), config.vit.image_size)
    layout, source = config.adapter.layout(), config.adapter.projector_source()
    if config.seed is not None:  # after the loaders, which seed the generator for random backbones
        torch.manual_seed(config.seed)
    model = VisionLanguageModel(llm, tokenizer, tower, config.visual, layout, source)
    method.attach(model, config.adapter)
    set_trainable_params(model)
    return model.train(False)
