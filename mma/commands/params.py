"""``mma params --config RECIPE``: trainable and total parameters per part, counted on the meta device."""

import argparse

from rich.console import Console
from rich.table import Table


def params_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mma params", description=__doc__)
    parser.add_argument("--config", required=True, help="recipe YAML")
    args, overrides = parser.parse_known_args(argv)
    # Imported once the arguments parse: `mma params --help` answers without loading torch.
    from mma.build import build_model
    from mma.parameters import PART_NAMES, count_by_kind, count_parameters
    from mma.recipe import config_cli

    config = config_cli(args.config, overrides).model.model_config
    model = build_model(config, device="meta")
    counts = count_parameters(model)
    table = Table(title=f"parameters of {args.config} (adapter: {type(config.adapter).name})")
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
