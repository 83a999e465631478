"""Tiny random backbones built from configs (LLaMA: hidden 64, 2 layers; timm ViT: 32 px, 2 blocks): what the test
suite runs on, and what benchmarks' ``--tiny`` swaps in to check a path without real weights."""

TINY_LLM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    initializer_range=0.1,
)
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
