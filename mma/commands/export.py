"""``mma export --ckpt RUN.ckpt --out DIR``: turn a Lightning training checkpoint into a shareable adapter folder.

The checkpoint is the user's own training output and is read with ``torch.load(weights_only=True)`` (plain tensors
and containers only). The backbones its recipe names are loaded once more, to check the weights fit them and to
fingerprint them; the run's ``config.yaml`` and ``metrics.csv`` next to the checkpoint go on the card.

torch and the model code are imported inside the functions that use them, so `mma export --help` answers at once.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mma.model import VisionLanguageModel

log = logging.getLogger(__name__)


def load_trainable(model: VisionLanguageModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's ``model.``-prefixed trainable weights into ``model``; names must match exactly."""
    import torch

    from mma.adapters import adapter_parameter_names
    from mma.checkpoint import check_names, refuse_non_finite

    weights = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
    expected = adapter_parameter_names(model)
    check_names(expected, set(weights), source)
    refuse_non_finite(weights, source)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in expected:
                param.copy_(weights[name])


def run_file(ckpt: Path, name: str) -> Path | None:
    """A file the run wrote next to its checkpoints (``version_N/`` holds ``checkpoints/`` and the logs)."""
    return next((folder / name for folder in (ckpt.parent, ckpt.parent.parent) if (folder / name).is_file()), None)


def run_metrics(ckpt: Path, global_step: int) -> dict[str, dict]:
    """Last value of every metric the run's CSV logger recorded up to the checkpoint's step, with that step (a
    metric logged long before the checkpoint, such as an evaluation before tuning, shows as such)."""
    path = run_file(ckpt, "metrics.csv")
    if path is None:
        return {}
    metrics = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            if step <= global_step:
                values = {k: v for k, v in row.items() if v and k not in ("epoch", "step")}
                metrics.update({k: {"value": float(v), "step": step} for k, v in values.items()})
    return dict(sorted(metrics.items()))


def export_checkpoint(
    ckpt: Path, out: Path, license: str = "unknown", overwrite: bool = False, peft_out: Path | None = None
) -> Path:
    """Rebuild the checkpoint's model, load its trainable weights and save them as an adapter folder (and, for
    LoRA, also in peft's folder format at ``peft_out``)."""
    from mma.build import build_model, model_config_from_dict
    from mma.checkpoint import check_replaceable, save_adapter
    from mma.peft_format import save_peft_lora
    from mma.resume import read_checkpoint

    for folder in filter(None, (out, peft_out)):
        check_replaceable(folder, overwrite)
    checkpoint = read_checkpoint(ckpt)
    hyper = checkpoint["hyper_parameters"]
    config = model_config_from_dict(hyper["model"])
    model = build_model(config)
    load_trainable(model, checkpoint["state_dict"], str(ckpt))
    training = {
        "checkpoint": ckpt.name,
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "hyper_parameters": {k: v for k, v in hyper.items() if k != "model"},
        "data": checkpoint.get("datamodule_hyper_parameters", {}),
        "metrics": run_metrics(ckpt, checkpoint.get("global_step", 0)),
    }
    recipe = run_file(ckpt, "config.yaml")
    if peft_out is not None:
        save_peft_lora(model, peft_out, config.llm.path, overwrite)
    return save_adapter(
        model,
        config,
        out,
        max_length=hyper.get("max_length", 512),
        training=json.loads(json.dumps(training, default=str)),
        recipe=recipe.read_text() if recipe else None,
        license=license,
        overwrite=overwrite,
    )


def export_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mma export", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by mma fit")
    parser.add_argument("--out", required=True, help="adapter folder to write (must not exist)")
    parser.add_argument("--license", default="unknown", help="licence of the adapter weights, for the card")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder an earlier export or merge wrote")
    parser.add_argument("--peft", help="LoRA only: also write the LLM's LoRA in peft's folder format here")
    args = parser.parse_args(argv)
    peft_out = Path(args.peft) if args.peft else None
    out = export_checkpoint(Path(args.ckpt), Path(args.out), args.license, args.overwrite, peft_out)
    size = sum(f.stat().st_size for f in out.iterdir())
    log.info("adapter written to %s (%.2f MB)", out, size / 1e6)
