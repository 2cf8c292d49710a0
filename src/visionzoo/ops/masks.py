"""From per-region predictions back to the image: mask pasting and keypoint decoding.

He et al., "Mask R-CNN" (2017). `paste_masks_in_image` resizes each MxM mask predicted for a box
to the box's size and places it in an image-sized canvas (torchvision's padding of the mask by a
pixel and matching expansion of the box, integer box corners, bilinear resize, clipping at the
image border); `heatmaps_to_keypoints` decodes Keypoint R-CNN's heatmaps (bicubic resize of each
heatmap to its box, the arg-max pixel's centre, the score read there). Both reproduce
torchvision's `roi_heads` functions of the same names.

How: a resize with `F.interpolate` is separable, so each box's resize is two small weight matrices
(output rows x mask rows, output columns x mask columns) holding the interpolation weights that
PyTorch's kernel computes. Every mask is resized and placed at once with two batched matrix
products; the rows and columns outside a box (or the image) have zero weights.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic kernel parameter
_CANVAS_BUDGET = 1 << 23  # elements of one chunk of resized heatmaps (64 MiB at float64)


def paste_masks_in_image(masks: torch.Tensor, boxes: torch.Tensor, img_shape: Sequence[int],
                         padding: int = 1) -> torch.Tensor:
    """(N, 1, H, W) image masks from (N, 1, M, M) box masks and their (N, 4) x1, y1, x2, y2 boxes.

    The mask is padded with `padding` zeros on every side and the box grown by the same factor
    ((M + 2 * padding) / M) about its centre, so the mask's border falls just outside the box; the
    grown box is cut to integer corners, the mask resized to it (bilinear) and pasted, clipped to
    the image. A box wholly outside the image gives an empty mask.
    """
    if not isinstance(masks, torch.Tensor) or masks.ndim != 4 or masks.shape[1] != 1 or not masks.is_floating_point():
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise InputError(f"masks must be a floating-point (N, 1, M, M) tensor, got {got}")
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (masks.shape[0], 4):
        got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise InputError(f"boxes must be a ({masks.shape[0]}, 4) tensor, one x1, y1, x2, y2 row per mask, got {got}")
    if not bool(torch.isfinite(boxes).all()):
        raise InputError("boxes hold NaN or infinite coordinates; paste masks of finite boxes only")
    im_h, im_w = _image_size(img_shape)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise InputError(f"padding must be a non-negative int, got {padding!r}")
    if masks.shape[0] == 0:
        return masks.new_empty((0, 1, im_h, im_w))

    scale = float(masks.shape[-1] + 2 * padding) / masks.shape[-1]
    padded = F.pad(masks[:, 0], (padding,) * 4)
    half_w, half_h = (boxes[:, 2] - boxes[:, 0]) * 0.5, (boxes[:, 3] - boxes[:, 1]) * 0.5
    centre_x, centre_y = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    half_w, half_h = half_w * scale, half_h * scale
    x1, x2 = (centre_x - half_w).long(), (centre_x + half_w).long()
    y1, y2 = (centre_y - half_h).long(), (centre_y + half_h).long()

    dtype = masks.dtype
    rows = _resize_matrix(padded.shape[1], (y2 - y1 + 1).clamp(min=1), y1, y1.clamp(min=0),
                          (y2 + 1).clamp(max=im_h), im_h, cubic=False, dtype=dtype)
    cols = _resize_matrix(padded.shape[2], (x2 - x1 + 1).clamp(min=1), x1, x1.clamp(min=0),
                          (x2 + 1).clamp(max=im_w), im_w, cubic=False, dtype=dtype)
    # columns first, then rows: the order in which F.interpolate combines the two directions
    return torch.matmul(rows, torch.matmul(padded, cols.transpose(1, 2)))[:, None]


def heatmaps_to_keypoints(maps: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints (K, J, 3) as x, y, 1 and their scores (K, J) from heatmaps (K, J, S, S) of the
    (K, 4) x1, y1, x2, y2 boxes `rois`.

    Each heatmap is resized (bicubic) to its box's size rounded up (at least 1x1); the keypoint is
    the centre of the first maximal pixel, mapped back to the box, and its score the resized
    heatmap's value there. Both outputs are float32 whatever the input dtype, as torchvision's.
    """
    if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or not maps.is_floating_point():
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise InputError(f"maps must be a floating-point (K, J, S, S) tensor of heatmaps, got {got}")
    if not isinstance(rois, torch.Tensor) or rois.shape != (maps.shape[0], 4):
        got = tuple(rois.shape) if isinstance(rois, torch.Tensor) else type(rois).__name__
        raise InputError(f"rois must be a ({maps.shape[0]}, 4) tensor, one x1, y1, x2, y2 row per heatmap set, "
                         f"got {got}")
    if not bool(torch.isfinite(rois).all()):
        raise InputError("rois hold NaN or infinite coordinates; decode keypoints of finite boxes only")
    count, joints = maps.shape[:2]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    out_w, out_h = widths.ceil(), heights.ceil()
    sizes_w, sizes_h = out_w.long(), out_h.long()
    keypoints = torch.ones((count, joints, 3), dtype=torch.float32, device=maps.device)
    scores = torch.zeros((count, joints), dtype=torch.float32, device=maps.device)
    if count == 0:
        return keypoints, scores

    col_of = torch.zeros((count, joints), dtype=torch.long, device=maps.device)
    row_of = torch.zeros_like(col_of)
    for chunk in _chunks_by_size(sizes_h, sizes_w, joints):
        h, w = sizes_h[chunk], sizes_w[chunk]
        canvas_h, canvas_w = int(h.max()), int(w.max())
        zero = torch.zeros_like(h)
        rows = _resize_matrix(maps.shape[2], h, zero, zero, h, canvas_h, cubic=True, dtype=maps.dtype)
        cols = _resize_matrix(maps.shape[3], w, zero, zero, w, canvas_w, cubic=True, dtype=maps.dtype)
        resized = torch.matmul(rows[:, None], torch.matmul(maps[chunk], cols[:, None].transpose(2, 3)))
        outside = ((torch.arange(canvas_h, device=maps.device) >= h[:, None])[:, :, None]
                   | (torch.arange(canvas_w, device=maps.device) >= w[:, None])[:, None, :])
        resized = resized.masked_fill(outside[:, None], float("-inf")).flatten(2)
        best = resized.argmax(-1)  # first maximum in row-major order, as torchvision's per-box argmax
        scores[chunk] = resized.gather(-1, best[..., None])[..., 0].float()
        row_of[chunk], col_of[chunk] = best // canvas_w, best % canvas_w

    # float32 arithmetic, as torchvision writes the keypoints into float32 tensors
    step_x, step_y = (widths / out_w).float()[:, None], (heights / out_h).float()[:, None]
    keypoints[..., 0] = (col_of.float() + 0.5) * step_x + rois[:, :1].float()
    keypoints[..., 1] = (row_of.float() + 0.5) * step_y + rois[:, 1:2].float()
    return keypoints, scores


