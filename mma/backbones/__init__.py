"""Frozen, unmodified backbones: a LLaMA-family causal LM and a timm ViT."""

from mma.backbones.llm import LLAMA_SHAPES, LLMSpec, llm_config, load_llm, load_tokenizer, torch_dtype
from mma.backbones.vit import ViTSpec, load_vit

__all__ = ["LLAMA_SHAPES", "LLMSpec", "ViTSpec", "llm_config", "load_llm", "load_tokenizer", "load_vit", "torch_dtype"]
