"""NMS and batched NMS against a slow, obviously correct greedy loop with the kernel's float formula."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from visionzoo import InputError
from visionzoo.ops import batched_nms, nms

nms_module = importlib.import_module("visionzoo.ops.nms")  # (the package exports the function nms)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> np.ndarray:
    """torchvision's CPU kernel, spelled out: visit by decreasing score (ties by index), keep a box
    unless a kept box overlaps it by more than `threshold`; IoU in the boxes' dtype, compared in float64."""
    b = boxes.numpy()
    order = np.argsort(-scores.numpy().astype(np.float64), kind="stable")
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(b), dtype=bool)
    keep = []
    zero = b.dtype.type(0)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1:]
        rest = rest[~suppressed[rest]]  # (skipping the suppressed ones changes nothing but the time)
        w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (area[i] + area[rest] - inter)
        suppressed[rest[iou.astype(np.float64) > threshold]] = True
    return np.array(keep, dtype=np.int64)


def reference_batched_nms(boxes, scores, idxs, threshold) -> np.ndarray:
    """torchvision's rule: small inputs (<= 1,000 boxes on CPU) shift boxes apart by class and run one
    NMS, larger ones run NMS per class and order the union by score."""
    if boxes.numel() <= 4000:
        if boxes.numel() == 0:
            return np.zeros(0, dtype=np.int64)
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return reference_nms(boxes + offsets[:, None], scores, threshold)
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for c in torch.unique(idxs):
        members = torch.where(idxs == c)[0]
        keep[members[reference_nms(boxes[members], scores[members], threshold)]] = True
    kept = torch.where(keep)[0]
    return kept[scores[kept].sort(descending=True)[1]].numpy()


