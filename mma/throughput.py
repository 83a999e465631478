"""What a training step achieves: its real (non-padding) tokens, its padding share and its model FLOPs.

Model FLOPs follow PaLM's MFU convention (Chowdhery et al. 2022, appendix B): a weight matrix of ``m x n`` costs
``2mn`` per token it is applied to, and attention ``4 T d`` per token per layer (each of the row's T real keys
once for the scores, once for the values: a dense kernel's work, not halved for causality). Padding is left out:
it is work the hardware does, not work the model needs, so a step's FLOPs per second fall as padding grows.
The backbones are frozen, so the backward pass computes input gradients only, about as many FLOPs as the
forward pass; the adapters' own weight gradients (under 1% of a step) are left out. A step therefore costs
twice the forward pass of the LLM, its LM head and the projector, and the ViT's forward pass once more when ViT
adapters train. Not counted: element-wise work (norms, softmax, activations) and LLaMA-Adapter V2's prompt
branches (``4 P d`` per token per prompted layer, P = 10 prompt tokens: a few percent at most).
"""

import torch
from torch import nn

from mma.layout import IGNORE_INDEX
from mma.model import VisionLanguageModel


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding (the modality token and the visual token slots count)."""
    return int(batch["attention_mask"].sum())


def padding_share(batch: dict) -> float:
    """Share of the batch's (B, T) positions that are padding."""
    return 1.0 - real_tokens(batch) / batch["attention_mask"].numel()


def matrix_params(module: nn.Module) -> int:
    """Entries of the weight matrices (2-D) and convolution kernels (4-D) in ``module``: the multiply-adds it
    spends per token it runs on. Biases, norms, embeddings tables held elsewhere and prompts (3-D) are left out."""
    return sum(p.numel() for p in module.parameters() if p.ndim in (2, 4))


def llm_forward_flops(model: VisionLanguageModel, batch: dict) -> float:
    """Forward FLOPs of the decoder layers on every row's real tokens and of the LM head on the labelled ones."""
    llm = model.llm
    lengths = batch["attention_mask"].sum(dim=1).double()  # (B,) real tokens per row
    layers, config = llm.model.layers, llm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = config.num_attention_heads * head_dim
    linear = 2 * matrix_params(layers) * lengths.sum()
    attention = 4 * len(layers) * attention_width * (lengths**2).sum()
    labelled = (batch["labels"] != IGNORE_INDEX).sum()
    head = 2 * llm.get_output_embeddings().weight.numel() * labelled
    return float(linear + attention + head)


def vision_forward_flops(model: VisionLanguageModel, batch: dict) -> float:
    """Forward FLOPs of the ViT blocks the visual tokens need and of the projector, for the batch's images."""
    pixels = batch.get("pixel_values")
    images = 0 if pixels is None else pixels.shape[0]
    if not images:
        return 0.0
    tower = model.tower  # timm or Hugging Face alike
    patches = tower.num_patches()
    tokens = patches + getattr(tower.module, "num_prefix_tokens", int(tower.has_class_token))
    blocks = len(tower.blocks)
    if model.visual.tokens == "cls":  # the ViT stops after the last block a class token is read from
        blocks = model.num_visual_tokens * model.visual.every
    per_block = 2 * matrix_params(tower.blocks[0]) * tokens + 4 * tower.width * tokens**2
    projected = model.num_visual_tokens if model.visual.tokens == "cls" else patches
    patch_embedding = 2 * 3 * tower.patch_size[0] * tower.patch_size[1] * tower.width * patches
    vit_flops = blocks * per_block + patch_embedding
    projector_flops = 2 * matrix_params(model.projector) * projected
    if model.class_projector is not None:  # ADEM-VL's class token, one per image
        projector_flops += 2 * matrix_params(model.class_projector)
    return float(images * (vit_flops + projector_flops))


def train_step_flops(model: VisionLanguageModel, batch: dict) -> float:
    """Model FLOPs of one training step (forward and backward) on ``batch``'s real tokens."""
    vit_trains = any(p.requires_grad for p in model.vit.parameters())
    vision = vision_forward_flops(model, batch)
    return 2 * llm_forward_flops(model, batch) + vision * (2 if vit_trains else 1)


def forward_flops(model: VisionLanguageModel, batch: dict) -> float:
    """Model FLOPs of one forward pass (``VisionLanguageModel.loss``) on ``batch``'s real tokens."""
    return llm_forward_flops(model, batch) + vision_forward_flops(model, batch)


@torch.no_grad()
def counted_forward_flops(model: VisionLanguageModel, batch: dict) -> int:
    """FLOPs torch's ``FlopCounterMode`` counts in one forward pass of ``loss``: the check of the formulas above
    on batches without padding (with padding it counts the padded positions too)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.loss(batch)
    return counter.get_total_flops()
