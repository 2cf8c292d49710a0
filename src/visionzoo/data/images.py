"""Decoding image files into RGB PIL images, with a clear error for every bad file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` as an upright RGB image (EXIF orientation applied).

    Raises `ImageError` naming the file and the reason for a missing, empty, truncated,
    corrupt or non-image file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "no such file" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e) or type(e).__name__
        raise ImageError(path, f"truncated or corrupt image ({reason})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 1.0 if img.mode == "F" and arr.max(initial=0) <= 1.0 else (65535.0 if arr.max(initial=0) > 255 else 255.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
