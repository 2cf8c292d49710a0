"""Non-maximum suppression, vectorised, keeping exactly the boxes torchvision's compiled kernel keeps.

Greedy NMS visits boxes by decreasing score and keeps a box unless a box kept before it overlaps
it by more than the threshold. The same decisions are reached here without a Python step per box,
in one of two ways:

- sparse (most inputs): only boxes that overlap at all can suppress each other, and those pairs
  are few. A sweep over the boxes sorted by x1 lists the pairs whose x ranges overlap (for each
  box, the later-starting boxes that start before it ends, found with `searchsorted`); their IoU
  gives the "would suppress" edges, from the higher-ranked box to the lower. Greedy NMS on that
  graph is its unique fixed point (a box is kept iff no kept box suppresses it), reached by
  iterating from "all kept": after t rounds every box at the end of a chain of t edges is final,
  and the chains of real inputs are short.
- dense (when the x ranges overlap so much that the pairs would outnumber the work of greedy NMS
  itself): blocks of boxes in rank order are resolved by the same fixed point on the block's
  pairwise overlaps, then the block's kept boxes remove every later box they suppress, so
  suppressed boxes are never compared again and memory stays at block x remaining boxes.

What makes the results identical to torchvision's, not just equivalent:
- the visiting order is by decreasing score, equal scores by index (the kernel sorts stably);
- the overlap is computed with the kernel's formula and in the boxes' dtype:
  inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1)),
  iou = inter / (area_i + area_j - inter), areas (x2 - x1) * (y2 - y1), all symmetric in i, j;
- the kernel compares that float with the threshold as a double; comparing against the largest
  value of the boxes' dtype not above the threshold gives the same answer;
- boxes that do not overlap (and empty boxes, whose 0/0 is NaN) have an IoU above no threshold
  >= 0 (the sparse path relies on this; a negative threshold takes the dense path).

`batched_nms` suppresses only within a class and, like torchvision, picks its strategy by size:
up to 1,000 boxes on CPU (4,000 numbers; 25,000 boxes elsewhere), one NMS over boxes shifted
apart by class (the shifted coordinates round differently, so this is reproduced as is); above
that, NMS per class, which here is one sweep over all classes at once (pairs only within a class).
"""
from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from ..errors import InputError

# Pairs evaluated by one operation: small enough that every operation (some take two coordinates at
# once) stays under torch's 32768-element threshold for splitting it across threads. Split, the many
# small operations of NMS run several times slower with 2 threads than with 1 on a busy machine.
_OP_PAIRS = 16000
_BLOCK = 128  # dense path: most boxes per lane resolved per step
_SPARSE_SHARE = 0.15  # sparse path when the x-overlapping pairs are at most this share of all pairs
_SWEEP_PAIRS = _OP_PAIRS  # sparse path: candidate pairs evaluated at once
_MAX_EDGES = 1 << 23  # sparse path: more "would suppress" pairs than this go to the dense path


def _check(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor | None = None) -> None:
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise InputError(f"NMS boxes must be a tensor of shape (N, 4), got {shape}")
    if not boxes.is_floating_point():
        raise InputError(f"NMS boxes must be floating point, got {boxes.dtype}; convert them with .float()")
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise InputError(f"NMS scores must be a tensor of shape ({boxes.shape[0]},) (one per box), got {shape}")
    if idxs is not None and (not isinstance(idxs, torch.Tensor) or idxs.shape != scores.shape):
        shape = tuple(idxs.shape) if isinstance(idxs, torch.Tensor) else type(idxs).__name__
        raise InputError(f"batched NMS idxs must be a tensor of shape ({boxes.shape[0]},) (a class per box), "
                         f"got {shape}")


def _threshold_below(iou_threshold: float, dtype: torch.dtype) -> float:
    """The largest `dtype` value <= `iou_threshold`: for x of that dtype, x > it iff x > threshold in float64."""
    exact = torch.tensor(float(iou_threshold), dtype=torch.float64)
    rounded = exact.to(dtype)
    if rounded.double() > exact:
        rounded = torch.nextafter(rounded, torch.tensor(float("-inf"), dtype=dtype))
    return float(rounded)


