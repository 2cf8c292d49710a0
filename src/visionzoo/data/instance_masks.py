"""Instance masks of COCO annotations: read, checked, kept run-length encoded, decoded within limits.

A COCO annotation's `segmentation` is a list of polygons (`[[x1, y1, x2, y2, ...], ...]` in
pixels), an uncompressed run-length encoding (`{"size": [height, width], "counts": [ints]}`)
or a compressed one (`counts` a string, as pycocotools writes it). Each is checked (a polygon of
at least three finite points near the image, an encoding of the image's size whose runs cover
it exactly, a mask that is not empty) and kept as compressed RLE, `(height, width, counts)`: a
few hundred bytes a mask, whatever the image size. Masks are decoded to (N, H, W) uint8 only
when an image is loaded, refused beyond the decode limits' byte budget. pycocotools (the
`detection` extra) converts polygons and encodes masks.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..optional import require
from .images import DEFAULT_LIMITS, DecodeLimits

MaskRLE = tuple[int, int, str]  # (height, width, counts): COCO's compressed run-length encoding
MASK_THRESHOLD = 0.5  # a pixel belongs to an instance where its mask probability reaches this
EDGE_TOLERANCE = 1.0  # pixels a polygon's points may reach beyond the image (as for boxes)


def read_segmentation(seg: Any, size: tuple[int, int], where: str) -> MaskRLE:
    """The annotation's `segmentation` (polygons or RLE) for an image of `size` (width, height) as
    compressed RLE; an `InputError` starting with `where` when it is malformed, of another size or empty."""
    mask_api = require("pycocotools.mask")
    width, height = size
    if isinstance(seg, list):
        rle = mask_api.merge(mask_api.frPyObjects(_polygons(seg, size, where), height, width))
    elif isinstance(seg, dict):
        listed = seg.get("size")
        if not (isinstance(listed, list) and len(listed) == 2 and all(isinstance(v, int) for v in listed)):
            raise InputError(f"{where}: a run-length segmentation needs size [height, width], got {listed!r:.40}")
        if tuple(listed) != (height, width):
            raise InputError(f"{where}: the segmentation's size {listed} is not the image's [height, width] "
                             f"[{height}, {width}]")
        counts = seg.get("counts")
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                raise InputError(f"{where}: the segmentation's counts must be non-negative integers")
            _check_total(sum(counts), height, width, where)
            rle = mask_api.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, str):
            _check_total(sum(_decoded_counts(counts, where)), height, width, where)
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        else:
            raise InputError(f"{where}: the segmentation's counts must be a list of run lengths or a compressed "
                             f"string, got {type(counts).__name__}")
    else:
        raise InputError(f"{where}: segmentation must be a list of polygons or a run-length encoding "
                         f"{{\"size\": [h, w], \"counts\": ...}}, got {type(seg).__name__}")
    if float(mask_api.area(rle)) <= 0:
        raise InputError(f"{where}: the segmentation covers no pixel of the {width}x{height} image")
    counts_out = rle["counts"]
    return height, width, counts_out.decode("ascii") if isinstance(counts_out, bytes) else str(counts_out)


def _polygons(seg: list, size: tuple[int, int], where: str) -> list[list[float]]:
    if not seg:
        raise InputError(f"{where}: the segmentation has no polygon")
    width, height = size
    out = []
    for k, poly in enumerate(seg):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            raise InputError(f"{where}: segmentation polygon {k} must be a list of at least 3 points "
                             f"[x1, y1, x2, y2, x3, y3, ...], got {poly!r:.60}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in poly):
            raise InputError(f"{where}: segmentation polygon {k} has a coordinate that is not a finite number")
        xs, ys = poly[0::2], poly[1::2]
        tol = EDGE_TOLERANCE
        if min(xs) < -tol or min(ys) < -tol or max(xs) > width + tol or max(ys) > height + tol:
            raise InputError(f"{where}: segmentation polygon {k} reaches outside the {width}x{height} image")
        out.append([float(v) for v in poly])
    return out


def _check_total(total: int, height: int, width: int, where: str) -> None:
    if total != height * width:
        raise InputError(f"{where}: the segmentation's runs cover {total} pixels, not the image's "
                         f"{height}x{width} = {height * width}")


def _decoded_counts(counts: str, where: str) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' format: each run, after the second a
    difference to the run two before, in 5-bit groups offset by 48, 0x20 marking a continuation)."""
    runs: list[int] = []
    value, shift = 0, 0
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise InputError(f"{where}: the segmentation's compressed counts hold the character {ch!r}")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise InputError(f"{where}: the segmentation's compressed counts decode to a negative run")
        runs.append(value)
        value, shift = 0, 0
    if shift:
        raise InputError(f"{where}: the segmentation's compressed counts end in the middle of a run")
    return runs


def coco_rle(mask: MaskRLE) -> dict[str, Any]:
    """`mask` as COCO's RLE dict, `{"size": [height, width], "counts": str}`."""
    return {"size": [mask[0], mask[1]], "counts": mask[2]}


def decode_masks(masks: Sequence[MaskRLE], image: object = "", limits: DecodeLimits = DEFAULT_LIMITS
                 ) -> torch.Tensor:
    """(N, H, W) uint8 masks (1 inside) of one image; an `InputError` when they would take more than
    the limits' `max_bytes` (one byte a pixel and mask)."""
    if not masks:
        return torch.zeros((0, 0, 0), dtype=torch.uint8)
    height, width = masks[0][0], masks[0][1]
    need = len(masks) * height * width
    if limits.max_bytes is not None and need > limits.max_bytes:
        raise InputError(f"{image}: its {len(masks)} masks of {width}x{height} would take {need >> 20} MiB, over "
                         f"the decode limit of {limits.max_bytes >> 20} MiB (--decode-limits bytes=...)")
    mask_api = require("pycocotools.mask")
    with warnings.catch_warnings():  # (pycocotools' own use of NumPy 2's `copy` keyword, harmless)
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
        dense = mask_api.decode([{"size": [h, w], "counts": c.encode("ascii")} for h, w, c in masks])  # (H, W, N)
    return torch.from_numpy(np.ascontiguousarray(dense.transpose(2, 0, 1)))


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """(D, H, W) boolean masks in COCO's run-length encoding: `{"size": [H, W], "counts": str}` each."""
    mask_api = require("pycocotools.mask")
    fortran = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            for rle in mask_api.encode(fortran)]
