"""Decoding image files (or their bytes) into upright RGB PIL images, with a clear error for every bad file.

Handles EXIF orientation; modes 1, L, LA, P (with or without transparency), RGBA and
other alpha modes (composited on white), CMYK, 16-bit (I;16), 32-bit integer (I) and
float (F); the first frame of animated GIF/WebP and multi-page TIFF.

Every decode has a budget (`DecodeLimits`), checked from the header before any pixel is
decoded: the pixels as stored (decompression bombs), the pixels once resized to the model's
input (a 100000x1 image would grow to 25.6 million x 256), the memory of the decoded image
and its RGB copy (16/32-bit and alpha modes cost more per pixel), and the frames an
animation declares. A file over budget is refused with an `ImageError` naming the limit;
the conversions to RGB run in strips of rows, so that none makes a whole-image copy in a
wider type (a 16-bit image is never held as float64).

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
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# Pillow's own hard limit (2 x its default MAX_IMAGE_PIXELS), about 13,000 x 13,000: large
# scans pass, a 1 KB PNG that claims 100,000 x 100,000 pixels does not.
DEFAULT_MAX_PIXELS = 178_956_970
# the image once its shorter side is resized to the model's input: 2^24 pixels (64 MB as RGB) let a
# 256-pixel resize keep panoramas up to 256:1 and refuse a 100000x1 strip (25.6 M x 256 = 6.5 G pixels)
DEFAULT_MAX_RESIZED_PIXELS = 1 << 24
# the decoded image and its RGB copy: 512 MiB takes any 8-bit photo up to 134 MP (a PNG; JPEGs
# decode at reduced scale), and refuses a 13000 x 13000 16-bit PNG of 328 KB (1 GB decoded)
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_MAX_FRAMES = 10_000  # frames an animated file may declare (only the first is decoded)
STRIP_PIXELS = 1 << 22  # conversions to RGB work on strips of rows of about this many pixels
DRAFT_MARGIN = 2  # a draft-decoded JPEG keeps a shorter side >= 2x the resize target
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: the multi-picture JPEG some cameras write

DRAFT_KEY = "visionzoo.draft"  # key in `Image.info` of the DraftInfo of a reduced-scale decode

log = logging.getLogger("visionzoo")
T = TypeVar("T")
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


@dataclass(frozen=True)
class DecodeLimits:
    """The budget of one image decode, checked from the file's header before any pixel is decoded.

    Each limit is a positive integer, or None for no limit. `DecodeLimits.parse` reads the
    command line's `--decode-limits pixels=200M,bytes=1G`.
    """

    max_pixels: int | None = DEFAULT_MAX_PIXELS  # width x height as stored (decompression bombs)
    max_resized_pixels: int | None = DEFAULT_MAX_RESIZED_PIXELS  # once resized to the model's input
    max_bytes: int | None = DEFAULT_MAX_BYTES  # memory of the decoded image and its RGB copy
    max_frames: int | None = DEFAULT_MAX_FRAMES  # frames an animated file declares

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"decode limit {f.name} must be an integer >= 1 (or None for no limit), "
                                 f"got {value!r}")

    @classmethod
    def parse(cls, text: str, base: DecodeLimits | None = None) -> DecodeLimits:
        """`"pixels=200M,resized=16M,bytes=1G,frames=100"` applied to `base` (default: the defaults).

        Values are integers with an optional k, M or G suffix (powers of 1000; KiB, MiB, GiB are
        powers of 1024); `none` or 0 lifts a limit.
        """
        changes: dict[str, int | None] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            name = LIMIT_NAMES.get(key.strip().lower())
            if not sep or name is None:
                raise InputError(f"decode limit {item!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(LIMIT_NAMES)}; e.g. --decode-limits pixels=200M,bytes=1G")
            changes[name] = _parse_count(value.strip(), key.strip())
        return replace(base or cls(), **changes)

    def describe(self) -> str:
        return ",".join(f"{key}={'none' if getattr(self, name) is None else getattr(self, name)}"
                        for key, name in LIMIT_NAMES.items())


LIMIT_NAMES = {"pixels": "max_pixels", "resized": "max_resized_pixels", "bytes": "max_bytes", "frames": "max_frames"}
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
DEFAULT_LIMITS = DecodeLimits()


def _parse_count(text: str, key: str) -> int | None:
    if text.lower() in ("none", "0"):
        return None
    number = text.rstrip("kKmMgGiIbB")
    factor = _SUFFIXES.get(text[len(number):].lower())
    try:
        value = float(number) * factor if factor is not None else None
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 1:
        raise InputError(f"decode limit {key}={text!r} is not a positive number (such as 200M, 1GiB, or none)")
    return int(value)


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `shorter`, as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shorter, int(shorter * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def load_image(path: str | os.PathLike, *, limits: DecodeLimits | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_to: int | None = None,
               resize_to: int | None = None) -> Image.Image:
    """Open `path` as an upright RGB image (EXIF orientation applied), within a decode budget.

    Args:
        limits: the budget (`DecodeLimits`), checked from the header before anything is
            decoded; default: `DecodeLimits(max_pixels=max_pixels)`.
        max_pixels: without `limits`, refuse images with more pixels than this (width x
            height as stored); None accepts any size.
        reduce_to: the shorter side the caller will resize the image to. A JPEG at least
            `2 * DRAFT_MARGIN` times larger is decoded at a reduced scale that keeps its
            shorter side >= `DRAFT_MARGIN * reduce_to` (the fast path). None decodes at
            full size (the exact path).
        resize_to: the shorter side the caller will resize the image to, for the budget's
            `max_resized_pixels` (default: `reduce_to`); None skips that check.

    Raises `ImageError` naming the file and the reason for a missing, empty, truncated,
    corrupt, over-budget or non-image file.
    """
    path, limits = _checked_file(path, limits, max_pixels)
    resize_to = resize_to if resize_to is not None else reduce_to
    return _guarded(path, path, limits, lambda source: _decode_checked(source, path, limits, reduce_to, resize_to))


def decode_image(data: bytes, name: str | os.PathLike = "<bytes>", *, limits: DecodeLimits | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_to: int | None = None,
                 resize_to: int | None = None) -> Image.Image:
    """`load_image` for an encoded image already in memory (read by Ray's readers, uploaded, ...):
    the same decoding, decode budget, fast path and errors, with `name` standing for the file in them."""
    limits = _limits(limits, max_pixels)
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    resize_to = resize_to if resize_to is not None else reduce_to
    return _guarded(io.BytesIO(data), name, limits,
                    lambda source: _decode_checked(source, name, limits, reduce_to, resize_to))


def image_from_array(array: np.ndarray, name: str | os.PathLike = "<array>", *,
                     limits: DecodeLimits | None = None, resize_to: int | None = None) -> Image.Image:
    """An RGB image from decoded pixels, as `ray.data.read_images` gives them: H x W grey (uint8, or
    16-bit, integer and float grey scaled as files of those modes are), H x W x 3 RGB or H x W x 4
    RGBA (uint8; transparency composited on white, as for files). The pixels already exist, so of
    the decode budget only the size once resized (`resize_to`) is checked."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.size == 0 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageError(name, f"not an image array (shape {tuple(arr.shape)}; expected H x W, H x W x 3 "
                         f"or H x W x 4)")
    _check_resized(name, (arr.shape[1], arr.shape[0]), limits or DEFAULT_LIMITS, resize_to)
    if arr.ndim == 2 and arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            return _gray_rgb(_SIXTEEN_TO_EIGHT[arr])
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = _value_range("F" if arr.dtype.kind == "f" else "I", float(values.min()), float(values.max()))
        return _gray_rgb(np.clip((values - low) / (high - low) * 255.0 + 0.5, 0, 255))
    if arr.dtype != np.uint8:
        raise ImageError(name, f"colour pixels must be uint8, got {arr.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def probe_image(path: str | os.PathLike, *, limits: DecodeLimits | None = None,
                resize_to: int | None = None) -> tuple[int, int]:
    """Check `path` against `limits` from its header alone (no pixel is decoded): raises the
    `ImageError` that `load_image` would raise for a missing, empty, non-image or over-budget
    file (not for a truncated one: that shows only when decoding). Returns the stored size."""
    path, limits = _checked_file(path, limits, DEFAULT_MAX_PIXELS)
    return _guarded(path, path, limits, lambda source: _probe_checked(source, path, limits, resize_to))


def _limits(limits: DecodeLimits | None, max_pixels: int | None) -> DecodeLimits:
    if max_pixels is not None and max_pixels < 1:
        raise InputError(f"max_pixels must be >= 1 (or None for no limit), got {max_pixels}")
    if limits is None:
        limits = DEFAULT_LIMITS if max_pixels == DEFAULT_MAX_PIXELS else DecodeLimits(max_pixels=max_pixels)
    return limits


def _checked_file(path: str | os.PathLike, limits: DecodeLimits | None,
                  max_pixels: int | None) -> tuple[Path, DecodeLimits]:
    path = Path(path)
    limits = _limits(limits, max_pixels)
    if not path.is_file():
        raise ImageError(path, "no such file" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    return path, limits


class BoundedFile(io.BufferedReader):
    """A file whose `read(n)` never asks for more than the file still holds.

    Pillow reads some chunks by their declared length (a PNG's IDAT, up to 4 GiB in a 200-byte
    file: found by fuzzing), and a buffered read allocates the whole length before it reads; here
    the request is cut to what is left of the file, so a lying length costs nothing.
    """

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1, /) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
            if size == 0:
                return b""
        return super().read(size)


def _guarded(source: Path | io.BytesIO, name: str | os.PathLike, limits: DecodeLimits,
             work: Callable[[io.BufferedReader | io.BytesIO], T]) -> T:
    """`work(source)` with every failure turned into an `ImageError` naming `name` and the reason.
    A path is opened as a `BoundedFile` (a `BytesIO` already reads no more than it holds)."""

    def attempt() -> T:
        if isinstance(source, io.BytesIO):
            source.seek(0)
            return _quiet(lambda: work(source))
        with BoundedFile(source) as f:
            return _quiet(lambda: work(f))

    try:
        try:
            return attempt()
        except Image.DecompressionBombError:
            # Pillow's own module-wide limit refused the file before ours could decide. When the
            # caller allows more, decode with Pillow's limit lifted to the caller's.
            if limits.max_pixels is not None and limits.max_pixels <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
                raise
            with _pillow_limit(limits.max_pixels):
                return attempt()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise ImageError(name, _too_large(None, limits.max_pixels)) from None
    except MemoryError:
        raise ImageError(name, "not enough memory to decode it; lower the decode limits (--decode-limits "
                               "bytes=...) so that such files are refused before decoding") from None
    except Exception as e:  # noqa: BLE001
        # Pillow's plugins signal corrupt data with many exception types (OSError, SyntaxError,
        # ValueError, EOFError, struct.error, IndexError, ...); every one means "this file is bad",
        # and one bad file must never stop a run over thousands.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageError(name, f"truncated or corrupt image ({reason})") from None


def _quiet(work: Callable[[], T]) -> T:
    with warnings.catch_warnings():
        # our limit governs; Pillow's warning for sizes between its two thresholds is noise here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return work()


def _probe_checked(source: io.BufferedReader | io.BytesIO, name: str | os.PathLike, limits: DecodeLimits,
                   resize_to: int | None) -> tuple[int, int]:
    with Image.open(source) as img:
        check_header(name, img, limits, resize_to)
        orientation = _orientation(img, name, decoded=False)
        _check_bytes(name, img, limits, orientation or 1)
        return img.size


def _decode_checked(source: io.BufferedReader | io.BytesIO, name: str | os.PathLike, limits: DecodeLimits,
                    reduce_to: int | None, resize_to: int | None) -> Image.Image:
    with Image.open(source) as img:
        width, height = img.size
        check_header(name, img, limits, resize_to)
        region = None
        if reduce_to is not None and img.format in _DRAFT_FORMATS:
            region = _draft(img, reduce_to)
        orientation = _orientation(img, name, decoded=False)
        _check_bytes(name, img, limits, orientation or 1)
        img.load()  # the first frame of an animation or the first page of a TIFF
        if orientation is None:  # its EXIF block follows the pixels: known only now
            orientation = _orientation(img, name, decoded=True) or 1
            _check_bytes(name, img, limits, orientation)
        orientation = _transpose(img, name, orientation)
        rgb = to_rgb(img)
        if region is not None:
            reduced = img.size if orientation in (1, 2, 3, 4) else img.size[::-1]  # as stored
            region, full = _orient(region, reduced, (width, height), orientation)
            rgb.info[DRAFT_KEY] = DraftInfo(rgb.size, region, full)
        return rgb


def check_header(path: str | os.PathLike, img: Image.Image, limits: DecodeLimits, resize_to: int | None) -> None:
    """Refuse an opened (not yet decoded) image whose header breaks `limits`: pixels as stored,
    pixels once resized so that the shorter side is `resize_to`, frames declared."""
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(path, f"the header announces an empty image ({width}x{height})")
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise ImageError(path, _too_large((width, height), limits.max_pixels))
    _check_resized(path, (width, height), limits, resize_to)
    frames = declared_frames(img)
    if limits.max_frames is not None and frames > limits.max_frames:
        raise ImageError(path, f"over the frame limit (it declares {frames:,} frames; the limit is "
                               f"{limits.max_frames:,}: --decode-limits frames=N)")


def _check_resized(name: str | os.PathLike, size: tuple[int, int], limits: DecodeLimits,
                   resize_to: int | None) -> None:
    if resize_to is None or limits.max_resized_pixels is None:
        return
    width, height = size
    new_w, new_h = resized_size(width, height, resize_to)
    if new_w * new_h > limits.max_resized_pixels:
        raise ImageError(name, f"over the resize limit ({width}x{height} would become {new_w}x{new_h} = "
                               f"{new_w * new_h:,} pixels once resized to the model's input; the limit is "
                               f"{limits.max_resized_pixels:,}: --decode-limits resized=N)")


def declared_frames(img: Image.Image) -> int:
    """The frames an opened image declares in its header (APNG, animated WebP, MPO). GIF and TIFF
    declare none: counting theirs means reading the whole file, and only the first is decoded."""
    counted_lazily = isinstance(getattr(type(img), "n_frames", None), property)
    frames = 1 if counted_lazily else getattr(img, "n_frames", 1)
    return frames if isinstance(frames, int) and frames >= 1 else 1


# bytes per pixel of Pillow's modes in memory (every other mode: 4)
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "BGR;15": 2,
                    "BGR;16": 2, "BGR;24": 3}


