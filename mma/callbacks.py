"""Callbacks the CLI installs by default."""

import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint

from mma.errors import ConfigError
from mma.parameters import parts_summary

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` every ``every_n_train_steps`` optimizer steps and when training ends: what
    ``mma fit --ckpt_path last`` resumes from, so a killed run loses at most that many steps.

    Args:
        every_n_train_steps: optimizer steps between saves; recipes set it to a few minutes of their training.
        dirpath: folder of ``last.ckpt``; by default ``checkpoints/`` in the run's folder (the logger's version).
    """

    def __init__(self, every_n_train_steps: int = 50, dirpath: str | None = None) -> None:
        if every_n_train_steps < 1:
            raise ConfigError(f"checkpoint.every_n_train_steps={every_n_train_steps} must be at least 1")
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,  # one last.ckpt per folder, replaced each time
        )

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """The steps after the last multiple of ``every_n_train_steps`` too: ``mma test`` sees the final weights."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore (it keeps no best-k list), and a resumed run writes into its own run folder."""


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.jsonl`` (one generated answer per line, with the sample's ids) into the run folder."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer: L.Trainer, module: L.LightningModule, predictions, batch_indices) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "predictions.jsonl"
        with path.open("w") as f:
            for batch in predictions:
                for row in batch:
                    f.write(json.dumps(row) + "\n")
        log.info("predictions: %s", path)


class PartsSummary(L.Callback):
    """The trimmed model summary: one line of trainable / total parameters per part when fitting starts, in place
    of Lightning's table of every top-level module (``--trainer.enable_model_summary true`` brings that back)."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info(parts_summary(module.model))
