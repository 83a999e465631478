"""One run of a sweep in its own folder: resolved config, metrics, exported adapter, and a done marker last.

A folder without the marker is an interrupted run: it is cleared and run again. The marker is written only after
everything else, so a run that stops at any point before it is never taken for finished.
"""

import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden

from mma.build import build_model
from mma.checkpoint import save_adapter
from mma.module import MMAModule
from mma.parameters import count_parameters
from mma.sweep.spec import Run, parse, quiet_lightning

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
DONE_FILE = "done"


class StepTimer(Callback):
    """Wall time of every training batch: forward, backward and optimizer step, data loading excluded."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        _synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        _synchronize()
        self.seconds.append(time.perf_counter() - self._start)

    def median(self) -> float:
        """Median step time after the first tenth of the steps (at least one), which warm caches up."""
        skip = max(1, len(self.seconds) // 10) if len(self.seconds) > 1 else 0
        return statistics.median(self.seconds[skip:]) if self.seconds else float("nan")


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator statistics and, on Linux, the process's peak resident set size."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_memory() -> dict[str, float]:
    """Peak CUDA memory allocated and peak resident set size since ``reset_peak_memory``, in MiB, where known."""
    peaks = {}
    if torch.cuda.is_available():
        peaks["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        line = next((line for line in status.read_text().splitlines() if line.startswith("VmHWM:")), None)
        if line is not None:
            peaks["peak_rss_mib"] = int(line.split()[1]) / 1024
    return peaks


def run_folder(root: Path, run: Run) -> Path:
    return root / "runs" / run.key


def is_done(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file()


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / METRICS_FILE).read_text())


def location_args(run: Run, folder: Path) -> list[str]:
    """Options that point the run's Trainer and its logger (when it has a ``save_dir``) into ``folder``."""
    args = [f"--trainer.default_root_dir={folder}"]
    logger = run.config["trainer"].get("logger")
    if isinstance(logger, dict) and "save_dir" in logger.get("init_args", {}):
        args.append(f"--trainer.logger.init_args.save_dir={folder}")
    return args


def parameter_metrics(counts: dict[str, tuple[int, int]]) -> dict:
    """Trainable and total parameters, overall and trainable per top-level part."""
    trainable, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    parts = {f"trainable/{part}": n for part, (n, _) in counts.items()}
    return {"trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total, **parts}


def count(run: Run, folder: Path) -> dict:
    """Parameter counts of the run's model, built on the meta device (no weights allocated, nothing trained)."""
    with quiet_lightning():
        module = parse(run.recipe, [*run.args, *location_args(run, folder)]).model
    return parameter_metrics(count_parameters(build_model(module.model_config, device="meta")))


def train(run: Run, folder: Path) -> dict:
    """Fit with the recipe's Trainer, test when the data has a test set, export the adapter; return the metrics."""
    cli = parse(run.recipe, [*run.args, *location_args(run, folder)])
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    timer = StepTimer()
    trainer.callbacks.append(timer)
    reset_peak_memory()
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    metrics = {"fit_seconds": time.perf_counter() - start, "steps": trainer.global_step, **peak_memory()}
    metrics["step_time_s"] = timer.median()
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if is_overridden("test_dataloader", data, LightningDataModule):
        for results in trainer.test(module, datamodule=data, verbose=False):
            metrics.update(results)
    metrics.update(parameter_metrics(count_parameters(module.model)))
    recipe = (folder / CONFIG_FILE).read_text()
    training = training_record(module, data, trainer.global_step, trainer.current_epoch, metrics)
    out = folder / ADAPTER_DIR
    save_adapter(
        module.model, module.model_config, out, max_length=module.hparams.max_length, training=training, recipe=recipe
    )
    return metrics


def training_record(module: MMAModule, data: LightningDataModule, step: int, epoch: int, metrics: dict) -> dict:
    """The run as an adapter card describes it (the layout ``mma export`` writes), as plain JSON data."""
    record = {
        "global_step": step,
        "epoch": epoch,
        "hyper_parameters": {k: v for k, v in module.hparams.items() if k != "model"},
        "data": dict(data.hparams),
        "metrics": {k: {"value": v, "step": step} for k, v in metrics.items() if isinstance(v, int | float)},
    }
    return json.loads(json.dumps(record, default=str))


def execute(run: Run, folder: Path, mode: str) -> dict:
    """Run ``run`` from scratch in ``folder`` (an interrupted attempt there is cleared first); return its row."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(run.config, sort_keys=False))
    metrics = {"name": run.name, "key": run.key, "recipe": run.recipe}
    if run.seed is not None:
        metrics.update(run=run.group, seed=run.seed)
    metrics.update(count(run, folder) if mode == "params" else train(run, folder))
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    (folder / DONE_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return metrics
