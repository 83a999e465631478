"""Reading pictures from disk with errors that name the file."""

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mma.errors import DataError


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image; a missing or undecodable file is a ``DataError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"image {str(path)!r} cannot be decoded: {err}") from None
