"""``mma params --config RECIPE``: trainable and total parameters per part, counted on the meta device."""

import argparse
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from mma.adapters.base import adapter_part, declared_adapter_params
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


def params_command(argv: list[str]) -> None:
    from mma.cli import config_cli

    parser = argparse.ArgumentParser(prog="mma params", description=__doc__)
    parser.add_argument("--config", required=True, help="recipe YAML")
    args, overrides = parser.parse_known_args(argv)
    module = config_cli(args.config, overrides).model
    model = build_model(module.model_config, device="meta")
    counts = count_parameters(model)
    table = Table(title=f"parameters of {args.config} (adapter: {module.model_config.adapter})")
    for column in ("part", "trainable", "total"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, (trainable, total) in counts.items():
        table.add_row(PART_NAMES.get(part, part), f"{trainable:,}", f"{total:,}")
    trainable, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    table.add_row("all", f"{trainable:,}", f"{total:,}", style="bold")
    kinds = Table(title="trainable parameters by kind")
    for column in ("kind", "trainable"):
        kinds.add_column(column, justify="left" if column == "kind" else "right")
    for kind, count in count_by_kind(model).items():
        kinds.add_row(kind, f"{count:,}")
    console = Console()
    console.print(table)
    console.print(kinds)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
