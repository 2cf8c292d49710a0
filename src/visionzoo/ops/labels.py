"""From per-pixel class scores to a label map of another size, without resizing the scores.

`resize_argmax(logits, size)` equals `F.interpolate(logits[None], size, mode="bilinear",
align_corners=False)[0].argmax(0)`: the labels of the scores resized to `size`. Resizing a
segmentation model's scores to a camera photo's size costs classes x 12 M values (a GiB for
VOC's 21 classes); this costs one label per pixel, plus the scores of the few pixels where
the answer is in doubt.

Why it is exact: a bilinear output pixel is a convex combination of four input pixels (its
taps). If class c has the largest score at each tap, then for every other class k each tap's
`s_c - s_k` is >= 0, so their weighted sum is too: c wins at the output pixel as well. So the
labels are computed at the scores' resolution, and an output pixel takes its taps' label when
all four agree; only the pixels whose taps disagree (along the boundaries between classes)
are interpolated and compared, with PyTorch's weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError

_CHUNK = 1 << 18  # boundary pixels interpolated at a time (bounds the memory to ~chunk x classes x 4 taps)


def _taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first tap, second tap, weight of the second) of each output position along one axis, as
    PyTorch's bilinear kernel computes them (align_corners=False; the source clamped at 0)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    first = src.long().clamp_(max=in_size - 1)
    second = (first + 1).clamp_(max=in_size - 1)
    return first, second, src - first


def resize_argmax(logits: torch.Tensor, size: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (H, W) labels of (C, h, w) `logits` bilinearly resized to `size` = (H, W).

    `dtype` of the result: default uint8 for up to 256 classes, else int64.
    """
    if logits.ndim != 3 or not logits.is_floating_point():
        raise InputError(f"resize_argmax takes (classes, height, width) float scores, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise InputError(f"resize_argmax needs a size of at least 1 x 1, got {tuple(size)}")
    classes, h, w = logits.shape
    dtype = dtype or (torch.uint8 if classes <= 256 else torch.int64)
    low = logits.max(0).indices  # the first maximum, as argmax; (much) faster than argmax over dim 0 on CPUs
    if (h, w) == (height, width):
        return low.to(dtype)
    y0, y1, wy = _taps(h, height)
    x0, x1, wx = _taps(w, width)
    # where the four taps of an output pixel agree, that label is the answer; the taps of (y, x) are
    # (y0, x0) and its neighbours below and to the right (clamped at the edges: the pixel itself)
    below = torch.cat([low[1:], low[-1:]], 0)
    right = torch.cat([low[:, 1:], low[:, -1:]], 1)
    diagonal = torch.cat([below[:, 1:], below[:, -1:]], 1)
    doubt_low = (low != below) | (low != right) | (low != diagonal)
    if classes <= 128:  # one byte per output pixel: the label, plus 128 where the taps disagree
        code = (low + 128 * doubt_low).to(torch.uint8).index_select(0, y0).index_select(1, x0)
        doubt = code >= 128
        labels = code.bitwise_and_(127)
    else:
        labels = low.index_select(0, y0).index_select(1, x0)
        doubt = doubt_low.index_select(0, y0).index_select(1, x0)
    rows, cols = doubt.nonzero(as_tuple=True)
    pixels = logits.float().permute(1, 2, 0).reshape(h * w, classes)  # one row of scores per input pixel
    for start in range(0, len(rows), _CHUNK):
        r, c = rows[start:start + _CHUNK], cols[start:start + _CHUNK]
        ya, yb, fy = y0[r] * w, y1[r] * w, wy[r][:, None]
        xa, xb, fx = x0[c], x1[c], wx[c][:, None]
        top = torch.lerp(pixels[ya + xa], pixels[ya + xb], fx)
        bottom = torch.lerp(pixels[yb + xa], pixels[yb + xb], fx)
        labels[r, c] = torch.lerp(top, bottom, fy).argmax(1).to(labels.dtype)
    return labels.to(dtype)
