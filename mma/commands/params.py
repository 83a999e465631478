"""``mma params --config RECIPE``: trainable and total parameters per part, counted on the meta device."""

import argparse
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from mma.build import build_model
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


def params_command(argv: list[str]) -> None:
    from mma.cli import config_cli

    parser = argparse.ArgumentParser(prog="mma params", description=__doc__)
    parser.add_argument("--config", required=True, help="recipe YAML")
    args, overrides = parser.parse_known_args(argv)
    module = config_cli(args.config, overrides).model
    counts = count_parameters(build_model(module.model_config, device="meta"))
    table = Table(title=f"parameters of {args.config} (adapter: {module.model_config.adapter})")
    for column in ("part", "trainable", "total"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, (trainable, total) in counts.items():
        table.add_row(PART_NAMES.get(part, part), f"{trainable:,}", f"{total:,}")
    trainable, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    table.add_row("all", f"{trainable:,}", f"{total:,}", style="bold")
    Console().print(table)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
