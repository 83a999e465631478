"""Frozen timm Vision Transformers by model name, with weights from a local safetensors file or random init."""

from dataclasses import dataclass, field

import timm
import torch
from timm.models import VisionTransformer

from mma.backbones.files import read_safetensors_header, resolve_path
from mma.backbones.llm import torch_dtype
from mma.errors import BackboneError, ConfigError


@dataclass
class ViTSpec:
    """Which timm ViT encodes images.

    Args:
        name: a timm model name, e.g. ``vit_large_patch14_clip_224`` (LaVIN's CLIP ViT-L/14) or
            ``vit_tiny_patch16_224``.
        weights: a local ``.safetensors`` file with the model's weights; random init when not given.
        overrides: ``timm.create_model`` keyword arguments that change the size (img_size, patch_size, depth,
            embed_dim, num_heads, ...).
        dtype: storage dtype of the frozen weights.
        seed: seed of the random initialisation when no weights are given.
    """

    name: str = "vit_large_patch14_clip_224"
    weights: str | None = None
    overrides: dict = field(default_factory=dict)
    dtype: str = "float32"
    seed: int = 0


def load_vit(spec: ViTSpec, device: str | torch.device = "cpu") -> VisionTransformer:
    """Build the ViT without a classifier head, load its weights if given, freeze it, keep it in eval mode."""
    if spec.name not in timm.list_models():
        raise ConfigError(f"unknown timm model {spec.name!r}")
    kwargs = dict(num_classes=0, **spec.overrides)
    if spec.weights is not None and str(device) != "meta":
        weights = resolve_path(spec.weights)
        if weights.suffix != ".safetensors":
            raise BackboneError(f"{weights}: ViT weights must be a .safetensors file (pickle files are refused)")
        read_safetensors_header(weights)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    torch.manual_seed(spec.seed)
    with torch.device(device):
        vit = timm.create_model(spec.name, **kwargs)
    if not isinstance(vit, VisionTransformer):
        raise BackboneError(f"{spec.name}: {type(vit).__name__} is not a timm VisionTransformer")
    return vit.to(torch_dtype(spec.dtype)).requires_grad_(False).eval()
