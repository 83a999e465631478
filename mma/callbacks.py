"""Callbacks the CLI installs by default."""

import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


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
