"""Decoding image files (or their bytes) into upright RGB PIL images, with a clear error for every bad file.

Handles EXIF orientation; modes 1, L, LA, P (with or without transparency), RGBA and
other alpha modes (composited on white), CMYK, 16-bit (I;16), 32-bit integer (I) and
float (F); the first frame of animated GIF/WebP and multi-page TIFF; and refuses images
whose header announces more pixels than a limit (decompression bombs) before decoding.

The fast path (`reduce_to`): a JPEG much larger than the size it will be resized to is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (Pillow's draft mode), which skips
most of the decoding work. The reduced image keeps a shorter side of at least
`DRAFT_MARGIN` times the target, so the exact resize that follows still averages over
several pixels per output pixel and the result stays close to the full decode's. The
image carries a `DraftInfo` (in `img.info[DRAFT_KEY]`) with the full-size geometry, so
the resize can map exactly the same area to exactly the same output size as the full
decode would (a reduced image's last row and column cover a partial block).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# Pillow's own hard limit (2 x its default MAX_IMAGE_PIXELS), about 13,000 x 13,000: large
# scans pass, a 1 KB PNG that claims 100,000 x 100,000 pixels does not.
DEFAULT_MAX_PIXELS = 178_956_970
DRAFT_MARGIN = 2  # a draft-decoded JPEG keeps a shorter side >= 2x the resize target
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: the multi-picture JPEG some cameras write

DRAFT_KEY = "visionzoo.draft"  # key in `Image.info` of the DraftInfo of a reduced-scale decode

log = logging.getLogger("visionzoo")
_PILLOW_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class DraftInfo:
    """How a reduced-scale decode maps onto the full-size image (both upright)."""

    size: tuple[int, int]  # the reduced image's size as decoded; a resized or cropped copy no longer matches
    region: tuple[float, float, float, float]  # the box of the reduced image that covers the full image
    full_size: tuple[int, int]  # the full-size image's (width, height)


def draft_info(img: Image.Image) -> DraftInfo | None:
    """The `DraftInfo` of an image from `load_image(reduce_to=...)`, if it still applies to `img`."""
    info = img.info.get(DRAFT_KEY)
    return info if isinstance(info, DraftInfo) and info.size == img.size else None


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               reduce_to: int | None = None) -> Image.Image:
    """Open `path` as an upright RGB image (EXIF orientation applied).

    Args:
        max_pixels: refuse images with more pixels than this (width x height, read from
            the header before anything is decoded); None accepts any size.
        reduce_to: the shorter side the caller will resize the image to. A JPEG at least
            `2 * DRAFT_MARGIN` times larger is decoded at a reduced scale that keeps its
            shorter side >= `DRAFT_MARGIN * reduce_to` (the fast path). None decodes at
            full size (the exact path).

    Raises `ImageError` naming the file and the reason for a missing, empty, truncated,
    corrupt, oversized or non-image file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "no such file" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    return _decode_any(path, path, max_pixels, reduce_to)


def decode_image(data: bytes, name: str | os.PathLike = "<bytes>", *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 reduce_to: int | None = None) -> Image.Image:
    """`load_image` for an encoded image already in memory (read by Ray's readers, uploaded, ...):
    the same decoding, fast path and errors, with `name` standing for the file in them."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    return _decode_any(io.BytesIO(data), name, max_pixels, reduce_to)


def image_from_array(array: np.ndarray, name: str | os.PathLike = "<array>") -> Image.Image:
    """An RGB image from decoded pixels, as `ray.data.read_images` gives them: H x W grey (uint8, or
    16-bit, integer and float grey scaled as files of those modes are), H x W x 3 RGB or H x W x 4
    RGBA (uint8; transparency composited on white, as for files)."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.size == 0 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageError(name, f"not an image array (shape {tuple(arr.shape)}; expected H x W, H x W x 3 "
                         f"or H x W x 4)")
    if arr.ndim == 2 and arr.dtype != np.uint8:
        mode = "I;16" if arr.dtype == np.uint16 else "F" if arr.dtype.kind == "f" else "I"
        return Image.fromarray(_to_uint8(arr, mode)).convert("RGB")
    if arr.dtype != np.uint8:
        raise ImageError(name, f"colour pixels must be uint8, got {arr.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def _decode_any(source: Path | io.BytesIO, name: str | os.PathLike, max_pixels: int | None,
                reduce_to: int | None) -> Image.Image:
    if max_pixels is not None and max_pixels < 1:
        raise InputError(f"max_pixels must be >= 1 (or None for no limit), got {max_pixels}")
    try:
        try:
            return _decode(source, name, max_pixels, reduce_to)
        except Image.DecompressionBombError:
            # Pillow's own module-wide limit refused the file before ours could decide. When the
            # caller allows more, decode with Pillow's limit lifted to the caller's.
            if max_pixels is not None and max_pixels <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
                raise
            if isinstance(source, io.BytesIO):
                source.seek(0)
            with _pillow_limit(max_pixels):
                return _decode(source, name, max_pixels, reduce_to)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise ImageError(name, _too_large(None, max_pixels)) from None
    except Exception as e:  # noqa: BLE001
        # Pillow's plugins signal corrupt data with many exception types (OSError, SyntaxError,
        # ValueError, EOFError, struct.error, IndexError, ...); every one means "this file is bad",
        # and one bad file must never stop a run over thousands.
        reason = str(e) or type(e).__name__
        raise ImageError(name, f"truncated or corrupt image ({reason})") from None