def _columns(boxes: torch.Tensor) -> torch.Tensor:
    """(5, N) rows x1, y1, x2, y2, area of `boxes` (N, 4): one gather takes all five of a subset."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2, y2, (x2 - x1) * (y2 - y1)))


def _iou_above(a: torch.Tensor, b: torch.Tensor, threshold: float) -> torch.Tensor:
    """IoU of the boxes in columns `a` and `b` ((5, ...) broadcastable) above the threshold, with the
    kernel's arithmetic."""
    wh = torch.minimum(a[2:4], b[2:4]).sub_(torch.maximum(a[:2], b[:2])).clamp_(min=0)
    inter = wh[0].mul_(wh[1])
    return inter.div_((a[4] + b[4]).sub_(inter)) > threshold


def _greedy(boxes: torch.Tensor, threshold: float, counts: list[int] | None = None) -> torch.Tensor:
    """Positions (ascending) kept by greedy NMS of `boxes` (N, 4) visited in their given order; with
    `counts`, the boxes are consecutive runs (classes) of those lengths and only suppress within a run."""
    n = boxes.shape[0]
    counts = [n] if counts is None else counts
    cols = _columns(boxes)
    if threshold >= 0:  # (NaN is not: nothing is above it, the dense path gets that right)
        edges = _suppression_edges(cols, threshold, counts)
        if edges is not None:
            return _resolve_edges(n, *edges)
    return _greedy_dense(cols, threshold, counts)