def decode_bytes(mode: str, size: tuple[int, int], orientation: int = 1) -> int:
    """The peak memory of decoding a `mode` image of `size` into upright RGB: the decoded pixels,
    their transposed copy for an EXIF orientation, and the RGB copy (made strip by strip from
    16/32-bit and alpha modes, so never in a wider type)."""
    stored = _BYTES_PER_PIXEL.get(mode, 4)
    per_pixel = stored
    if orientation in _ORIENTATION:
        per_pixel = max(per_pixel, 2 * stored)
    if mode != "RGB":
        per_pixel = max(per_pixel, stored + 4)  # Pillow holds RGB in 4 bytes per pixel
    return size[0] * size[1] * per_pixel


def _check_bytes(path: str | os.PathLike, img: Image.Image, limits: DecodeLimits, orientation: int) -> None:
    if limits.max_bytes is None:
        return
    need = decode_bytes(img.mode, img.size, orientation)
    if need > limits.max_bytes:
        raise ImageError(path, f"over the memory limit (decoding {img.size[0]}x{img.size[1]} in mode {img.mode} "
                               f"needs {_mib(need)}; the limit is {_mib(limits.max_bytes)}: --decode-limits bytes=N)")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _too_large(size: tuple[int, int] | None, max_pixels: int | None) -> str:
    found = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, " if size else ""
    return (f"refused as a possible decompression bomb ({found}over the limit of {max_pixels:,}); "
            f"raise the limit (--decode-limits pixels=N, --max-pixels) if you trust the file")


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
    left, top, right, bottom = result[1]
    return float(left), float(top), float(right), float(bottom)


