"""Frozen, unmodified backbones: a LLaMA-family causal LM and a vision tower (timm ViT or Hugging Face CLIP,
DINOv2, SigLIP)."""

from mma.backbones.llm import LLAMA_SHAPES, LLMSpec, llm_config, load_llm, load_tokenizer, torch_dtype
from mma.backbones.vision import VisionTower, vision_tower
from mma.backbones.vit import ViTSpec, load_vit

__all__ = [
    "LLAMA_SHAPES",
    "LLMSpec",
    "ViTSpec",
    "VisionTower",
    "llm_config",
    "load_llm",
    "load_tokenizer",
    "load_vit",
    "torch_dtype",
    "vision_tower",
]
