"""Optimizer choice and learning-rate schedule: AdamW from torch or bitsandbytes, warmup then cosine per step."""

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mma.errors import ConfigError

OptimizerName = Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"]
_BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw8bit": "PagedAdamW8bit"}


@dataclass
class OptimizerConfig:
    """AdamW with per-step linear warmup then half-cycle cosine decay (LaVIN's schedule).

    Args:
        name: ``adamw`` (torch), or from bitsandbytes ``adamw8bit`` (8-bit states) and ``paged_adamw`` /
            ``paged_adamw8bit`` (states paged to CPU memory under GPU memory pressure; CUDA only).
        lr: peak learning rate.
        weight_decay: decay of matrices; 1-D parameters (biases, norms, embeddings of size 1) get none.
        betas: AdamW betas.
        warmup_fraction: share of all optimizer steps spent warming up linearly from 0.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    name: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        """Ranges are checked when the recipe is parsed, before any weight loads."""
        checks = {
            f"lr={self.lr} must be greater than 0": self.lr > 0,
            f"weight_decay={self.weight_decay} must be at least 0": self.weight_decay >= 0,
            f"betas={tuple(self.betas)} must each be in [0, 1)": all(0 <= b < 1 for b in self.betas),
            f"warmup_fraction={self.warmup_fraction} must be in [0, 1]": 0 <= self.warmup_fraction <= 1,
            f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]": 0 <= self.min_lr_ratio <= 1,
        }
        if wrong := [message for message, ok in checks.items() if not ok]:
            raise ConfigError(f"optimizer setting {wrong[0]}")


def make_optimizer(groups: list[dict], config: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """The configured AdamW over ``groups``; an optimizer that cannot run on ``device`` is refused up front."""
    if config.name == "adamw":
        # One fused kernel for all tensors: adapters have hundreds of small ones (LLaMA-Adapter V2: 546 on
        # SmolLM2), and the per-tensor loop takes 4.5x as long (21 vs 4.6 ms per step on 2 CPU cores).
        fused = device.type in ("cpu", "cuda") or None  # None: torch's default elsewhere
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused)
    if config.name.startswith("paged") and device.type != "cuda":
        raise ConfigError(
            f"optimizer {config.name!r} pages its states between GPU and CPU memory and needs a CUDA device; "
            f"this run is on {device.type}: use adamw or adamw8bit"
        )
    import bitsandbytes.optim

    return getattr(bitsandbytes.optim, _BNB_OPTIMIZERS[config.name])(groups, lr=config.lr, betas=config.betas)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
