"""Lightning training checkpoints that a run resumes or evaluates from: read without running pickled code, and
the last one of a recipe's runs found."""

import pickle
from pathlib import Path

import lightning as L
import torch

from mma.errors import AdapterError, ConfigError

LAST = "last"


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by ``MMAModule``, loaded without running any pickled code."""
    if not path.is_file():
        raise AdapterError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        reason = str(err).strip().splitlines()[0]
        raise AdapterError(f"{path} is not a Lightning checkpoint of plain tensors ({reason})") from None
    hyper = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "model" not in hyper or "state_dict" not in checkpoint:
        raise AdapterError(f"{path} was not written by mma's MMAModule (no model settings or state_dict)")
    return checkpoint


def checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    """Where this recipe's runs keep ``last.ckpt``: each checkpoint callback's own folder if it has one, else
    ``checkpoints/`` in every version folder of the logger (each run gets a new one) or in the Trainer's root."""
    if trainer.loggers and getattr(trainer.loggers[0], "save_dir", None):
        logger = trainer.loggers[0]
        run_folders = sorted(Path(logger.save_dir, str(logger.name)).glob("*/checkpoints"))
    else:
        run_folders = [Path(trainer.default_root_dir, "checkpoints")]
    folders = [f for cb in trainer.checkpoint_callbacks for f in ([Path(cb.dirpath)] if cb.dirpath else run_folders)]
    return list(dict.fromkeys(folders))


def find_last_checkpoint(trainer: L.Trainer) -> Path:
    """The newest ``last.ckpt`` of the recipe's runs; none is an error (Lightning would start from scratch)."""
    folders = checkpoint_folders(trainer)
    found = [path for folder in folders for path in folder.glob("last*.ckpt")]
    if not found:
        where = ", ".join(map(str, folders)) or "no checkpoint folder (checkpointing is off)"
        raise ConfigError(f"--ckpt_path last: no last.ckpt in {where}; run without --ckpt_path to start afresh")
    return max(found, key=lambda path: path.stat().st_mtime)
