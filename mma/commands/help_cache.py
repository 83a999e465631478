"""Cached ``mma fit|validate|test|predict --help``: building LightningCLI's parser imports Lightning, torch and
transformers (about 10 s on a 2-core CPU) to print text that changes only when the code or the libraries do.

The text is stored in mma's cache folder (``mma.cache``: ``$MMA_CACHE``, else ``~/.cache/mma``), keyed by the
command, the terminal width, mma's source files and the versions of the libraries whose signatures the parser
reads. ``make`` warms it once (``python -m mma.commands.help_cache``); a stale or missing entry is rebuilt, so a
cached answer is never out of date.
"""

import contextlib
import hashlib
import importlib.metadata
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import mma
from mma.cache import default_cache_dir

# The libraries whose classes and signatures make up the parser (and so the help text).
PARSER_LIBRARIES = ("lightning", "jsonargparse", "torch", "transformers", "peft", "torchmetrics")


def help_key(command: str) -> str:
    """What the help text of ``command`` depends on: mma's sources, the parser libraries' versions, the width."""
    digest = hashlib.sha256()
    for path in sorted(Path(mma.__file__).parent.rglob("*.py")):
        digest.update(path.as_posix().encode() + path.read_bytes())
    for name in PARSER_LIBRARIES:
        digest.update(f"{name}={importlib.metadata.version(name)}".encode())
    digest.update(f"{command} {sys.version} columns={shutil.get_terminal_size().columns}".encode())
    return digest.hexdigest()[:32]


def cached_help(command: str, build: Callable[[], None]) -> str:
    """The help of ``command``: from the cache, else from ``build()`` (which prints it and exits, as argparse's
    ``--help`` does), stored atomically for the next call."""
    entry = default_cache_dir() / "help" / f"{command}-{help_key(command)}.txt"
    if entry.is_file():
        return entry.read_text()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build()
    text = out.getvalue()
    if text:
        _write_atomically(entry, text)
    return text


def _write_atomically(path: Path, text: str) -> None:
    """A reader sees the whole entry or none; a cache that cannot be written only costs speed."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)


def lightning_help(command: str) -> str:
    """``mma <command> --help`` for a Lightning command, cached."""

    def build() -> None:
        from mma.recipe import MMACLI

        MMACLI(args=[command, "--help"])

    return cached_help(command, build)


if __name__ == "__main__":  # make warms the cache once the venv is installed
    from mma.cli import LIGHTNING_COMMANDS, quiet

    quiet()
    for name in LIGHTNING_COMMANDS:
        lightning_help(name)
