"""Shared adapters: one folder that is small, safe and says which backbones it belongs to.

``adapter_model.safetensors`` holds every trainable weight (adapters, projector, modality token) under its name in
the ``VisionLanguageModel``; ``adapter_config.json`` holds the ``ModelConfig`` that rebuilds the model (adapter
settings fully typed), the prompt layout, the backbones' identities and fingerprints, the weights file's hash and
the training record; ``README.md`` is a model card generated from it. Nothing shared is ever unpickled.

Loading checks, in order and before reading a tensor: no pickle, the config, the safetensors header, every tensor
name and shape, the file's hash, then the backbone fingerprints (the one check a caller may waive).
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from mma.adapters import adapter_parameter_names
from mma.backbones.files import read_safetensors_header
from mma.build import ModelConfig, build_model, model_config_dict, model_config_from_dict
from mma.card import adapter_card
from mma.errors import AdapterError, BackboneError, ConfigError
from mma.fingerprint import backbone_identity, check_backbones
from mma.model import VisionLanguageModel

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"
FORMAT = "mma-adapter"
FORMAT_VERSION = 1
WRITTEN_MARKER = ".mma-written"  # in every folder mma writes: what --overwrite may replace
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


@dataclass
class AdapterSource:
    """An exported adapter folder to load onto the model once its backbones are built.

    Args:
        path: folder written by ``mma export``.
        ignore_fingerprint: load even onto backbones whose fingerprint differs from the ones the adapter was
            trained on. Tensor names and shapes are always checked.
    """

    path: str
    ignore_fingerprint: bool = False


def adapter_weights(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor by its name in ``model``, detached CPU copies."""
    trainable = adapter_parameter_names(model)
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if name in trainable}


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity (one device sync for all of them)."""
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    return [name for name, ok in zip(tensors, finite, strict=True) if not ok]


def refuse_non_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """A NaN or infinite weight is never written or loaded: it would poison every output silently."""
    if bad := non_finite(tensors):
        raise AdapterError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {_listing(bad, 5)}")


def prompt_format(model: VisionLanguageModel, max_length: int) -> dict:
    """How samples become token sequences for this model: what a caller must reproduce to ask it anything."""
    return {
        "layout": model.layout.describe(),
        "modality_token": model.layout.modality_token,
        "visual_tokens": model.num_visual_tokens,
        "visual_tokens_in_sequence": model.layout.visual_in_sequence,  # False: early fusion into the adapter layers
        "image_size": list(model.tower.image_size),
        "max_length": max_length,
    }


def save_adapter(
    model: VisionLanguageModel,
    config: ModelConfig,
    out: str | Path,
    *,
    max_length: int = 512,
    training: dict | None = None,
    recipe: str | None = None,
    license: str = "unknown",
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s trainable weights, config and card into the folder ``out``, atomically.

    ``config`` must be the one ``model`` was built from; ``training`` (steps, hyper-parameters, metrics) and
    ``recipe`` (the run's YAML) describe the run on the card.
    """
    tensors = adapter_weights(model)
    refuse_non_finite(tensors, "the model to save")

    def write(folder: Path) -> None:
        (folder / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt", "mma_format": FORMAT}))
        description = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mma_version": importlib.metadata.version("mma"),
            "model": model_config_dict(config),
            "prompt_format": prompt_format(model, max_length),
            "backbones": backbone_identity(model, config),
            "weights": {
                "file": WEIGHTS_FILE,
                "sha256": file_sha256(folder / WEIGHTS_FILE),
                "bytes": (folder / WEIGHTS_FILE).stat().st_size,
                "tensors": len(tensors),
                "parameters": sum(t.numel() for t in tensors.values()),
            },
            "training": training or {},
            "license": license,
        }
        (folder / CARD_FILE).write_text(adapter_card(description, recipe))
        (folder / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")

    return write_folder_atomically(Path(out), write, overwrite, writer="mma.checkpoint.save_adapter")


def write_folder_atomically(
    out: Path, write: Callable[[Path], None], overwrite: bool = False, writer: str = "mma"
) -> Path:
    """Let ``write`` fill a hidden folder next to ``out``, then rename it to ``out``.

    An interrupted write leaves nothing at ``out`` (or the previous folder, untouched): half-written files never
    sit under the name a loader reads. The folder gets a ``.mma-written`` marker naming ``writer``; ``overwrite``
    replaces only an empty folder or one that carries the marker, never a folder of the user's own files.
    """
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    previous = staging.with_name(staging.name + "-previous")
    try:
        write(staging)
        marker = {"written_by": writer, "mma_version": importlib.metadata.version("mma")}
        (staging / WRITTEN_MARKER).write_text(json.dumps(marker) + "\n")
        _sync_files(staging)
        if out.exists():
            os.replace(out, previous)
        os.replace(staging, out)
    except BaseException:
        if previous.exists() and not out.exists():
            os.replace(previous, out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return out


def check_replaceable(out: Path, overwrite: bool) -> None:
    """``out`` is free, or ``overwrite`` is given and it is an empty folder or one that mma wrote (it has the
    marker): replacing deletes every file in it. Commands call this before loading any weights."""
    if not out.exists():
        return
    if not overwrite:
        raise ConfigError(f"{out} already exists; choose another folder or overwrite it explicitly")
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; refusing to replace it")
    if any(out.iterdir()) and not (out / WRITTEN_MARKER).is_file():
        raise ConfigError(
            f"refusing to overwrite {out}: it holds files that mma did not write (no {WRITTEN_MARKER}); "
            "--overwrite replaces only an empty folder or an earlier export or merge"
        )


def _sync_files(folder: Path) -> None:
    """Flush every file to disk before the rename makes the folder visible."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_adapter_config(path: str | Path) -> dict:
    """The parsed ``adapter_config.json`` of an adapter folder; pickles and foreign folders are refused."""
    folder = Path(path)
    refuse_pickle(folder)
    config_file = folder / CONFIG_FILE
    if not folder.is_dir() or not config_file.is_file():
        raise AdapterError(f"{folder} is not an adapter folder (no {CONFIG_FILE}); `mma export` writes one")
    try:
        saved = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise AdapterError(f"{config_file} does not describe an mma adapter (format is not {FORMAT!r})")
    if saved.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(
            f"{config_file} has format version {saved['format_version']}; this mma reads up to {FORMAT_VERSION}"
        )
    missing = [key for key in ("model", "prompt_format", "backbones", "weights") if key not in saved]
    if missing:
        raise AdapterError(f"{config_file} lacks the section(s) {missing}")
    return saved


def refuse_pickle(path: Path) -> None:
    """Refuse a pickle (by suffix or content) offered as an adapter, without opening it beyond its first bytes."""
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        suspects = [path / WEIGHTS_FILE] if _is_pickle(path / WEIGHTS_FILE) else []
    elif path.is_dir():
        suspects = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    else:
        suspects = [path] if path.is_file() and (path.suffix in PICKLE_SUFFIXES or _is_pickle(path)) else []
    if suspects:
        file = suspects[0]
        raise AdapterError(
            f"refusing to load {file}: it is a pickle file, and unpickling runs whatever code it carries, so mma "
            f"never loads one as an adapter. If you trust it, convert it once: a Lightning checkpoint from mma with "
            f"`mma export --ckpt {file} --out DIR`; other weights by loading them with torch.load(weights_only=True) "
            "into a model built from their recipe and writing it with mma.checkpoint.save_adapter"
        )


def _is_pickle(path: Path) -> bool:
    """torch.save zips (``PK``) and raw pickles (``\\x80`` + protocol 2..5) by their first bytes."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_adapter(
    model: VisionLanguageModel,
    path: str | Path,
    model_config: ModelConfig | None = None,
    ignore_fingerprint: bool = False,
) -> dict:
    """Copy an exported adapter's weights into ``model`` (built with the same method) and return its config.

    Every tensor name and shape must match the model's trainable parameters exactly; the backbones must have the
    fingerprints recorded at export unless ``ignore_fingerprint``. With ``model_config`` (what ``model`` was built
    from) the adapter and visual settings must match too.
    """
    folder = Path(path)
    saved = read_adapter_config(folder)
    if model_config is not None:
        check_same_method(saved_model_config(saved, folder), model_config, folder)
    weights = folder / WEIGHTS_FILE
    params = dict(model.named_parameters())
    expected = {name: params[name].shape for name in adapter_parameter_names(model)}
    check_tensors(weights, expected)
    if file_sha256(weights) != saved.get("weights", {}).get("sha256"):
        raise AdapterError(f"{weights} is corrupted or was changed after export (its hash differs from {CONFIG_FILE})")
    check_backbones(saved, model, model_config, folder, ignore_fingerprint)
    tensors = load_file(weights)
    refuse_non_finite(tensors, str(weights))
    with torch.no_grad():
        for name in expected:
            params[name].copy_(tensors[name])
    return saved


def load_parts(
    model: VisionLanguageModel,
    path: str | Path,
    parts: Sequence[str] = ("projector",),
    model_config: ModelConfig | None = None,
) -> dict:
    """Copy the named top-level parts (``projector``, ``modality_embedding``) of an exported adapter into ``model``
    and return the adapter's config. The model may use another adapter method: a two-stage run starts stage 2 from
    stage 1's aligned projector.

    Checked as ``load_adapter`` checks: no pickle, every tensor of those parts by name and shape, the file's hash,
    the visual settings (with ``model_config``) and the backbone fingerprints, never waived here: a projector aligned
    to other backbones maps into the wrong space.
    """
    folder = Path(path)
    saved = read_adapter_config(folder)
    params = dict(model.named_parameters())
    expected = {name: p.shape for name, p in params.items() if name.split(".")[0] in parts}
    absent = [part for part in parts if not any(name.split(".")[0] == part for name in expected)]
    if absent:
        raise AdapterError(f"cannot start from {folder}: this model has no {absent}")
    if model_config is not None:
        before, now = asdict(saved_model_config(saved, folder).visual), asdict(model_config.visual)
        if before != now:
            raise AdapterError(f"{folder} was trained with visual settings {before}, this model has {now}")
    weights = folder / WEIGHTS_FILE
    check_tensors(weights, expected, parts)
    if file_sha256(weights) != saved.get("weights", {}).get("sha256"):
        raise AdapterError(f"{weights} is corrupted or was changed after export (its hash differs from {CONFIG_FILE})")
    check_backbones(saved, model, model_config, folder, ignore_fingerprint=False)
    tensors = load_file(weights)
    with torch.no_grad():
        for name in expected:
            params[name].copy_(tensors[name])
    log.info("started %s from %s (%d tensors)", ", ".join(parts), folder, len(expected))
    return saved


def load_model(
    path: str | Path, ignore_fingerprint: bool = False, device: str | torch.device = "cpu"
) -> tuple[VisionLanguageModel, ModelConfig]:
    """Build the backbones an adapter names and load the adapter onto them (in eval mode)."""
    config = saved_model_config(read_adapter_config(path), Path(path))
    model = build_model(config, device)
    load_adapter(model, path, config, ignore_fingerprint)
    return model, config


def check_tensors(weights: Path, expected: dict[str, torch.Size], parts: Sequence[str] | None = None) -> None:
    """The header (validated, no tensor read) must name exactly the ``expected`` tensors, with their shapes; with
    ``parts``, only its tensors under those top-level modules are compared."""
    try:
        header = read_safetensors_header(weights)
    except BackboneError as err:
        raise AdapterError(str(err)) from None
    found = {name: info for name, info in header.items() if name != "__metadata__"}
    if parts is not None:
        found = {name: info for name, info in found.items() if name.split(".")[0] in parts}
    check_names(set(expected), set(found), str(weights))
    wrong = [
        f"{name} {found[name].get('shape')} (model: {list(shape)})"
        for name, shape in sorted(expected.items())
        if found[name].get("shape") != list(shape)
    ]
    if wrong:
        raise AdapterError(f"{weights}: tensor shapes differ from this model's: {_listing(wrong)}")


def check_names(expected: set[str], found: set[str], source: str) -> None:
    """Exactly the model's trainable tensors, no more, no fewer; the error lists the names on either side."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise AdapterError(
            f"{source} does not match this model's adapters: missing tensors {_listing(missing)}; "
            f"unexpected tensors {_listing(unexpected)}"
        )


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def check_same_method(saved: ModelConfig, current: ModelConfig, folder: Path) -> None:
    """The adapter method, its settings and the visual settings must be those the adapter was trained with."""
    before, now = _method_settings(saved), _method_settings(current)
    keys = sorted(before.keys() | now.keys())
    differences = [f"{k}: adapter {before.get(k)!r}, model {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]
    if differences:
        raise AdapterError(f"adapter {folder} was trained with other settings: {'; '.join(differences)}")


def _method_settings(config: ModelConfig) -> dict:
    settings = {f"adapter.{k}": v for k, v in asdict(config.adapter).items()}
    settings.update({f"visual.{k}": v for k, v in asdict(config.visual).items()})
    return {"adapter": type(config.adapter).name, **settings}


def saved_model_config(saved: dict, folder: Path) -> ModelConfig:
    """The typed ``ModelConfig`` an adapter folder's ``adapter_config.json`` records."""
    try:
        return model_config_from_dict(saved["model"])
    except ConfigError as err:
        raise AdapterError(f"{folder / CONFIG_FILE}: {err}") from None
