"""Trainable and total parameters of a model, per top-level part and per kind of adapter module."""

from collections import defaultdict

from mma.adapters.base import adapter_part, declared_adapter_params
from mma.model import VisionLanguageModel

PART_NAMES = {"llm": "LLM", "vit": "ViT", "projector": "projector", "modality_embedding": "modality embedding"}


def count_parameters(model: VisionLanguageModel) -> dict[str, tuple[int, int]]:
    """Top-level part -> (trainable, total). Shared (tied) weights count once."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        part = counts[name.split(".", 1)[0]]
        part[0] += param.numel() if param.requires_grad else 0
        part[1] += param.numel()
    return {part: (trainable, total) for part, (trainable, total) in counts.items()}


def count_by_kind(model: VisionLanguageModel) -> dict[str, int]:
    """``"<part> <kind>"`` (``"LLM prompts"``, ``"projector projection"``) -> trainable parameters."""
    counts: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        for param_name in declared_adapter_params(module):
            param = module.get_parameter(param_name)
            if param.requires_grad:
                part = PART_NAMES.get(name.split(".", 1)[0], name)
                counts[f"{part} {adapter_part(module)}"] += param.numel()
    return dict(counts)


def parts_summary(model: VisionLanguageModel) -> str:
    """One line for the start of a run: trainable / total per part, then the whole model."""
    counts = count_parameters(model)
    parts = ", ".join(f"{PART_NAMES.get(part, part)} {t:,} / {n:,}" for part, (t, n) in counts.items())
    trainable, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    return f"parameters (trainable / total): {parts}; all {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)"
