"""Tiny random backbones (LLaMA: hidden 64, 2 layers; ViT: 32 px, 2 blocks) built from configs, CPU only."""

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from mma.adapters import get_adapter
from mma.adapters.base import adapter_owned_modules
from mma.backbones import LLMSpec, ViTSpec
from mma.backbones.tiny import TINY_LLM, TINY_VIT
from mma.build import ModelConfig, build_model
from mma.data.collate import VLMCollator
from mma.model import VisualConfig

logging.getLogger("mma").setLevel(logging.ERROR)


class LossLog(Callback):
    """Records the training loss of every step, for tests that check it goes down."""

    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def tiny_trainer(**overrides) -> L.Trainer:
    """A CPU Trainer with everything a test does not look at (logger, progress bar, summary, checkpoints,
    validation) off; ``overrides`` set the rest."""
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**settings, **overrides})


def tiny_config(adapter: str = "lavin", **settings) -> ModelConfig:
    """The tiny backbones with the registered method ``adapter`` and its ``settings``."""
    return ModelConfig(
        llm=LLMSpec(config=TINY_LLM),
        vit=ViTSpec(name="vit_tiny_patch16_224", overrides=TINY_VIT),
        visual=VisualConfig(tokens="cls", every=1, projector_hidden=16),
        adapter=get_adapter(adapter).settings(**settings),
    )


def tiny_model(adapter: str = "lavin", seed: int = 0, **adapter_config):
    torch.manual_seed(seed)
    return build_model(tiny_config(adapter, **adapter_config))


def collator_for(model, max_length: int = 128, pack: bool = False) -> VLMCollator:
    return VLMCollator(model.tokenizer, None, model.layout, model.num_visual_tokens, max_length, pack)


def image(seed: int) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def samples() -> list[dict]:
    """Two image samples and one text-only sample of different lengths."""
    return [
        {"prompt": "What colour is it?", "answer": "red", "image": image(0)},
        {"prompt": "Which is a fruit? (A) car (B) pear", "answer": "pear", "image": None},
        {"prompt": "Count them.", "answer": "three", "image": image(1)},
    ]


@pytest.fixture
def blank_image() -> Image.Image:
    return Image.new("RGB", (32, 32))


def perturb(model, seed: int = 1) -> None:
    """Move trainable weights off their zero init so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def assert_backbones_in_eval(model) -> None:
    """Every module that holds a frozen parameter, and every module inside one a wrapper wraps, is in eval mode;
    every adapter-owned module (dropouts included) follows train mode."""
    owned = {id(m) for m in adapter_owned_modules(model)}
    for module_name, module in model.named_modules():
        holds_frozen = any(not p.requires_grad for p in module.parameters(recurse=False))
        if holds_frozen or id(module) not in owned:
            assert not module.training, module_name
        else:
            assert module.training, module_name
