"""``mma demo``: evaluate, fine-tune and re-evaluate a recipe, then print what changed.

The table shows accuracy per question group before and after tuning, after tuning with every picture blanked
(the blind control: what the model gets right without looking, where the data has one) and chance (the mean of
1 / options).
"""

import argparse
import time

from rich.console import Console
from rich.table import Table


def _accuracy(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None or value != value else f"{100 * float(value):.1f}"


def demo_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mma demo", description=__doc__)
    parser.add_argument("--config", default="recipes/easy-vqa-demo.yaml", help="recipe YAML (default: %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    # Imported once the arguments parse: `mma demo --help` answers without loading torch.
    from mma.parameters import count_parameters
    from mma.recipe import config_cli

    start = time.perf_counter()
    cli = config_cli(args.config, overrides)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    module.configure_model()
    data.with_controls = False  # the untuned model's blind control says nothing; one pass fewer
    before = trainer.test(module, datamodule=data, verbose=False)
    data.with_controls = True
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - fit_start
    after = trainer.test(module, datamodule=data, verbose=False)
    before, after = ({k: v for d in results for k, v in d.items()} for results in (before, after))

    evaluation = data.evaluation()
    test, blind = evaluation.test_names[0], "blind" if "blind" in evaluation.test_names else None
    method = type(module.model_config.adapter).name
    table = Table(title=f"mma demo: {method} on {type(data).__name__} (accuracy, %)")
    columns = ["questions", "before tuning", "after tuning", "blind control (blank images)", "chance"]
    for column in columns if blind else [c for c in columns if not c.startswith("blind")]:
        table.add_column(column, justify="left" if column == "questions" else "right")
    for group in evaluation.groups:
        cells = [_accuracy(before, f"{test}/{group}"), _accuracy(after, f"{test}/{group}")]
        cells += [_accuracy(after, f"{blind}/{group}")] if blind else []
        table.add_row(group, *cells, _accuracy(after, f"{test}/chance/{group}"))
    counts = count_parameters(module.model).values()
    trainable, total = sum(t for t, _ in counts), sum(n for _, n in counts)
    console = Console()
    console.print(table)
    console.print(
        f"trainable parameters: {trainable:,} of {total:,}   optimizer steps: {trainer.global_step}   "
        f"training: {fit_seconds:.0f} s   wall time: {time.perf_counter() - start:.0f} s"
    )
