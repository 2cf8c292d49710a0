"""Optical flow data: the Middlebury colour coding, `.flo` / `.npy` flow files, and frame padding.

The colour coding and the `.flo` format are those of Baker et al., "A Database and Evaluation
Methodology for Optical Flow" (ICCV 2007), the conventions every flow benchmark and viewer uses:
the direction of a flow vector is the hue on a 55-step colour wheel (red, yellow, green, cyan,
blue, magenta), its magnitude the saturation, white for no motion.

Flow fields are (2, H, W) arrays, channel 0 the horizontal component (pixels to the right),
channel 1 the vertical one (pixels down), the layout models return per image. Colour images are
(H, W, 3) uint8 arrays.
"""
from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..fileutil import atomic_path

FLO_MAGIC = 202021.25  # the float32 that opens every .flo file ("PIEH" in ASCII)
FLOW_SUFFIXES = (".flo", ".npy")
# the same budget as images get (about 13,000 x 13,000): a 12-byte header cannot make us allocate more
MAX_FLOW_PIXELS = 178_956_970
_FLO_HEADER = struct.Struct("<fii")

# The wheel's key colours and the number of steps from each to the next (the Middlebury code's
# RY, YG, GC, CB, BM, MR): finer where the eye tells hues apart best.
_WHEEL_KEYS = ((255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 0, 255))
_WHEEL_STEPS = (15, 6, 4, 11, 13, 6)


def _make_wheel() -> np.ndarray:
    rows = []
    for i, steps in enumerate(_WHEEL_STEPS):
        start = np.array(_WHEEL_KEYS[i], dtype=np.float64)
        end = np.array(_WHEEL_KEYS[(i + 1) % len(_WHEEL_KEYS)], dtype=np.float64)
        for k in range(steps):
            # the reference code floors the rising channel and subtracts the floor from the falling one
            rise = math.floor(255 * k / steps) / 255
            rows.append(np.where(end > start, start + (end - start) * rise, start - (start - end) * rise))
    return np.stack(rows) / 255


_WHEEL = _make_wheel()  # (55, 3) in [0, 1]


def _as_flow_array(flow: torch.Tensor | np.ndarray, what: str = "flow") -> np.ndarray:
    if isinstance(flow, torch.Tensor):
        flow = flow.detach().cpu().double().numpy()
    flow = np.asarray(flow)
    if flow.ndim not in (3, 4) or flow.shape[-3] != 2:
        raise InputError(f"{what} must have shape (2, H, W) or (N, 2, H, W), got {flow.shape}")
    if not np.issubdtype(flow.dtype, np.floating):
        raise InputError(f"{what} must hold floating-point values, got {flow.dtype}")
    return flow.astype(np.float64, copy=False)


