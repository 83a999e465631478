"""Recipes: LightningCLI YAML files with ``model`` (MMAModule), ``data`` (an mma data module) and ``trainer``.

``MMACLI`` is the parser and runner the ``mma`` command uses; ``config_cli`` parses a recipe without running it,
for the commands, the sweeps and the benchmarks alike (the library never imports the command line).
"""

import logging
from pathlib import Path

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mma.callbacks import LastCheckpoint, PartsSummary, PredictionWriter
from mma.errors import ConfigError, MMAError
from mma.module import MMAModule
from mma.resume import LAST, check_settings, find_last_checkpoint, read_checkpoint

log = logging.getLogger(__name__)

# Parse errors raise (``ConfigError``, one line) instead of printing the whole usage first.
_RAISE = {"exit_on_error": False}
# Lines of a jsonargparse union error that list the alternatives nobody meant (``Expected a <class 'bool'>``).
_UNION_NOISE = ("Does not validate against any of the Union", "Subtypes:", "Errors:", "Given value", "- Expected")


def one_line(message: str) -> str:
    """jsonargparse's nested error message on one line, without a union's unmeant alternatives and repeats."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(_UNION_NOISE)]
    return " ".join(dict.fromkeys(kept if len(kept) > 1 else lines))


def check_recipes_are_text(args: list[str]) -> None:
    """jsonargparse lets a binary recipe's ``UnicodeDecodeError`` escape as a trace; name the file instead."""
    given = [value for flag, value in zip(args, args[1:], strict=False) if flag in ("-c", "--config")]
    given += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    for recipe in filter(lambda value: Path(value).is_file(), given):
        try:
            Path(recipe).read_text()
        except UnicodeDecodeError as err:
            raise ConfigError(f"recipe {recipe} is not a YAML text file ({err.reason} at byte {err.start})") from None


def user_error(err: BaseException) -> MMAError | None:
    """The ``MMAError`` that caused ``err``, if one did."""
    while err is not None and not isinstance(err, MMAError):
        err = err.__cause__ or err.__context__
    return err


class MMACLI(LightningCLI):
    """Recipes are LightningCLI YAML files: ``model`` (MMAModule), ``data`` (any data module), ``trainer``."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            MMAModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [RichProgressBar(leave=True), PredictionWriter(), PartsSummary()],
                "enable_model_summary": False,  # PartsSummary's line instead
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
                "default_root_dir": "runs",  # git-ignored; with `logger: false` too, nothing lands in the cwd
                # mma's samplers place every rank (EpochSampler shards training, each process evaluates the whole
                # set); Lightning could not rebuild the evaluation's LengthBudgetBatchSampler around one of its own.
                "use_distributed_sampler": False,
            },
            parser_kwargs={"prog": "mma", **_RAISE, **{command: _RAISE for command in LightningCLI.subcommands()}},
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        """A parse error is one ``ConfigError``: jsonargparse's message and where the options are listed."""
        check_recipes_are_text(args or [])
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            command = next((a for a in args or [] if a in self.subcommands()), "fit")
            raise ConfigError(f"{one_line(str(err))} (see mma {command} --help)") from None

    def instantiate_classes(self) -> None:
        """A setting's own range check (``ConfigError`` in ``__post_init__`` or ``__init__``) reaches the user as
        itself, not inside jsonargparse's union error."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = user_error(err)
            if cause is None:
                raise
            raise cause from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``checkpoint``: the ``last.ckpt`` every recipe writes (``--checkpoint.every_n_train_steps N``)."""
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        """The default Rich progress bar steps aside when the recipe turns progress bars off, and the checkpoint
        callback when it turns checkpointing off (Lightning refuses either callback then)."""
        if config.get("enable_progress_bar") is False:
            kept = [c for c in self.trainer_defaults["callbacks"] if not isinstance(c, RichProgressBar)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": kept}
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, LastCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Lightning would replace the model settings with the checkpoint's here, silently dropping what the
        command line changed; ``after_instantiate_classes`` checks them against the checkpoint instead."""

    def after_instantiate_classes(self) -> None:
        """Resolve ``--ckpt_path last``, read the checkpoint safely and check its model settings, all before any
        weight loads; evaluating without trained weights is said out loud."""
        if self.subcommand is None:
            return
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is None:
            if self.subcommand != "fit" and self.model.adapter_source is None:
                log.warning("mma %s: no --ckpt_path and no model.adapter: the adapters are untrained", self.subcommand)
            return
        path = find_last_checkpoint(self.trainer) if config.ckpt_path == LAST else Path(config.ckpt_path)
        check_settings(path, read_checkpoint(path)["hyper_parameters"], dict(self.model.hparams))
        config.ckpt_path = str(path)
        log.info("%s from %s", "resuming" if self.subcommand == "fit" else "weights", path)


def config_cli(config: str, overrides: list[str] | None = None) -> MMACLI:
    """Parse and instantiate a recipe without running anything (model weights load later, in ``configure_model``)."""
    return MMACLI(args=["--config", config, *(overrides or [])], run=False)
