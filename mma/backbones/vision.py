"""One view of a frozen vision backbone, whichever library built it: timm ViTs and Hugging Face CLIP, DINOv2 and
SigLIP vision models.

The backbone module itself stays unwrapped (``model.vit``), so its state-dict names, fingerprints and exported
adapters do not depend on this file. ``vision_tower(module, image_size)`` returns a thin accessor (not a module)
that tells the model, the adapters, the image transform and activation checkpointing what each of them needs:

- ``width``: hidden size; ``blocks``: the transformer blocks, in order; ``pre_attention_norm_name``: the norm inside
  each block whose output feeds attention (where LaVIN's adapters sit); ``block_class``: what to checkpoint;
- ``has_class_token``, ``image_size``, ``num_patches(image_size)``: what the visual tokens can be;
- ``data_config(overrides)``: the backbone's own preprocessing, in timm's ``resolve_data_config`` form;
- ``features(pixels, tokens, every, layer, norm)``: the visual tokens, (N, n_vis, width).

Intermediate layers get the backbone's final norm only with ``norm`` (LaVIN reads CLIP's raw class tokens; DINOv2's
``get_intermediate_layers`` applies it by default, and DINOv2's raw intermediate states have channels a hundred
times the scale of others); the last layer's patch tokens are the backbone's own output features: timm's
``forward_features`` (final norm applied) or Hugging Face's ``last_hidden_state`` (DINOv2 and SigLIP apply their
final norm; CLIP keeps ``post_layernorm`` for its pooled token only, so ``norm`` applies it).
"""

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch
from timm.data import resolve_data_config
from timm.models import VisionTransformer
from torch import nn
from transformers import CLIPVisionModel, Dinov2Model, PreTrainedModel, SiglipVisionModel
from transformers.utils.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from mma.errors import BackboneError

Tokens = Literal["cls", "patches"]