def flow_to_color(flow: torch.Tensor | np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """The Middlebury colour image of a flow field: (2, H, W) -> (H, W, 3) uint8, (N, 2, H, W) -> (N, H, W, 3).

    Magnitudes are divided by `max_magnitude` (in pixels), by default each image's largest finite
    magnitude; pass one value to colour the frames of a video alike. Vectors longer than it keep their
    hue, at full saturation and darkened by a quarter. Non-finite vectors (unknown flow) are black.
    """
    flow = _as_flow_array(flow)
    if flow.ndim == 4:
        out = np.empty((*flow.shape[:1], *flow.shape[2:], 3), dtype=np.uint8)
        for i, field in enumerate(flow):
            out[i] = flow_to_color(field, max_magnitude)
        return out
    if max_magnitude is not None and not (isinstance(max_magnitude, (int, float, np.floating, np.integer))
                                          and not isinstance(max_magnitude, bool)
                                          and 0 < max_magnitude < math.inf):
        raise InputError(f"max_magnitude must be a positive number of pixels, got {max_magnitude!r}")
    u, v = flow
    with np.errstate(over="ignore", invalid="ignore"):
        known = np.isfinite(np.hypot(u, v))  # NaN, infinite or overflowing vectors: unknown flow
    u, v = np.where(known, u, 0.0), np.where(known, v, 0.0)
    magnitude = np.hypot(u, v)
    if max_magnitude is None:
        max_magnitude = float(magnitude.max()) if magnitude.size else 0.0
    radius = magnitude / max_magnitude if max_magnitude > 0 else np.zeros_like(magnitude)

    # position on the wheel: the direction's angle mapped onto the 54 intervals between its 55 colours
    n = len(_WHEEL)
    position = (np.arctan2(-v, -u) / np.pi + 1) / 2 * (n - 1)
    k0 = np.floor(position).astype(np.int64)
    k1 = (k0 + 1) % n
    frac = (position - k0)[..., None]
    color = (1 - frac) * _WHEEL[k0] + frac * _WHEEL[k1]

    inside = (radius <= 1)[..., None]
    # saturation grows with the magnitude from white; vectors beyond the scale are darkened instead
    color = np.where(inside, 1 - radius[..., None] * (1 - color), color * 0.75)
    color = np.where(known[..., None], color, 0.0)
    return np.floor(255 * color).astype(np.uint8)


def color_wheel_legend(size: int = 151) -> np.ndarray:
    """(size, size, 3) uint8: the colour of every flow vector from the centre, up to the radius, on white.

    The legend for `flow_to_color`: a pixel at offset (dx, dy) from the centre shows the colour of
    the flow (dx, dy) when the image is scaled by the radius.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 3:
        raise InputError(f"legend size must be an integer >= 3 pixels, got {size!r}")
    centre = (size - 1) / 2
    offsets = np.arange(size, dtype=np.float64) - centre
    flow = np.stack([np.broadcast_to(offsets[None, :], (size, size)), np.broadcast_to(offsets[:, None], (size, size))])
    image = flow_to_color(flow, max_magnitude=centre)
    image[np.hypot(flow[0], flow[1]) > centre] = 255
    return image


def _write_atomic(path: Path, write) -> None:
    # a half-written flow file must never replace a good one: write beside it, then rename
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _single_flow(flow: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = _as_flow_array(flow)
    if arr.ndim != 3:
        raise InputError(f"a flow file holds one field (2, H, W); got a batch {arr.shape}, write each field")
    return arr


def write_flo(path: str | os.PathLike, flow: torch.Tensor | np.ndarray) -> Path:
    """Write a (2, H, W) flow field as a Middlebury `.flo` file (float32, u and v interleaved)."""
    path = Path(path)
    arr = _single_flow(flow)
    _, h, w = arr.shape
    data = np.ascontiguousarray(arr.transpose(1, 2, 0), dtype="<f4")

    def write(f) -> None:
        f.write(_FLO_HEADER.pack(FLO_MAGIC, w, h))
        f.write(data.tobytes())

    _write_atomic(path, write)
    return path


def read_flo(path: str | os.PathLike, max_pixels: int = MAX_FLOW_PIXELS) -> np.ndarray:
    """Read a Middlebury `.flo` file as a (2, H, W) float32 array.

    The header is checked before anything is allocated: the magic number, positive sizes of at most
    `max_pixels` pixels, and a file length that is exactly what they announce (a truncated file or
    one with trailing bytes is refused).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            length = os.fstat(f.fileno()).st_size
            header = f.read(_FLO_HEADER.size)
            if len(header) < _FLO_HEADER.size:
                raise InputError(f"{path}: not a .flo file ({length} bytes, shorter than the 12-byte header)")
            magic, w, h = _FLO_HEADER.unpack(header)
            if magic != np.float32(FLO_MAGIC):
                raise InputError(f"{path}: not a .flo file (magic number {magic!r}, expected {FLO_MAGIC})")
            if w <= 0 or h <= 0 or w * h > max_pixels:
                raise InputError(f"{path}: .flo header announces {w}x{h} pixels (WxH), outside 1..{max_pixels} "
                                 "pixels; the file is corrupt (or raise max_pixels)")
            expected = _FLO_HEADER.size + 8 * w * h
            if length != expected:
                state = "truncated" if length < expected else "followed by extra bytes"
                raise InputError(f"{path}: .flo data is {state} ({length} bytes, {w}x{h} pixels need {expected}); "
                                 "the file is damaged, write it again")
            data = np.fromfile(f, dtype="<f4", count=2 * w * h)
    except OSError as e:
        raise InputError(f"{path}: cannot read the flow file ({e.strerror or e}); check the path") from e
    if data.size != 2 * w * h:
        raise InputError(f"{path}: .flo data ended early; the file is damaged, write it again")
    return np.ascontiguousarray(data.reshape(h, w, 2).transpose(2, 0, 1), dtype=np.float32)


def save_flow(path: str | os.PathLike, flow: torch.Tensor | np.ndarray) -> Path:
    """Write a (2, H, W) flow field as `.flo` or `.npy` (float32, (2, H, W)), chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".flo":
        return write_flo(path, flow)
    if suffix == ".npy":
        data = _single_flow(flow).astype(np.float32)
        _write_atomic(path, lambda f: np.save(f, data, allow_pickle=False))
        return path
    raise InputError(f"{path}: unknown flow file type {suffix!r}; use one of: {', '.join(FLOW_SUFFIXES)}")


def load_flow(path: str | os.PathLike, max_pixels: int = MAX_FLOW_PIXELS) -> np.ndarray:
    """Read a `.flo` or `.npy` flow file (by suffix) as a (2, H, W) float32 array."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".flo":
        return read_flo(path, max_pixels)
    if suffix != ".npy":
        raise InputError(f"{path}: unknown flow file type {suffix!r}; use one of: {', '.join(FLOW_SUFFIXES)}")
    try:
        # memory-mapped first: the header's shape is checked before the data is read
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy flow file ({e}); check the path") from e
    if arr.ndim != 3 or arr.shape[0] != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{path}: a .npy flow file holds a (2, H, W) float array, this one {arr.shape} {arr.dtype}")
    if arr.shape[1] * arr.shape[2] > max_pixels:
        raise InputError(f"{path}: flow of {arr.shape[2]}x{arr.shape[1]} pixels (WxH) is over {max_pixels} pixels; "
                         "raise max_pixels if it is meant")
    return np.array(arr, dtype=np.float32)


@dataclass(frozen=True)
class Padding:
    """Pixels added on each side by `pad_to_multiple`, what `crop_padding` removes again."""

    top: int
    bottom: int
    left: int
    right: int


def pad_to_multiple(images: Sequence[torch.Tensor], multiple: int = 8,
                    min_size: int = 0) -> tuple[list[torch.Tensor], Padding]:
    """Pad frames of one size ((C, H, W) or (N, C, H, W)) so both sides are multiples of `multiple`
    (and at least `min_size`), repeating the edge pixels, the padding split evenly (the odd pixel at the
    bottom / right). Returns the padded frames and the `Padding` that `crop_padding` removes from the flow.
    """
    if isinstance(images, torch.Tensor):
        raise InputError("pad_to_multiple takes a sequence of frames, e.g. [frame1, frame2]")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise InputError(f"multiple must be an integer >= 1, got {multiple!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise InputError(f"min_size must be an integer >= 0, got {min_size!r}")
    images = list(images)
    if not images:
        raise InputError("pad_to_multiple needs at least one frame")
    for img in images:
        if not isinstance(img, torch.Tensor) or img.ndim not in (3, 4):
            raise InputError(f"frames must be tensors (C, H, W) or (N, C, H, W), got {_describe(img)}")
    size = tuple(images[0].shape[-2:])
    if any(tuple(img.shape[-2:]) != size for img in images):
        raise InputError(f"frames have different sizes {[tuple(i.shape[-2:]) for i in images]}; resize them alike")
    h, w = size
    if h < 1 or w < 1:
        raise InputError(f"frames of size {h}x{w} (HxW) are empty")
    pad_h = _padded_length(h, multiple, min_size) - h
    pad_w = _padded_length(w, multiple, min_size) - w
    pads = Padding(pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
    if not pad_h and not pad_w:
        return images, pads
    padded = []
    for img in images:
        # F.pad's replicate mode wants a batch dimension
        batch = img if img.ndim == 4 else img[None]
        out = F.pad(batch, (pads.left, pads.right, pads.top, pads.bottom), mode="replicate")
        padded.append(out if img.ndim == 4 else out[0])
    return padded, pads


def _padded_length(length: int, multiple: int, min_size: int) -> int:
    target = max(length, min_size)
    return -(-target // multiple) * multiple


def _describe(obj: object) -> str:
    return f"shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__


def crop_padding(flow: torch.Tensor | np.ndarray, pads: Padding) -> torch.Tensor | np.ndarray:
    """Remove `pad_to_multiple`'s padding from a flow field (or anything with H, W last)."""
    h, w = flow.shape[-2:]
    if pads.top + pads.bottom >= h or pads.left + pads.right >= w:
        raise InputError(f"flow of size {h}x{w} (HxW) is smaller than the padding {pads}; "
                         "crop the flow computed from the padded frames")
    return flow[..., pads.top:h - pads.bottom, pads.left:w - pads.right]
