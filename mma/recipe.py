"""Recipes: LightningCLI YAML files with ``model`` (MMAModule), ``data`` (an mma data module) and ``trainer``.

``MMACLI`` is the parser and runner the ``mma`` command uses; ``config_cli`` parses a recipe without running it,
for the commands, the sweeps and the benchmarks alike (the library never imports the command line).
"""

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

from mma.callbacks import PredictionWriter
from mma.module import MMAModule


class MMACLI(LightningCLI):
    """Recipes are LightningCLI YAML files: ``model`` (MMAModule), ``data`` (any data module), ``trainer``."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            MMAModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [RichProgressBar(leave=True), PredictionWriter()],
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            },
            args=args,
            run=run,
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        """The default Rich progress bar steps aside when the recipe turns progress bars off (Lightning refuses a
        progress bar callback with ``enable_progress_bar: false``)."""
        if config.get("enable_progress_bar") is False:
            kept = [c for c in self.trainer_defaults["callbacks"] if not isinstance(c, RichProgressBar)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": kept}
        return super()._instantiate_trainer(config, callbacks)


def config_cli(config: str, overrides: list[str] | None = None) -> MMACLI:
    """Parse and instantiate a recipe without running anything (model weights load later, in ``configure_model``)."""
    return MMACLI(args=["--config", config, *(overrides or [])], run=False)