@dataclass
class VisionTower(ABC):
    """What mma needs from a frozen vision backbone; plain data read once from ``module``, blocks read live.

    Args:
        module: the backbone, as loaded (``model.vit``).
        name: what the backbone calls itself (timm architecture, Hugging Face folder).
        width: hidden size of the tokens.
        pre_attention_norm_name: attribute of each block holding the norm before attention.
        has_class_token: whether token 0 is a class token (SigLIP has none).
        image_size: (H, W) of the images the backbone is given.
        patch_size: (H, W) of a patch.
        block_class: class of the blocks as built, for activation checkpointing.
    """

    module: nn.Module = field(repr=False)
    name: str
    width: int
    pre_attention_norm_name: str
    has_class_token: bool
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    block_class: type[nn.Module]

    @property
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, input side first."""

    def num_patches(self, image_size: tuple[int, int] | None = None) -> int:
        """Patch tokens of an image of ``image_size`` (default: the tower's): (H // p) * (W // p)."""
        height, width = image_size or self.image_size
        return (height // self.patch_size[0]) * (width // self.patch_size[1])

    @abstractmethod
    def data_config(self, overrides: dict | None = None) -> dict:
        """The backbone's own preprocessing as timm's ``resolve_data_config`` gives it, ``overrides`` on top."""

    @abstractmethod
    def architecture(self) -> dict:
        """JSON description of the architecture, recorded with exported adapters."""

    @abstractmethod
    def features(
        self, pixels: torch.Tensor, tokens: Tokens, every: int, layer: int, norm: bool, with_class: bool = False
    ) -> torch.Tensor:
        """(N, 3, H, W) -> (N, n_vis, width): ``cls``: the class token after every ``every``-th block;
        ``patches``: the patch tokens of block ``layer`` (Python indexing: -1 last, -2 penultimate), after the
        same block's class token with ``with_class`` (N, 1 + P, width). ``norm`` passes tokens that lack it through
        the backbone's final norm."""


class TimmTower(VisionTower):
    """A timm ``VisionTransformer``; its image size is the one it was built for."""

    @classmethod
    def of(cls, vit: VisionTransformer) -> "TimmTower":
        has_class_token = vit.cls_token is not None
        size, patch = tuple(vit.patch_embed.img_size), tuple(vit.patch_embed.patch_size)
        name = vit.pretrained_cfg.get("architecture", "ViT")
        return cls(vit, name, vit.embed_dim, "norm1", has_class_token, size, patch, type(vit.blocks[0]))

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.module.blocks)

    def data_config(self, overrides: dict | None = None) -> dict:
        return resolve_data_config({"input_size": (3, *self.image_size), **(overrides or {})}, model=self.module)

    def architecture(self) -> dict:
        vit = self.module
        return {
            "img_size": list(self.image_size),
            "patch_size": list(self.patch_size),
            "embed_dim": vit.embed_dim,
            "depth": len(vit.blocks),
            "num_heads": vit.blocks[0].attn.num_heads,
            "num_prefix_tokens": vit.num_prefix_tokens,
        }

    def features(
        self, pixels: torch.Tensor, tokens: Tokens, every: int, layer: int, norm: bool, with_class: bool = False
    ) -> torch.Tensor:
        vit, depth = self.module, len(self.module.blocks)
        if tokens == "cls":
            outputs = vit.forward_intermediates(
                pixels,
                indices=list(range(every - 1, depth, every)),
                return_prefix_tokens=True,
                norm=norm,
                output_fmt="NLC",
                intermediates_only=True,
                stop_early=True,
            )
            return torch.stack([prefix[:, 0] for _, prefix in outputs], dim=1)  # (N, depth // every, width)
        if layer % depth == depth - 1:
            out = vit.forward_features(pixels)  # (N, prefix + P, width), final norm applied
            patches = out[:, vit.num_prefix_tokens :]
            return torch.cat([out[:, :1], patches], dim=1) if with_class else patches
        ((patches, prefix),) = vit.forward_intermediates(
            pixels,
            indices=[layer % depth],
            return_prefix_tokens=True,
            norm=norm,
            output_fmt="NLC",
            intermediates_only=True,
            stop_early=True,
        )
        return torch.cat([prefix[:, :1], patches], dim=1) if with_class else patches  # (N, [1 +] P, width)


@dataclass(frozen=True)
class HFFamily:
    """Where a Hugging Face vision model keeps its blocks, and how its image processor prepares images."""

    blocks: str  # attribute path of the block list
    norm: str  # pre-attention norm inside a block
    final_norm: str  # the norm after the last block
    normed_output: bool  # whether last_hidden_state has been through final_norm (CLIP's has not)
    class_token: bool
    mean: list[float]
    std: list[float]
    crop_pct: float  # CLIP: short side to the size, centre crop; DINOv2: 256 -> 224 centre crop
    crop_mode: str  # SigLIP squashes the image to the square size, without a crop
    interpolate_argument: bool  # CLIP / SigLIP interpolate position embeddings only when asked; DINOv2 always


# Mean, std, resampling and cropping of each family's image processor (CLIPImageProcessor, SiglipImageProcessor,
# and the BitImageProcessor settings facebook/dinov2-* ship with).
HF_FAMILIES: dict[type[PreTrainedModel], HFFamily] = {
    CLIPVisionModel: HFFamily(
        "encoder.layers",
        "layer_norm1",
        "post_layernorm",
        False,
        True,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        1.0,
        "center",
        True,
    ),
    Dinov2Model: HFFamily(
        "encoder.layer",
        "norm1",
        "layernorm",
        True,
        True,
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        0.875,
        "center",
        False,
    ),
    SiglipVisionModel: HFFamily(
        "encoder.layers",
        "layer_norm1",
        "post_layernorm",
        True,
        False,
        IMAGENET_STANDARD_MEAN,
        IMAGENET_STANDARD_STD,
        1.0,
        "squash",
        True,
    ),
}


class HFTower(VisionTower):
    """A Hugging Face ``CLIPVisionModel``, ``Dinov2Model`` or ``SiglipVisionModel``, run at ``image_size``."""

    @classmethod
    def of(cls, model: PreTrainedModel, image_size: int | None) -> "HFTower":
        family, config = HF_FAMILIES[type(model)], model.config
        side, name = image_size or config.image_size, model.name_or_path or type(model).__name__
        blocks = model.get_submodule(family.blocks)
        patch = (config.patch_size, config.patch_size)
        return cls(
            model, name, config.hidden_size, family.norm, family.class_token, (side, side), patch, type(blocks[0])
        )

    @property
    def family(self) -> HFFamily:
        return HF_FAMILIES[type(self.module)]

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.module.get_submodule(self.family.blocks))

    def data_config(self, overrides: dict | None = None) -> dict:
        family = self.family
        processor = dict(
            mean=tuple(family.mean), std=tuple(family.std), interpolation="bicubic", crop_pct=family.crop_pct
        )
        args = {"input_size": (3, *self.image_size), "crop_mode": family.crop_mode, **(overrides or {})}
        return resolve_data_config(args, pretrained_cfg=processor)

    def architecture(self) -> dict:
        config = json.loads(self.module.config.to_json_string(use_diff=False))
        return {"class": type(self.module).__name__, "image_size": list(self.image_size), "config": config}

    def features(
        self, pixels: torch.Tensor, tokens: Tokens, every: int, layer: int, norm: bool, with_class: bool = False
    ) -> torch.Tensor:
        """Selected from ``output_hidden_states``: ``hidden_states[0]`` is the embeddings, ``hidden_states[i]`` the
        output of block i without any final norm; the last block's patches are ``last_hidden_state``."""
        family = self.family
        kwargs = {"interpolate_pos_encoding": True} if family.interpolate_argument else {}
        out = self.module(pixel_values=pixels, output_hidden_states=True, **kwargs)
        depth, hidden = len(self.blocks), out.hidden_states  # depth + 1 of (N, prefix + P, width)
        if tokens == "cls":
            states, normed = torch.stack([hidden[i][:, 0] for i in range(every, depth + 1, every)], dim=1), False
        else:
            block = layer % depth
            last = block == depth - 1
            start = int(self.has_class_token and not with_class)
            states = (out.last_hidden_state if last else hidden[block + 1])[:, start:]
            normed = last and family.normed_output
        return self.module.get_submodule(family.final_norm)(states) if norm and not normed else states


def vision_tower(module: nn.Module, image_size: int | None = None) -> VisionTower:
    """The accessor of a timm ViT or a supported Hugging Face vision model.

    ``image_size`` (square, pixels) is the size images are given at: Hugging Face models interpolate their position
    embeddings to it; a timm ViT is built for one size, which ``image_size`` must match when given.
    """
    if isinstance(module, VisionTransformer):
        tower = TimmTower.of(module)
        if image_size is not None and (image_size, image_size) != tower.image_size:
            raise BackboneError(f"the timm ViT was built for {tower.image_size} images, not {image_size}")
        return tower
    if type(module) in HF_FAMILIES:
        return HFTower.of(module, image_size)
    supported = ["timm VisionTransformer", *(cls.__name__ for cls in HF_FAMILIES)]
    raise BackboneError(f"{type(module).__name__} is not a supported vision backbone ({', '.join(supported)})")
