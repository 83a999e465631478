"""Lightning training checkpoints that a run resumes or evaluates from: read without running pickled code, the
last one of a recipe's runs found, and their settings checked against the recipe's.

LightningCLI would replace the recipe's model settings with the checkpoint's, silently dropping what the command
line changed; mma keeps the recipe's and refuses any difference except where files now are and settings that do
not change what is trained (``REPOINTABLE``).
"""

import pickle
from pathlib import Path

import lightning as L
import torch

from mma.errors import AdapterError, ConfigError

# Model settings a checkpoint may be used with changed: files that moved, and how a run is evaluated or fits in
# memory. Dotted keys below the module's hyper-parameters (``model.llm.path`` is ``--model.model.llm.path``).
REPOINTABLE = (
    "model.llm.path",
    "model.vit.weights",
    "adapter.path",
    "adapter.ignore_fingerprint",
    "max_new_tokens",
    "activation_checkpointing",
)
LAST = "last"


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by ``MMAModule``, loaded without running any pickled code."""
    if not path.is_file():
        raise AdapterError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        reason = "it holds pickled objects other than tensors and containers, and mma never runs those"
        raise AdapterError(f"{path} is not a Lightning checkpoint of plain tensors: {reason}") from None
    except (RuntimeError, EOFError, OSError) as err:  # OSError: a zip cut short
        reason = str(err).strip().splitlines()[0]
        raise AdapterError(
            f"{path} is not a Lightning checkpoint of plain tensors: truncated or corrupted ({reason})"
        ) from None
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


def _flatten(settings: dict, prefix: str = "") -> dict[str, object]:
    """Nested settings as dotted keys; an adapter's ``init_args`` level is left out of the names."""
    flat = {}
    for key, value in settings.items():
        name = prefix if key == "init_args" else f"{prefix}{key}."
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name.rstrip(".")] = list(value) if isinstance(value, tuple) else value
    return flat


def check_settings(path: Path, saved: dict, current: dict) -> None:
    """The recipe's model settings must be the checkpoint's, except the ``REPOINTABLE`` ones."""
    before, now = _flatten(saved), _flatten(current)
    changed = [
        f"--model.{key}: checkpoint {before.get(key)!r}, given {now.get(key)!r}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and not key.startswith(REPOINTABLE)
    ]
    if changed:
        more = f"; ... ({len(changed)} in all)" if len(changed) > 5 else ""
        raise ConfigError(
            f"{path} was trained with other model settings: {'; '.join(changed[:5])}{more}. Only backbone and "
            "adapter paths, max_new_tokens and activation_checkpointing may differ: use the checkpoint's recipe"
        )
