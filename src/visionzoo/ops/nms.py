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

import torch

from ..errors import InputError

_BLOCK = 128  # dense path: boxes resolved per step
_CHUNK_PAIRS = 16384  # dense path: overlaps computed at once (under torch's threshold for splitting an op)
_SWEEP_PAIRS = 32000  # sparse path: candidate pairs evaluated at once (also under the splitting threshold)
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


def _greedy(boxes: torch.Tensor, threshold: float, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (ascending) kept by greedy NMS of `boxes` (N, 4) visited in their given order; with
    `groups` (N,), non-decreasing, boxes only suppress boxes of their own group."""
    cols = _columns(boxes)
    if threshold >= 0:  # (NaN is not: nothing is above it, the dense path gets that right)
        edges = _suppression_edges(cols, threshold, groups)
        if edges is not None:
            return _resolve_edges(boxes.shape[0], *edges)
    if groups is None:
        return _greedy_dense(cols, threshold)
    counts = torch.unique_consecutive(groups, return_counts=True)[1].tolist()
    kept, start = [], 0
    for count in counts:
        kept.append(start + _greedy_dense(cols[:, start:start + count], threshold))
        start += count
    return torch.cat(kept)


def _count_below(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """For each query, how many of `sorted_values` are strictly below it (`searchsorted`, which runs
    several times slower than this merge on a busy machine: it splits even small inputs across threads)."""
    n = queries.numel()
    order = torch.cat((queries, sorted_values)).sort(stable=True).indices  # a query precedes equal values
    is_value = order >= n
    values_before = torch.cumsum(is_value, 0).sub_(is_value.long())
    at = torch.where(~is_value)[0]
    counts = torch.empty(n, dtype=torch.int64, device=queries.device)
    return counts.index_copy_(0, order.index_select(0, at), values_before.index_select(0, at))


def _suppression_edges(cols: torch.Tensor, threshold: float, groups: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(higher, lower) rank pairs whose IoU is above the threshold, from a sweep over x; None when
    the sweep would cost more than the dense path (or keep too many pairs).

    (`index_select` throughout: several times faster than indexing with a tensor.)"""
    n = cols.shape[1]
    device = cols.device
    if groups is None:
        by_x = cols[0].sort(stable=True).indices
        starts, ends = cols[0].index_select(0, by_x), cols[2].index_select(0, by_x)
    else:
        # one sorted key for (group, coordinate): exact ranks of all x1 and x2 values, offset by group
        values, rank = torch.unique(torch.cat((cols[0], cols[2])), sorted=True, return_inverse=True)
        key_start = groups * (values.numel() + 1) + rank[:n]
        key_end = groups * (values.numel() + 1) + rank[n:]
        by_x = key_start.sort(stable=True).indices
        starts, ends = key_start.index_select(0, by_x), key_end.index_select(0, by_x)
    # partners of the box at sorted position p: later positions q < first start >= its end
    counts = _count_below(starts, ends).sub_(torch.arange(1, n + 1, device=device)).clamp_(min=0)
    cum = counts.cumsum(0)
    cum_list = cum.tolist()
    if not n or cum_list[-1] > max(_SWEEP_PAIRS, n * n // 8):
        return None
    row_starts = cum - counts  # number of the first pair of each row
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
            rows = torch.where(counts[first:last] > 0)[0]
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


def _resolve_block(suppressed_by: torch.Tensor) -> torch.Tensor:
    """Greedy decisions (b,) within a block: keep[i] iff no kept k < i has suppressed_by[i, k]."""
    suppressed_by = suppressed_by.tril(-1)
    keep = torch.ones(suppressed_by.shape[0], dtype=torch.bool, device=suppressed_by.device)
    while True:
        new = ~(suppressed_by & keep).any(-1)
        if torch.equal(new, keep):
            return keep
        keep = new


def _greedy_dense(cols: torch.Tensor, threshold: float) -> torch.Tensor:
    """`_greedy` by blocks of rank, for boxes given as columns (5, N)."""
    alive = torch.arange(cols.shape[1], device=cols.device)
    kept: list[torch.Tensor] = []
    while alive.numel():
        block, alive = alive[:_BLOCK], alive[_BLOCK:]
        in_block = cols.index_select(1, block)
        keep = _resolve_block(_iou_above(in_block[:, :, None], in_block[:, None, :], threshold))
        kept.append(block[keep])
        if alive.numel() and bool(keep.any()):
            suppressors = in_block[:, None, keep]
            # in chunks small enough for the temporaries to stay in cache (and for torch not to
            # split each operation across threads, a loss at this size)
            chunk = max(1, _CHUNK_PAIRS // suppressors.shape[2])
            removed = torch.cat([_iou_above(cols.index_select(1, alive[i:i + chunk])[:, :, None], suppressors,
                                            threshold).any(-1)
                                 for i in range(0, alive.numel(), chunk)])
            alive = alive[~removed]
    return torch.cat(kept)


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
    groups = torch.unique_consecutive(idxs.index_select(0, order), return_inverse=True)[1]
    kept = _greedy(boxes.index_select(0, order), _threshold_below(iou_threshold, boxes.dtype), groups)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, order.index_select(0, kept), True)
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]  # torchvision's final (unstable) order