def random_boxes(n: int, seed: int, dtype=torch.float32, spread: float = 1000.0, ties: bool = False,
                 degenerate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * spread
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if ties:  # few distinct scores, and duplicated boxes with equal scores
        scores = (scores * 7).floor() / 7
        dup = torch.randint(0, n, (2 * (n // 20),), generator=g)
        boxes[dup[1::2]] = boxes[dup[::2]]
    if degenerate:  # zero width, empty (zero area), inverted
        kind = torch.randint(0, 6, (n,), generator=g)
        boxes[kind == 0, 2] = boxes[kind == 0, 0]
        boxes[kind == 1, 2:] = boxes[kind == 1, :2]
        boxes[kind == 2, 3] = boxes[kind == 2, 1] - 5
    return boxes.to(dtype), scores.to(dtype)


CASES = [  # (n, seed, spread, ties, degenerate, dtype, threshold)
    (10, 0, 100.0, False, False, torch.float32, 0.5),
    (57, 1, 200.0, True, False, torch.float32, 0.45),
    (300, 2, 300.0, True, True, torch.float64, 0.3),
    (1000, 3, 1000.0, False, True, torch.float32, 0.7),
    (1001, 4, 400.0, True, False, torch.float64, 0.55),
    (4000, 5, 150.0, True, True, torch.float32, 0.5),  # dense: many suppressions
    (5000, 6, 1000.0, True, True, torch.float32, 0.0),  # any overlap suppresses
]


@pytest.mark.parametrize("n,seed,spread,ties,degenerate,dtype,threshold", CASES)
def test_nms_matches_greedy_reference(n, seed, spread, ties, degenerate, dtype, threshold):
    boxes, scores = random_boxes(n, seed, dtype, spread, ties, degenerate)
    assert np.array_equal(nms(boxes, scores, threshold).numpy(), reference_nms(boxes, scores, threshold))


@pytest.mark.parametrize("n,seed,spread,ties,degenerate,dtype,threshold", CASES)
def test_batched_nms_matches_reference(n, seed, spread, ties, degenerate, dtype, threshold):
    boxes, scores = random_boxes(n, seed, dtype, spread, ties, degenerate)
    idxs = torch.randint(0, 80 if n > 100 else 3, (n,), generator=torch.Generator().manual_seed(seed))
    expected = reference_batched_nms(boxes, scores, idxs, threshold)
    assert np.array_equal(batched_nms(boxes, scores, idxs, threshold).numpy(), expected)


def test_large_inputs_match_reference():
    """20,000 boxes: the sparse sweep with its chunks, and batched NMS with many classes."""
    boxes, scores = random_boxes(20_000, 7, torch.float32, 1000.0, ties=True, degenerate=True)
    assert np.array_equal(nms(boxes, scores, 0.5).numpy(), reference_nms(boxes, scores, 0.5))
    idxs = torch.randint(0, 300, (20_000,), generator=torch.Generator().manual_seed(8))
    assert np.array_equal(batched_nms(boxes, scores, idxs, 0.5).numpy(),
                          reference_batched_nms(boxes, scores, idxs, 0.5))


def test_both_strategies_agree_on_overlapping_boxes():
    """Crowded boxes take the dense (blockwise) path; forcing the sparse sweep gives the same boxes."""
    boxes, scores = random_boxes(3000, 9, torch.float32, 60.0, ties=True)
    expected = reference_nms(boxes, scores, 0.5)
    order = scores.sort(descending=True, stable=True).indices
    cols = nms_module._columns(boxes[order])
    threshold = nms_module._threshold_below(0.5, boxes.dtype)
    assert nms_module._suppression_edges(cols, threshold, [3000]) is None  # too crowded for the sweep
    dense = order[nms_module._greedy_dense(cols, threshold, [3000])]
    share = nms_module._SPARSE_SHARE
    try:
        nms_module._SPARSE_SHARE = 1.0
        sparse = order[nms_module._resolve_edges(3000, *nms_module._suppression_edges(cols, threshold, [3000]))]
    finally:
        nms_module._SPARSE_SHARE = share
    assert np.array_equal(dense.numpy(), expected)
    assert np.array_equal(sparse.numpy(), expected)
    assert np.array_equal(nms(boxes, scores, 0.5).numpy(), expected)


def test_dense_path_with_many_classes():
    """Many crowded classes (an SSD's per-class candidates) go through the dense path lane by lane."""
    boxes, scores = random_boxes(6000, 10, torch.float32, 80.0, ties=True)
    idxs = torch.randint(0, 40, (6000,), generator=torch.Generator().manual_seed(10))
    idxs[:500] = 7  # one long class
    expected = reference_batched_nms(boxes, scores, idxs, 0.45)
    assert np.array_equal(batched_nms(boxes, scores, idxs, 0.45).numpy(), expected)


def test_threshold_compared_in_double():
    """The kernel compares the float32 IoU with the threshold in double: IoU 30/100 rounds to
    float32(0.3), which is above 0.3, so it suppresses at 0.3 but not at float32(0.3) itself."""
    t32 = float(np.float32(0.3))
    assert t32 > 0.3
    boxes = torch.tensor([[0.0, 0.0, 100.0, 1.0], [0.0, 0.0, 30.0, 1.0]])  # IoU = 30 / 100
    assert (torch.tensor(30.0) / torch.tensor(100.0)).item() == t32
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.3).tolist() == [0]
    assert nms(boxes, scores, t32).tolist() == [0, 1]
    assert nms(boxes.double(), scores.double(), 0.3).tolist() == [0, 1]  # exactly 0.3: not above


def test_edge_cases():
    empty = torch.zeros(0, 4)
    assert nms(empty, torch.zeros(0), 0.5).tolist() == []
    assert batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).tolist() == []
    one = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert nms(one, torch.tensor([0.3]), 0.5).tolist() == [0]
    same = one.repeat(50, 1)
    assert nms(same, torch.full((50,), 0.7), 0.5).tolist() == [0]  # equal scores: the first index wins
    assert batched_nms(same, torch.full((50,), 0.7), torch.arange(50) % 2, 0.5).tolist() == [0, 1]
    # empty boxes: 0/0 is above no threshold, so none suppresses another
    points = torch.tensor([[5.0, 5.0, 5.0, 5.0]] * 3)
    assert nms(points, torch.tensor([0.1, 0.3, 0.2]), 0.5).tolist() == [1, 2, 0]
    assert nms(points, torch.tensor([0.1, 0.3, 0.2]), -1.0).tolist() == [1, 2, 0]
    # a negative threshold: disjoint boxes (IoU 0) suppress each other
    apart = torch.tensor([[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    assert nms(apart, torch.tensor([0.2, 0.9]), -0.1).tolist() == [1]


@pytest.mark.parametrize("call", [
    lambda: nms(torch.zeros(3, 5), torch.zeros(3), 0.5),
    lambda: nms(torch.zeros(4), torch.zeros(1), 0.5),
    lambda: nms(torch.zeros(3, 4), torch.zeros(2), 0.5),
    lambda: nms(torch.zeros(3, 4), torch.zeros(3, 1), 0.5),
    lambda: nms(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3), 0.5),
    lambda: nms([[0, 0, 1, 1]], torch.zeros(1), 0.5),
    lambda: batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64), 0.5),
])
def test_bad_input_raises_input_error(call):
    with pytest.raises(InputError):
        call()
