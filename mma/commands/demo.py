"""``mma demo``: evaluate, fine-tune and re-evaluate a recipe on the built-in task, then print what changed.

The table shows accuracy per question type before and after tuning, and after tuning with every picture blanked
(the blind control: what the model gets right without looking).
"""

import argparse
import time

from rich.console import Console
from rich.table import Table

ROWS = ("colour", "shape", "count", "position", "image", "text", "all")


def _accuracy(metrics: dict, prefix: str, row: str) -> str:
    value = metrics.get(f"{prefix}/{row}")
    return "-" if value is None or value != value else f"{100 * float(value):.1f}"


def demo_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mma demo", description=__doc__)
    parser.add_argument("--config", default="recipes/demo.yaml", help="recipe YAML (default: %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    # Imported once the arguments parse: `mma demo --help` answers without loading torch.
    from mma.parameters import count_parameters
    from mma.recipe import config_cli

    start = time.perf_counter()
    cli = config_cli(args.config, overrides)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    module.configure_model()
    before = trainer.test(module, datamodule=data, verbose=False)
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - fit_start
    after = trainer.test(module, datamodule=data, verbose=False)
    before, after = ({k: v for d in results for k, v in d.items()} for results in (before, after))

    table = Table(
        title=f"mma demo: {type(module.model_config.adapter).name} on the built-in visual QA task (accuracy, %)"
    )
    for column in ("questions", "before tuning", "after tuning", "blind control (blank images)"):
        table.add_column(column, justify="left" if column == "questions" else "right")
    for row in ROWS:
        table.add_row(
            row, _accuracy(before, "test", row), _accuracy(after, "test", row), _accuracy(after, "blind", row)
        )
    trainable = sum(t for t, _ in count_parameters(module.model).values())
    total = sum(n for _, n in count_parameters(module.model).values())
    console = Console()
    console.print(table)
    console.print(
        f"chance: 33.3%   trainable parameters: {trainable:,} of {total:,}   "
        f"optimizer steps: {trainer.global_step}   training: {fit_seconds:.0f} s   "
        f"wall time: {time.perf_counter() - start:.0f} s"
    )
