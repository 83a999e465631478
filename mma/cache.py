"""Where mma keeps what it derives once and reuses (the converted DINOv2 folder, the CLI's help texts)."""

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$MMA_CACHE``, else ``$XDG_CACHE_HOME/mma``, else ``~/.cache/mma``."""
    if os.environ.get("MMA_CACHE"):
        return Path(os.environ["MMA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mma"
