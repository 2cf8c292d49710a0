"""RoIAlign: pooling a fixed-size grid of bins out of each region of a feature map.

He et al., "Mask R-CNN" (2017). Each output bin averages bilinearly interpolated samples taken on
a regular grid inside the bin. This file holds `roi_align` with the semantics of torchvision's
compiled operator (its coordinate arithmetic, border rules, minimum region size and adaptive
sampling grid), and `roi_align_levels`, the same pooling over several feature maps at once, which
the multi-scale pooler uses.

How it is computed: the interpolation weights of a bin are shared by all channels, so a bin is a
short weighted sum of pixel vectors. The feature maps are laid out channels-last as one table of
pixel rows and each bin becomes one weighted bag of rows, summed by `embedding_bag`: the sample
positions and weights are computed once per bin (not per channel), there is no loop over boxes,
and no (bins x samples x channels) intermediate is materialised.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

# Samples x corners per chunk of regions: bounds the index and weight tensors (~100 MiB at float64).
_ENTRY_BUDGET = 1 << 22
_MAX_GRID = 1 << 20  # adaptive samples per bin and axis beyond this are not sampling, they are a bug


def roi_align(input: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor], output_size: int | Sequence[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """Pool each region of `boxes` from `input` (N, C, H, W) into (K, C, out_h, out_w).

    `boxes` is a (K, 5) tensor of (batch index, x1, y1, x2, y2) or a list of (L_i, 4) tensors, one
    per image, in input coordinates times `spatial_scale`. `sampling_ratio` > 0 takes that many
    samples per bin along each axis; <= 0 takes ceil(region size / output size) per region and
    axis. `aligned` shifts the boxes by half a pixel (pixel centres at integer + 0.5); without it a
    region is at least 1x1. The result has channels-last strides (its values are those of
    torchvision's `roi_align`); call `.contiguous()` where NCHW strides matter.
    """
    _check_features(input, "roi_align input")
    rois = boxes_to_rois(boxes, input)
    batch = rois[:, 0]
    if rois.shape[0] and not bool(((batch >= 0) & (batch < input.shape[0])).all()):
        raise InputError(f"roi_align: batch indices of boxes must lie in [0, {input.shape[0]}); "
                         "the first column of a (K, 5) boxes tensor is the image index")
    return roi_align_levels([input], [spatial_scale], rois, None, output_size, sampling_ratio, aligned)


def boxes_to_rois(boxes: torch.Tensor | Sequence[torch.Tensor], input: torch.Tensor) -> torch.Tensor:
    """The (K, 5) (batch index, x1, y1, x2, y2) form of `boxes`, checked against `input`."""
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise InputError(f"boxes tensor has shape {tuple(boxes.shape)}; expected (K, 5) rows of "
                             "(batch index, x1, y1, x2, y2), or pass a list of (L, 4) tensors per image")
        rois = boxes
    elif isinstance(boxes, (list, tuple)) and all(isinstance(b, torch.Tensor) for b in boxes):
        for b in boxes:
            if b.ndim != 2 or b.shape[1] != 4:
                raise InputError(f"a boxes tensor has shape {tuple(b.shape)}; expected (L, 4) rows of x1, y1, x2, y2")
        if not boxes:
            return input.new_zeros((0, 5))
        ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
        rois = torch.cat([ids, torch.cat(list(boxes))], dim=1)
    else:
        raise InputError(f"boxes must be a (K, 5) tensor or a list of (L, 4) tensors, got {type(boxes).__name__}")
    if rois.dtype != input.dtype or rois.device != input.device:
        raise InputError(f"boxes are {rois.dtype} on {rois.device} but the features are {input.dtype} on "
                         f"{input.device}; convert the boxes with .to(features)")
    return rois


def roi_align_levels(features: Sequence[torch.Tensor], scales: Sequence[float], rois: torch.Tensor,
                     levels: torch.Tensor | None, output_size: int | Sequence[int], sampling_ratio: int,
                     aligned: bool = False) -> torch.Tensor:
    """RoIAlign of each row of `rois` (K, 5) from `features[levels[k]]` at `scales[levels[k]]`.

    `levels` None pools every region from `features[0]`; a region whose level is outside
    [0, len(features)) gets zeros. All maps share batch size, channels, dtype and device. Batch
    indices are trusted (`roi_align` checks them).
    """
    out_h, out_w = _pair(output_size)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise InputError(f"sampling_ratio must be an int (> 0: fixed grid, <= 0: adaptive), got {sampling_ratio!r}")
    if len(features) != len(scales) or not features:
        raise InputError(f"roi_align_levels needs one scale per feature map, got {len(features)} maps "
                         f"and {len(scales)} scales")
    first = features[0]
    for f in features:
        _check_features(f, "feature map")
        if f.shape[:2] != first.shape[:2] or f.dtype != first.dtype or f.device != first.device:
            raise InputError("feature maps differ in batch size, channels, dtype or device; pool maps of one "
                             "backbone pass together")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise InputError(f"rois has shape {tuple(rois.shape)}; expected (K, 5)")
    num, channels = first.shape[:2]
    k = rois.shape[0]
    if k == 0 or channels == 0:
        return first.new_zeros((k, out_h, out_w, channels)).permute(0, 3, 1, 2)
    table, bases = _pixel_table(features)

    index = None  # rows of the result that are pooled (None: all)
    if levels is None:
        levels = torch.zeros(k, dtype=torch.long, device=rois.device)
    else:
        inside = (levels >= 0) & (levels < len(features))
        if not bool(inside.all()):
            index = torch.nonzero(inside).squeeze(1)
            rois, levels = rois[index], levels[index]

    dtype = first.dtype
    offset = 0.5 if aligned else 0.0
    scale = torch.tensor(list(scales), dtype=dtype, device=rois.device)[levels]  # the kernel scales in T
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    roi_w, roi_h = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    sizes = torch.tensor([f.shape[2:] for f in features], device=rois.device)[levels]
    height, width = sizes[:, 0], sizes[:, 1]
    image_base = bases[levels] + rois[:, 0].long() * height * width

    groups: list[tuple[int, int, torch.Tensor | None]]
    if sampling_ratio > 0:
        groups = [(sampling_ratio, sampling_ratio, None)]
    else:  # ceil(size / bins) samples; an empty, inverted or non-finite region gets none and pools to 0
        samples_h, samples_w = (torch.where(torch.isfinite(b), torch.ceil(b), 0.0).clamp(0, _MAX_GRID).long()
                                for b in (bin_h, bin_w))
        keys, group_of = torch.unique(samples_h * (_MAX_GRID + 1) + samples_w, return_inverse=True)
        groups = [(key // (_MAX_GRID + 1), key % (_MAX_GRID + 1),
                   None if len(keys) == 1 else torch.nonzero(group_of == g).squeeze(1))
                  for g, key in enumerate(keys.tolist())]

    result = None
    for grid_h, grid_w, members in groups:  # members None: every region
        if grid_h == 0 or grid_w == 0:
            continue
        size = rois.shape[0] if members is None else members.numel()
        step = max(1, _ENTRY_BUDGET // (out_h * out_w * 4 * grid_h * grid_w))
        for start in range(0, size, step):
            sel = slice(start, start + step) if members is None else members[start:start + step]
            ys, wy = _axis_taps(y1[sel], bin_h[sel], height[sel], out_h, grid_h)
            xs, wx = _axis_taps(x1[sel], bin_w[sel], width[sel], out_w, grid_w)
            pooled = _pool_bins(table, ys, wy / (grid_h * grid_w), xs, wx, image_base[sel], width[sel])
            if members is None and index is None and step >= size:
                result = pooled  # every region in one piece, in order: no copy
            else:
                if result is None:
                    result = first.new_zeros((k, out_h, out_w, channels))
                result[sel if index is None else index[sel]] = pooled
    if result is None:
        result = first.new_zeros((k, out_h, out_w, channels))
    return result.permute(0, 3, 1, 2)


def _pixel_table(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All maps as one channels-last table of pixel rows, and the first row of each map: image b,
    pixel (y, x) of map l is row bases[l] + (b * H_l + y) * W_l + x."""
    counts = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    channels = features[0].shape[1]
    if len(features) == 1 and features[0].permute(0, 2, 3, 1).is_contiguous():
        table = features[0].permute(0, 2, 3, 1).reshape(-1, channels)  # already channels-last: no copy
    else:
        table = features[0].new_empty((sum(counts), channels))
        start = 0
        for f, count in zip(features, counts, strict=True):
            table[start:start + count].view(f.shape[0], f.shape[2], f.shape[3], channels).copy_(f.permute(0, 2, 3, 1))
            start += count
    bases = torch.tensor([0, *counts[:-1]], device=features[0].device).cumsum(0)
    return table, bases


def _pool_bins(table: torch.Tensor, ys: torch.Tensor, wy: torch.Tensor, xs: torch.Tensor, wx: torch.Tensor,
               image_base: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """(n, out_h, out_w, C): each bin's weighted sum of table rows, one bag of (row taps x column
    taps) per bin (`_axis_taps`; wy already divided by the number of samples)."""
    row_start = image_base[:, None, None] + ys * width[:, None, None]
    rows = row_start[:, :, None, :, None] + xs[:, None, :, None, :]
    weights = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    bag = ys.shape[-1] * xs.shape[-1]
    pooled = F.embedding_bag(rows.reshape(-1, bag), table, mode="sum", per_sample_weights=weights.reshape(-1, bag))
    return pooled.view(ys.shape[0], ys.shape[1], xs.shape[1], -1)


def _axis_taps(start: torch.Tensor, bin_size: torch.Tensor, size: torch.Tensor, pooled: int, grid: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel indices and bilinear weights along one axis: both (n, pooled, 2 * grid), the two
    neighbours of each of the `grid` samples of each bin, in the kernel's arithmetic. A sample
    beyond [-1, size] weighs 0 (whole sample: the other axis's weights multiply these)."""
    dtype = start.dtype
    bins = torch.arange(pooled, dtype=dtype, device=start.device)
    offsets = torch.arange(grid, dtype=dtype, device=start.device) + 0.5
    bin_size = bin_size[:, None, None]
    # (start + p * bin) + ((i + 0.5) * bin) / grid, evaluated in that order as the kernel does
    coord = (start[:, None, None] + bins[None, :, None] * bin_size) + offsets * bin_size / grid
    size = size[:, None, None]
    inside = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    last = size - 1
    # a sample outside the map weighs 0; its index is the nearest pixel (any valid row would do)
    low = torch.minimum(coord.nan_to_num(0.0), last.to(dtype)).long()
    at_end = low >= last
    low = torch.where(at_end, last, low)
    high = torch.where(at_end, last, low + 1)
    frac = torch.where(at_end, low.to(dtype), coord) - low
    zero = frac.new_zeros(())
    w_low, w_high = torch.where(inside, 1.0 - frac, zero), torch.where(inside, frac, zero)
    index = torch.stack([low, high], -1).flatten(-2)
    return index, torch.stack([w_low, w_high], -1).flatten(-2)


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise InputError(f"output_size must be a positive int or a (height, width) pair, got {output_size!r}")
    return size


def _check_features(x: object, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what} must be a floating-point (N, C, H, W) tensor, got {got}")
