"""The ``mma`` command: LightningCLI's fit / validate / test / predict, plus ``params``, ``demo``, ``export``,
``ask``, ``merge`` and ``sweep``."""

import importlib
import logging
import sys
import warnings

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

from mma.callbacks import PredictionWriter
from mma.errors import MMAError
from mma.module import MMAModule

log = logging.getLogger("mma")


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


# Subcommands beyond LightningCLI's own; each is ``mma.commands.<name>.<name>_command(argv)``.
SUBCOMMANDS = ("params", "demo", "export", "ask", "merge", "sweep")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Frozen backbones stay in eval mode on purpose; Lightning warns about that at every fit.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    try:
        if argv and argv[0] in SUBCOMMANDS:
            # Imported on demand: `mma params` should not pay for loading the sweep or merge machinery.
            getattr(importlib.import_module(f"mma.commands.{argv[0]}"), f"{argv[0]}_command")(argv[1:])
        else:
            MMACLI(args=argv)
    except MMAError as err:
        print(f"mma: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
