"""``mma sweep experiments/<name>/sweep.yaml``: check every run, run the unfinished ones one after another, report.

Each run lives in ``runs/<key>/`` next to the sweep file, ``key`` being a hash of its resolved config, so a run
that finished is skipped when the sweep is started again and one that was interrupted is run again from scratch.
``results.csv``, ``results.md`` and the plots are rewritten from every run's metrics at the end.
"""

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)


@contextlib.contextmanager
def paused(progress: Progress, pause: bool) -> Iterator[None]:
    """Hide the sweep's bar while a Trainer shows its own (Rich draws one live display at a time)."""
    if pause:
        progress.stop()
    try:
        yield
    finally:
        if pause:
            progress.start()


def sweep_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mma sweep", description=__doc__)
    parser.add_argument("sweep", help="sweep file, e.g. experiments/param-table/sweep.yaml")
    args = parser.parse_args(argv)
    # Imported once the arguments parse: `mma sweep --help` answers without loading torch.
    from mma.sweep import execute, is_done, load_sweep, read_metrics, resolve_all, run_folder, write_report

    start, ran = time.perf_counter(), 0
    path = Path(args.sweep)
    spec = load_sweep(path)
    runs = resolve_all(spec)
    columns = (TextColumn("sweep {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(path.parent.name, total=len(runs))
        for run in runs:
            folder = run_folder(path.parent, run)
            if is_done(folder):
                log.info("%s: finished before, kept (%s)", run.name, folder)
            else:
                progress.update(task, description=f"{path.parent.name}: {run.name}")
                with paused(progress, spec.mode == "train"):
                    execute(run, folder, spec.mode)
                ran += 1
            progress.advance(task)
        progress.update(task, description=path.parent.name)
    table = write_report([read_metrics(run_folder(path.parent, run)) for run in runs], spec, path.parent)
    Console().print(Markdown(table))
    log.info(
        "%d runs (%d run now, %d kept) in %.0f s; results in %s",
        len(runs),
        ran,
        len(runs) - ran,
        time.perf_counter() - start,
        path.parent / "results.md",
    )