def _decode(source: Path | io.BytesIO, name: str | os.PathLike, max_pixels: int | None,
            reduce_to: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # our limit governs; Pillow's warning for sizes between its two thresholds is noise here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _decode_checked(source, name, max_pixels, reduce_to)


def _decode_checked(source: Path | io.BytesIO, name: str | os.PathLike, max_pixels: int | None,
                    reduce_to: int | None) -> Image.Image:
    with Image.open(source) as img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(name, _too_large((width, height), max_pixels))
        region = None
        if reduce_to is not None and img.format in _DRAFT_FORMATS:
            region = _draft(img, reduce_to)
        img.load()  # the first frame of an animation or the first page of a TIFF
        orientation = _apply_exif_orientation(img, name)
        rgb = to_rgb(img)
        if region is not None:
            reduced = img.size if orientation in (1, 2, 3, 4) else img.size[::-1]  # as stored
            region, full = _orient(region, reduced, (width, height), orientation)
            rgb.info[DRAFT_KEY] = DraftInfo(rgb.size, region, full)
        return rgb


def _too_large(size: tuple[int, int] | None, max_pixels: int | None) -> str:
    found = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, " if size else ""
    return (f"refused as a possible decompression bomb ({found}over the limit of {max_pixels:,}); "
            f"raise the limit (max_pixels=, --max-pixels) if you trust the file")


@contextlib.contextmanager
def _pillow_limit(max_pixels: int | None):
    """Temporarily set Pillow's module-wide limit so that ours is the one that applies.

    Only reached for files beyond Pillow's hard limit when the caller raised ours; the lock
    keeps concurrent loads in this process from restoring a stale value.
    """
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _draft(img: Image.Image, reduce_to: int) -> tuple[float, float, float, float] | None:
    """Ask libjpeg for the smallest scale (1/2, 1/4, 1/8) keeping the shorter side >= margin x target.

    Returns the box of the reduced image that covers the full image (its last row and
    column may cover a partial block), or None when no reduction applies.
    """
    width, height = img.size
    need = DRAFT_MARGIN * reduce_to
    shorter = min(width, height)
    if shorter < 2 * need:  # not even a 1/2 scale would stay above the margin
        return None
    # Pillow picks the largest scale s with size // requested >= s, so the reduced image is
    # never smaller than the requested size.
    factor = need / shorter
    result = img.draft(img.mode, (max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))))
    if result is None or img.size == (width, height):
        return None
    return tuple(float(v) for v in result[1])


# EXIF orientation -> the transposition that makes the image upright (as `ImageOps.exif_transpose`)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _apply_exif_orientation(img: Image.Image, name: str | os.PathLike) -> int:
    """Make `img` upright in place; returns the EXIF orientation that was applied (1: none)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation in _ORIENTATION:
            ImageOps.exif_transpose(img, in_place=True)
            return orientation
    except Exception as e:  # noqa: BLE001
        # a malformed EXIF block does not make the pixels unusable: keep them as stored
        log.info("%s: ignoring unreadable EXIF orientation (%s)", name, e)
    return 1


def _orient(box: tuple[float, float, float, float], canvas: tuple[int, int], full: tuple[int, int],
            orientation: int) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """A box on a `canvas`-sized stored image, and the full size, after the orientation's transposition."""
    x0, y0, x1, y1 = box
    cw, ch = canvas
    if orientation in (2, 3):  # the horizontal axis is mirrored
        x0, x1 = cw - x1, cw - x0
    if orientation in (3, 4):  # the vertical axis is mirrored
        y0, y1 = ch - y1, ch - y0
    if orientation == 5:  # transpose: (x, y) -> (y, x)
        return (y0, x0, y1, x1), full[::-1]
    if orientation == 6:  # rotate 90 clockwise: (x, y) -> (ch - y, x)
        return (ch - y1, x0, ch - y0, x1), full[::-1]
    if orientation == 7:  # transverse: (x, y) -> (ch - y, cw - x)
        return (ch - y1, cw - x1, ch - y0, cw - x0), full[::-1]
    if orientation == 8:  # rotate 90 counter-clockwise: (x, y) -> (y, cw - x)
        return (y0, cw - x1, y1, cw - x0), full[::-1]
    return (x0, y0, x1, y1), full


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white.

    16-bit images map their full range (0..65535) to 0..255; 32-bit integer and float
    images are scaled from the range their values use (0..255, 0..65535 or 0..1 when the
    values fit one, else their own minimum..maximum).
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode in ("P", "L", "1") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode == "F" and lo >= 0 and hi <= 1:
            low, high = 0.0, 1.0
        elif lo >= 0 and hi <= 255:
            low, high = 0.0, 255.0
        elif lo >= 0 and hi <= 65535:
            low, high = 0.0, 65535.0
        else:
            low, high = lo, max(hi, lo + 1e-12)
    return np.clip((arr - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)