# EXIF orientation -> the transposition that makes the image upright (as `ImageOps.exif_transpose`)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image, name: str | os.PathLike, decoded: bool) -> int | None:
    """The EXIF orientation to apply (1: none), or None for a PNG not `decoded` yet whose EXIF block
    may follow the pixels (Pillow would decode the image to find it)."""
    if not decoded and img.format == "PNG" and "exif" not in img.info:
        return None
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001
        # a malformed EXIF block does not make the pixels unusable: keep them as stored
        log.info("%s: ignoring unreadable EXIF orientation (%s)", name, e)
        return 1
    return orientation if orientation in _ORIENTATION else 1


def _transpose(img: Image.Image, name: str | os.PathLike, orientation: int) -> int:
    """Make `img` upright in place; returns the orientation applied (1: none)."""
    if orientation not in _ORIENTATION:
        return 1
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as e:  # noqa: BLE001
        log.info("%s: ignoring unreadable EXIF orientation (%s)", name, e)
        return 1
    return orientation


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
    values fit one, else their own minimum..maximum). Deep and alpha modes are converted
    in strips of rows: the only whole-image copy made is the RGB result.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _DEEP_MODES:
        return _deep_to_rgb(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode in ("P", "L", "1") and "transparency" in img.info)
    if has_alpha:
        return _strips_to_rgb(img, _composite_on_white)
    return img.convert("RGB")


