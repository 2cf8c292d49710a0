"""Box utilities and coders: hand-computed values, round trips, and input errors."""
from __future__ import annotations

import math

import pytest
import torch

from visionzoo import InputError
from visionzoo.ops import (
    BoxCoder,
    BoxFormat,
    BoxLinearCoder,
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    generalized_box_iou,
    remove_small_boxes,
)

XYXY = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 1.0, 3.0]])
XYWH = torch.tensor([[10.0, 20.0, 20.0, 40.0], [0.0, 0.0, 1.0, 3.0]])
CXCYWH = torch.tensor([[20.0, 40.0, 20.0, 40.0], [0.5, 1.5, 1.0, 3.0]])


@pytest.mark.parametrize("src,dst", [(a, b) for a in ("xyxy", "xywh", "cxcywh") for b in ("xyxy", "xywh", "cxcywh")])
def test_box_convert_every_pair(src, dst):
    given = {"xyxy": XYXY, "xywh": XYWH, "cxcywh": CXCYWH}
    out = box_convert(given[src], src, dst)
    torch.testing.assert_close(out, given[dst], rtol=0, atol=0)
    assert out is not given[src]


def test_box_convert_accepts_enum_and_batches():
    boxes = XYXY.expand(3, 2, 4)
    assert box_convert(boxes, BoxFormat.XYXY, BoxFormat.CXCYWH).shape == (3, 2, 4)
    with pytest.raises(InputError, match="box format"):
        box_convert(XYXY, "xyxy", "yxyx")


def test_area_iou_giou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert box_area(a).tolist() == [4.0, 1.0]
    assert box_area(torch.tensor([[2.0, 0.0, 0.0, 3.0]])).tolist() == [-6.0]  # inverted box
    assert box_area(torch.tensor([[0, 0, 300, 300]], dtype=torch.int16)).dtype == torch.int32  # no overflow
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0].item() == pytest.approx(1 / 7) and iou[0, 1].item() == 0.0
    assert iou[1, 1].item() == 0.0
    empty = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert math.isnan(box_iou(empty, empty).item())  # 0/0, as torchvision's
    giou = generalized_box_iou(a, b)
    assert giou[0, 0].item() == pytest.approx(1 / 7 - 2 / 9)
    assert giou[1, 1].item() == pytest.approx(0 - (9 - 2) / 9)
    torch.testing.assert_close(generalized_box_iou(a, a).diagonal(), torch.ones(2))


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -5.0, 50.0, 70.0], [1.0, 2.0, 3.0, 4.0]])
    clipped = clip_boxes_to_image(boxes, (60, 40))  # (height, width)
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 60.0], [1.0, 2.0, 3.0, 4.0]]
    assert clip_boxes_to_image(boxes[None].expand(2, 2, 4), (60, 40)).shape == (2, 2, 4)
    small = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 5.0, 0.5]])
    assert remove_small_boxes(small, 1.0).tolist() == [0, 1]
    assert remove_small_boxes(small, 2.0).tolist() == [1]


def test_box_coder_known_values_and_round_trip():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64)
    matched = torch.tensor([[2.0, 4.0, 12.0, 28.0]], dtype=torch.float64)
    deltas = coder.encode(matched, reference)
    torch.testing.assert_close(deltas, torch.tensor([[2.0, 3.0, 0.0, 5 * math.log(1.2)]], dtype=torch.float64))
    torch.testing.assert_close(coder.decode(deltas, reference), matched)

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100
    ref = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g, dtype=torch.float64) * 50], 1)
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100
    gt = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g, dtype=torch.float64) * 50], 1)
    torch.testing.assert_close(coder.decode(coder.encode(gt, ref), ref), gt, rtol=1e-12, atol=1e-10)


def test_box_coder_several_boxes_per_reference_and_clip():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0]])
    deltas = torch.zeros(2, 12)  # 3 boxes per reference (a class each in R-CNN heads)
    deltas[:, 4] = 0.5  # second box: shifted right by half the width
    deltas[:, 10] = 100.0  # third box: log width far beyond the clip
    boxes = coder.decode(deltas, reference)
    assert boxes.shape == (2, 12)
    assert boxes[0, :4].tolist() == [0.0, 0.0, 10.0, 10.0]
    assert boxes[0, 4:8].tolist() == [5.0, 0.0, 15.0, 10.0]
    width = boxes[0, 10] - boxes[0, 8]
    assert width.item() == pytest.approx(10 * 1000 / 16, rel=1e-6)  # exp(log(1000 / 16)) times 10
    batched = coder.decode_batched(deltas, [reference[:1], reference[1:]])
    assert batched.shape == (2, 3, 4)
    torch.testing.assert_close(batched.reshape(2, 12), boxes)
    with pytest.raises(InputError, match="4 values"):
        BoxCoder((1.0, 1.0))


def test_box_linear_coder():
    coder = BoxLinearCoder(normalize_by_size=True)
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[1.0, 2.0, 8.0, 9.0]])
    codes = coder.encode(reference, box)
    torch.testing.assert_close(codes, torch.tensor([[0.4, 0.3, 0.3, 0.4]]))
    torch.testing.assert_close(coder.decode(codes, reference), box)
    raw = BoxLinearCoder(normalize_by_size=False)
    assert raw.encode(reference, box).tolist() == [[4.0, 3.0, 3.0, 4.0]]
    # batched (images, anchors, 4), as FCOS's loss uses it
    assert coder.decode(codes[None].expand(2, 3, 4), reference[None].expand(2, 3, 4)).shape == (2, 3, 4)


@pytest.mark.parametrize("call", [
    lambda: box_area(torch.zeros(3, 5)),
    lambda: box_iou(torch.zeros(3, 4), torch.zeros(2, 3)),
    lambda: box_convert(torch.zeros(4, 2), "xyxy", "xywh"),
    lambda: clip_boxes_to_image(torch.zeros(2), (10, 10)),
    lambda: remove_small_boxes([[0, 0, 1, 1]], 1.0),
])
def test_bad_shapes_raise_input_error(call):
    with pytest.raises(InputError):
        call()