def _chunks_by_size(heights: torch.Tensor, widths: torch.Tensor, planes: int) -> Iterator[torch.Tensor]:
    """Indices of the boxes in groups whose (planes x max height x max width) canvas stays within
    the budget: largest boxes first, so that boxes of similar size share a canvas."""
    order = torch.argsort(heights * widths, descending=True)
    # the largest height and width among the boxes from each position of `order` on
    tail_h = torch.flip(torch.cummax(torch.flip(heights[order], (0,)), 0).values, (0,)).tolist()
    tail_w = torch.flip(torch.cummax(torch.flip(widths[order], (0,)), 0).values, (0,)).tolist()
    start = 0
    while start < len(order):
        step = max(1, _CANVAS_BUDGET // (planes * tail_h[start] * tail_w[start]))
        yield order[start:start + step]
        start += step


def _resize_matrix(in_size: int, out_sizes: torch.Tensor, shift: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   length: int, cubic: bool, dtype: torch.dtype) -> torch.Tensor:
    """(N, length, in_size) weights: row p of matrix n holds the weights with which
    `F.interpolate(..., mode="bicubic" if cubic else "bilinear", align_corners=False)` forms
    sample p - shift[n] of a resize of `in_size` samples to `out_sizes[n]`; rows outside
    [lo[n], hi[n]) are zero. The weights are computed as PyTorch's CPU kernel computes them."""
    device = out_sizes.device
    position = torch.arange(length, device=device)
    inside = (position >= lo[:, None]) & (position < hi[:, None])
    target = torch.where(inside, position - shift[:, None], 0).to(dtype)
    ratio = torch.full_like(out_sizes, in_size, dtype=dtype) / out_sizes  # (int / tensor multiplies by 1/out)
    # scale * (i + 0.5) - 0.5 with one rounding: the kernel's build contracts it into a fused
    # multiply-add (exact in float64 for float32 operands; float64 inputs round twice, ~1e-16)
    wide = torch.float64 if dtype == torch.float32 else dtype
    source = (ratio.to(wide)[:, None] * (target.to(wide) + 0.5) - 0.5).to(dtype)
    if not cubic:
        source = source.clamp(min=0.0)
    # the kernel floors in single precision (floorf) whatever the dtype
    first = torch.floor(source.float()).long().clamp(max=in_size - 1)
    frac = (source - first.to(dtype)).clamp(0.0, 1.0)
    if cubic:
        taps = torch.stack([first + j - 1 for j in range(4)], -1).clamp(0, in_size - 1)
        weights = torch.stack(_cubic_coefficients(frac), -1)
    else:
        taps = torch.stack([first, first + (first < in_size - 1).long()], -1)
        weights = torch.stack([1.0 - frac, frac], -1)
    weights = weights * inside[..., None]
    return weights.new_zeros((*inside.shape, in_size)).scatter_add_(-1, taps, weights)


def _cubic_coefficients(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four weights of the taps at -1, 0, 1, 2 around a sample at fraction t, in the
    evaluation order of PyTorch's kernel (Keys' cubic convolution with A = -0.75)."""
    a = _CUBIC_A

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    rest = 1.0 - t
    return far(t + 1.0), near(t), near(rest), far(rest + 1.0)


def _image_size(img_shape: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(s) for s in img_shape) if isinstance(img_shape, (tuple, list, torch.Size)) else ()
    if len(size) != 2 or min(size) <= 0:
        raise InputError(f"img_shape must be a (height, width) pair of positive ints, got {img_shape!r}")
    return size