_DEEP_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
# 16-bit value -> round(v / 65535 * 255) = round(v / 257), computed exactly in integers, once
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def _strips(img: Image.Image) -> list[tuple[int, int, int, int]]:
    """Boxes of whole rows covering `img`, about `STRIP_PIXELS` pixels each."""
    width, height = img.size
    rows = max(1, STRIP_PIXELS // max(width, 1))
    return [(0, top, width, min(top + rows, height)) for top in range(0, height, rows)]


def _strips_to_rgb(img: Image.Image, convert) -> Image.Image:
    out = Image.new("RGB", img.size)
    for box in _strips(img):
        out.paste(convert(img.crop(box)), box[:2])
    return out


def _composite_on_white(strip: Image.Image) -> Image.Image:
    rgba = strip.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _deep_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit (integer, float) images to RGB, through a float64 copy of one strip at a time."""
    if img.mode.startswith("I;16"):
        return _strips_to_rgb(img, lambda s: _gray_rgb(_SIXTEEN_TO_EIGHT[np.asarray(s)]))
    lo, hi = math.inf, -math.inf
    for box in _strips(img):
        arr = _finite(img.crop(box))
        if arr.size:
            lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
    low, high = _value_range(img.mode, lo, hi) if lo <= hi else (0.0, 255.0)
    return _strips_to_rgb(img, lambda s: _gray_rgb(np.clip((_finite(s) - low) / (high - low) * 255.0 + 0.5, 0, 255)))


def _finite(strip: Image.Image) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaN and infinities become 0 here, on purpose
        return np.nan_to_num(np.asarray(strip).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _value_range(mode: str, lo: float, hi: float) -> tuple[float, float]:
    """The range of values that maps to 0..255: the first standard range holding [lo, hi], else [lo, hi]."""
    if mode == "F" and lo >= 0 and hi <= 1:
        return 0.0, 1.0
    if lo >= 0 and hi <= 255:
        return 0.0, 255.0
    if lo >= 0 and hi <= 65535:
        return 0.0, 65535.0
    return lo, max(hi, lo + 1e-12)


def _gray_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