def _sweep_order(cols: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes sorted by run, then x1 (`by_x`), and for each the number of later boxes in that order
    whose x1 is below its x2 (its sweep partners).

    On CPU this runs in NumPy: its sorts and binary searches are single-threaded, while torch's split
    inputs this size across threads, which on a busy machine makes them many times slower.
    """
    n = cols.shape[1]
    if cols.device.type == "cpu":
        return _sweep_order_numpy(cols, counts)
    device = cols.device
    if len(counts) == 1:
        by_x = cols[0].sort(stable=True).indices
        starts, ends = cols[0].index_select(0, by_x), cols[2].index_select(0, by_x)
    else:
        run_starts = torch.tensor(counts[:-1], device=device).cumsum(0)
        run = torch.zeros(n, dtype=torch.int64, device=device).index_fill_(0, run_starts, 1).cumsum(0)
        values, rank = torch.unique(torch.cat((cols[0], cols[2])), sorted=True, return_inverse=True)
        key_start, key_end = run * (values.numel() + 1) + rank[:n], run * (values.numel() + 1) + rank[n:]
        by_x = key_start.sort(stable=True).indices
        starts, ends = key_start.index_select(0, by_x), key_end.index_select(0, by_x)
    partners = torch.searchsorted(starts, ends).sub_(torch.arange(1, n + 1, device=device)).clamp_(min=0)
    return by_x, partners


def _sweep_order_numpy(cols: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sweep_order` for CPU tensors, in NumPy."""
    n = cols.shape[1]
    x1, x2 = ((c if c.dtype in (torch.float32, torch.float64) else c.float()).numpy()  # exact for half types
              for c in (cols[0], cols[2]))
    if len(counts) == 1:
        by_x = np.argsort(x1, kind="stable")
        starts, ends = x1[by_x], x2[by_x]
    else:  # one sorted key for (run, coordinate): exact ranks of all x1 and x2 values, offset by run
        values, rank = np.unique(np.concatenate((x1, x2)), return_inverse=True)
        run = np.repeat(np.arange(len(counts), dtype=np.int64) * (len(values) + 1), counts)
        key_start, key_end = run + rank[:n], run + rank[n:]
        by_x = np.argsort(key_start, kind="stable")
        starts, ends = key_start[by_x], key_end[by_x]
    partners = np.maximum(np.searchsorted(starts, ends, side="left") - np.arange(1, n + 1), 0)
    return torch.from_numpy(by_x.astype(np.int64)), torch.from_numpy(partners.astype(np.int64))


def _suppression_edges(cols: torch.Tensor, threshold: float, counts: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(higher, lower) rank pairs whose IoU is above the threshold, from a sweep over x within each run
    of `counts` boxes; None when the boxes overlap so much that the dense path costs less (the sweep
    evaluates every pair whose x ranges overlap, the dense path only kept boxes against survivors).

    (`index_select` throughout: several times faster than indexing with a tensor.)"""
    n = cols.shape[1]
    device = cols.device
    by_x, partners = _sweep_order(cols, counts)
    # the partners of the box at sorted position p are the positions p + 1 ... p + partners[p]
    cum = partners.cumsum(0)
    cum_list = cum.tolist()
    if not n or cum_list[-1] > max(_SWEEP_PAIRS, _SPARSE_SHARE * sum(c * (c - 1) // 2 for c in counts)):
        return None
    row_starts = cum - partners  # number of the first pair of each row
    sweep = cols.index_select(1, by_x)  # the columns in sweep order
    ys = sweep[1::2].contiguous()  # y1, y2, area
    higher, lower = [], []
    found, first = 0, 0
    while first < n:  # rows in chunks of about _SWEEP_PAIRS pairs
        done = cum_list[first - 1] if first else 0
        last = min(n, max(first + 1, bisect.bisect_right(cum_list, done + _SWEEP_PAIRS)))
        pairs = cum_list[last - 1] - done
        if pairs:
            # the row of each pair: count the non-empty rows started up to it; then q runs over
            # p + 1, p + 2, ... within its row
            rows = torch.where(partners[first:last] > 0)[0]
            marks = torch.zeros(pairs, dtype=torch.int64, device=device)
            marks.index_fill_(0, row_starts[first:last].index_select(0, rows[1:]) - done, 1)
            p = rows.index_select(0, torch.cumsum(marks, 0)).add_(first)
            q = torch.arange(done + 1, done + 1 + pairs, device=device).sub_(row_starts.index_select(0, p)).add_(p)
            # x ranges overlap by construction; most pairs fail on y, tested before anything else
            yp, yq = ys.index_select(1, p), ys.index_select(1, q)
            close = torch.where(torch.minimum(yp[1], yq[1]) > torch.maximum(yp[0], yq[0]))[0]
            p, q = p.index_select(0, close), q.index_select(0, close)
            hit = torch.where(_iou_above(sweep.index_select(1, p), sweep.index_select(1, q), threshold))[0]
            i, j = by_x.index_select(0, p.index_select(0, hit)), by_x.index_select(0, q.index_select(0, hit))
            higher.append(torch.minimum(i, j))
            lower.append(torch.maximum(i, j))
            found += i.numel()
            if found > _MAX_EDGES:
                return None
        first = last
    if not higher:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(higher), torch.cat(lower)


def _resolve_edges(n: int, higher: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Positions kept by greedy NMS of n boxes whose "would suppress" pairs are (higher -> lower)."""
    if higher.numel() == 0:
        return torch.arange(n, device=higher.device)
    if higher.device.type == "cpu":  # (NumPy: see _sweep_order)
        nodes, local = (torch.from_numpy(a) for a in np.unique(torch.cat((higher, lower)).numpy(),
                                                               return_inverse=True))
    else:
        nodes, local = torch.unique(torch.cat((higher, lower)), return_inverse=True)
    src, dst = local[:higher.numel()], local[higher.numel():]
    keep = torch.ones(nodes.numel(), dtype=torch.bool, device=nodes.device)
    while True:
        suppressed = dst.index_select(0, torch.where(keep.index_select(0, src))[0])
        new = torch.ones_like(keep).index_fill_(0, suppressed, False)
        if torch.equal(new, keep):
            break
        keep = new
    kept = torch.ones(n, dtype=torch.bool, device=higher.device).index_copy_(0, nodes, keep)
    return torch.where(kept)[0]


def _resolve_block(suppressed_by: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Greedy decisions (..., b) within blocks: keep[i] iff candidate[i] and no kept k < i has
    suppressed_by[..., i, k] (`suppressed_by` is (..., b, b), used below its diagonal only)."""
    b = suppressed_by.shape[-1]
    index = torch.arange(b, device=suppressed_by.device)
    suppressed_by = suppressed_by & (index[:, None] > index[None, :])  # (not tril: it splits across threads)
    keep = candidate
    while True:
        new = ~(suppressed_by & keep.unsqueeze(-2)).any(-1) & candidate
        if torch.equal(new, keep):
            return keep
        keep = new


def _greedy_dense(cols: torch.Tensor, threshold: float, counts: list[int]) -> torch.Tensor:
    """`_greedy` by blocks of rank, for boxes given as columns (5, N).

    Each run is a lane of a (lanes, length) grid of box positions, resolved a block of columns at a
    time in all lanes together; after each block the survivors of every lane are moved to its front
    (suppressed boxes leave the comparisons) and emptied lanes are dropped.
    """
    device = cols.device
    lengths = torch.tensor(counts, device=device)
    starts = torch.cumsum(lengths, 0) - lengths
    columns = torch.arange(max(counts), device=device)
    alive = columns < lengths[:, None]  # live entries first in every lane
    grid = torch.where(alive, starts[:, None] + columns, 0)  # padding points at box 0, never live
    kept: list[torch.Tensor] = []
    while grid.shape[1]:
        lanes = grid.shape[0]
        width = max(8, min(_BLOCK, math.isqrt(_OP_PAIRS // lanes)))
        block, live = grid[:, :width], alive[:, :width]
        block_cols = cols.index_select(1, block.reshape(-1)).view(5, lanes, -1)
        keep = _resolve_block(_iou_above(block_cols[:, :, :, None], block_cols[:, :, None, :], threshold), live)
        kept.append(block.reshape(-1).index_select(0, torch.where(keep.reshape(-1))[0]))
        grid, alive = grid[:, width:], alive[:, width:]
        if not grid.shape[1]:
            break
        if bool(keep.any()):
            # only the block's kept boxes suppress: moved to the front of their lanes, the rest cut off
            kept_grid, kept_live = _compact(block, keep, drop_empty=False)
            suppressors = cols.index_select(1, kept_grid.reshape(-1)).view(5, lanes, 1, -1)
            chunk = max(1, _OP_PAIRS // kept_grid.numel())
            removed = torch.cat([
                (_iou_above(cols.index_select(1, grid[:, i:i + chunk].reshape(-1)).view(5, lanes, -1, 1),
                            suppressors, threshold) & kept_live[:, None, :]).any(-1)
                for i in range(0, grid.shape[1], chunk)], dim=1)
            alive = alive & ~removed
        grid, alive = _compact(grid, alive)
    return torch.cat(kept).sort().values


def _compact(grid: torch.Tensor, alive: torch.Tensor, drop_empty: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The live entries of each lane moved to its front (in order), without empty columns, and
    without empty lanes unless `drop_empty` is False."""
    lanes, length = grid.shape
    live = torch.where(alive.reshape(-1))[0]  # lane-major, so each lane's survivors stay in order
    lane = torch.div(live, length, rounding_mode="floor")
    per_lane = torch.zeros(lanes, dtype=torch.int64, device=grid.device).index_add_(
        0, lane, torch.ones_like(lane))
    new_length = int(per_lane.max()) if lanes else 0
    if drop_empty:
        new_lane = torch.cumsum(per_lane > 0, 0) - 1  # lanes with survivors, renumbered
        new_lanes = int((per_lane > 0).sum())
    else:
        new_lane, new_lanes = torch.arange(lanes, device=grid.device), lanes
    column = torch.arange(live.numel(), device=grid.device) - (torch.cumsum(per_lane, 0) - per_lane).index_select(
        0, lane)
    slot = new_lane.index_select(0, lane) * new_length + column
    new_grid = torch.zeros(new_lanes * new_length, dtype=grid.dtype, device=grid.device)
    new_grid.index_copy_(0, slot, grid.reshape(-1).index_select(0, live))
    new_alive = torch.zeros(new_lanes * new_length, dtype=torch.bool, device=grid.device).index_fill_(0, slot, True)
    return new_grid.view(new_lanes, new_length), new_alive.view(new_lanes, new_length)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64) of the boxes greedy NMS keeps, by decreasing score.

    `boxes` (N, 4) are (x1, y1, x2, y2); a box is dropped when its IoU with a kept, higher-scored
    box is above `iou_threshold`. Same boxes, same order as torchvision's `nms`, ties included.
    """
    _check(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.sort(dim=0, descending=True, stable=True).indices
    kept = _greedy(boxes.index_select(0, order), _threshold_below(iou_threshold, boxes.dtype))
    return order.index_select(0, kept)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64) kept by NMS applied separately within each class `idxs` (N,), by decreasing score.

    Same boxes, same order as torchvision's `batched_nms` (including its choice of strategy by size).
    """
    _check(boxes, scores, idxs)
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000):
        return _batched_nms_per_class(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # the coordinate trick: classes shifted apart by more than the largest coordinate
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _batched_nms_per_class(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                           iou_threshold: float) -> torch.Tensor:
    # grouped by class, each class in the order NMS of that class alone visits it (score, then index)
    by_score = scores.sort(descending=True, stable=True).indices
    order = by_score.index_select(0, idxs.index_select(0, by_score).sort(stable=True).indices)
    counts = torch.unique_consecutive(idxs.index_select(0, order), return_counts=True)[1].tolist()
    kept = _greedy(boxes.index_select(0, order), _threshold_below(iou_threshold, boxes.dtype), counts)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, order.index_select(0, kept), True)
    keep = torch.where(keep_mask)[0]
    # torchvision's final order: this (unstable) sort of the kept scores
    return keep.index_select(0, scores.index_select(0, keep).sort(descending=True)[1])
