"""Mask pasting and keypoint decoding against the plain per-box procedure (one F.interpolate per
box, slicing into the image, an arg-max per heatmap), and on masks and heatmaps whose result is
known."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionzoo.errors import InputError
from visionzoo.ops.masks import heatmaps_to_keypoints, paste_masks_in_image

masks_module = importlib.import_module("visionzoo.ops.masks")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


def reference_paste(masks: torch.Tensor, boxes: torch.Tensor, img_shape: tuple[int, int], padding: int = 1):
    """Per box: pad the mask, grow the box by the same factor, resize to the integer box, paste."""
    im_h, im_w = img_shape
    scale = (masks.shape[-1] + 2 * padding) / masks.shape[-1]
    out = masks.new_zeros((len(masks), 1, im_h, im_w))
    for i, (mask, box) in enumerate(zip(masks, boxes, strict=True)):
        padded = F.pad(mask[None], (padding,) * 4)
        centre_x, centre_y = (box[2] + box[0]) * 0.5, (box[3] + box[1]) * 0.5
        half_w, half_h = (box[2] - box[0]) * 0.5 * scale, (box[3] - box[1]) * 0.5 * scale
        x1, x2 = int(centre_x - half_w), int(centre_x + half_w)  # int() truncates toward 0, as .long()
        y1, y2 = int(centre_y - half_h), int(centre_y + half_h)
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        resized = F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        top, bottom, left, right = max(y1, 0), min(y2 + 1, im_h), max(x1, 0), min(x2 + 1, im_w)
        if top < bottom and left < right:
            out[i, 0, top:bottom, left:right] = resized[top - y1:bottom - y1, left - x1:right - x1]
    return out


def reference_keypoints(maps: torch.Tensor, rois: torch.Tensor):
    keypoints = torch.ones((len(rois), maps.shape[1], 3))
    scores = torch.zeros((len(rois), maps.shape[1]))
    for i, (x1, y1, x2, y2) in enumerate(rois.tolist()):
        width, height = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        w, h = int(np.ceil(width)), int(np.ceil(height))
        resized = F.interpolate(maps[i][:, None], size=(h, w), mode="bicubic", align_corners=False)[:, 0]
        best = resized.flatten(1).argmax(1)
        row, col = best // w, best % w
        keypoints[i, :, 0] = (col.float() + 0.5) * np.float32(width / w) + np.float32(x1)
        keypoints[i, :, 1] = (row.float() + 0.5) * np.float32(height / h) + np.float32(y1)
        scores[i] = resized[torch.arange(len(best)), row, col].float()
    return keypoints, scores


@pytest.fixture(scope="module")
def mask_case() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    count = 25
    masks = rng.uniform(0, 1, (count, 1, 28, 28))
    corner = rng.uniform(-10, 150, (count, 2))
    boxes = np.concatenate([corner, corner + rng.exponential(40, (count, 2)) + 0.2], 1)
    boxes[:20] = boxes[:20].clip(0, [160, 120, 160, 120])  # as detectors clip them
    boxes[0] = [0, 0, 160, 120]  # the whole image
    boxes[1] = [150.5, 100.2, 160, 120]  # at the bottom-right border
    boxes[2] = [3, 4, 3, 4]  # a point
    boxes[20] = [-30.3, -12.7, 40.2, 20.9]  # partly outside, top left
    boxes[21] = [140.6, 100.1, 190.3, 150.8]  # partly outside, bottom right
    return torch.from_numpy(masks), torch.from_numpy(boxes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paste_matches_per_box_procedure(mask_case, dtype):
    masks, boxes = (t.to(dtype) for t in mask_case)
    out = paste_masks_in_image(masks, boxes, (120, 160))
    assert out.shape == (len(masks), 1, 120, 160) and out.dtype == dtype
    expected = reference_paste(masks, boxes, (120, 160))
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE[dtype])
    assert torch.equal(out != 0, expected != 0)  # the same pixels touched, exactly
    padded = paste_masks_in_image(masks, boxes, (120, 160), padding=3)
    torch.testing.assert_close(padded, reference_paste(masks, boxes, (120, 160), 3), rtol=0, atol=TOLERANCE[dtype])


def test_paste_known_masks():
    """A 4x4 mask of ones padded by one: the box [10, 10, 14, 14] grows by 1.5 to [9, 9, 15, 15],
    a 7x7 paste; at the image border the paste is cut."""
    ones = torch.ones(3, 1, 4, 4, dtype=torch.float64)
    boxes = torch.tensor([[10.0, 10, 14, 14], [0, 0, 4, 4], [26, 26, 30, 30]], dtype=torch.float64)
    out = paste_masks_in_image(ones, boxes, (30, 30))[:, 0]
    padded = F.pad(ones[0], (1, 1, 1, 1))[None]
    resized = F.interpolate(padded, size=(7, 7), mode="bilinear", align_corners=False)[0, 0]
    assert torch.count_nonzero(resized) == 25  # the outer ring samples only the zero padding
    torch.testing.assert_close(out[0, 9:16, 9:16], resized)
    assert out[0, 12, 12] == 1.0
    torch.testing.assert_close(out[1, :6, :6], resized[1:, 1:])  # grown box [-1, -1, 5, 5]: first row cut
    torch.testing.assert_close(out[2, 25:, 25:], resized[:5, :5])  # grown box [25, 25, 31, 31]
    assert [int(torch.count_nonzero(o)) for o in out] == [25, 25, 16]  # nothing outside the boxes


def test_paste_edge_cases():
    masks = torch.rand(2, 1, 5, 5)
    outside = paste_masks_in_image(masks, torch.tensor([[-50.0, -50, -20, -20], [300, 10, 400, 20]]), (40, 60))
    assert outside.shape == (2, 1, 40, 60) and not outside.any()
    assert paste_masks_in_image(masks[:0], torch.zeros(0, 4), (40, 60)).shape == (0, 1, 40, 60)


@pytest.mark.parametrize("call, message", [
    (lambda m, b: paste_masks_in_image(m[:, 0], b, (40, 60)), "(N, 1, M, M)"),
    (lambda m, b: paste_masks_in_image(m, b[:1], (40, 60)), "(2, 4)"),
    (lambda m, b: paste_masks_in_image(m, b, (40,)), "img_shape"),
    (lambda m, b: paste_masks_in_image(m, b, (0, 60)), "img_shape"),
    (lambda m, b: paste_masks_in_image(m, b, (40, 60), padding=-1), "padding"),
    (lambda m, b: heatmaps_to_keypoints(m[:, 0], b), "(K, J, S, S)"),
    (lambda m, b: heatmaps_to_keypoints(m, b[:, :3]), "(2, 4)"),
    (lambda m, b: paste_masks_in_image(m, b * torch.tensor([1.0, float("nan")])[:, None], (40, 60)), "NaN"),
    (lambda m, b: heatmaps_to_keypoints(m, b * torch.tensor([1.0, float("inf")])[:, None]), "infinite"),
])
def test_bad_input(call, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(torch.rand(2, 1, 5, 5), torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]]))


# -- keypoints --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keypoints_match_per_box_procedure(dtype, monkeypatch):
    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.standard_normal((10, 17, 56, 56))).to(dtype)
    corner = rng.uniform(0, 300, (10, 2))
    rois = np.concatenate([corner, corner + rng.exponential(60, (10, 2)) + 0.3], 1)
    rois[0, 2] = rois[0, 0] + 0.5  # narrower than a pixel: one column
    rois[1, 2:] = rois[1, :2] + 56.0  # the heatmap's own size
    rois = torch.from_numpy(rois).to(dtype)
    keypoints, scores = heatmaps_to_keypoints(maps, rois)
    assert keypoints.shape == (10, 17, 3) and scores.shape == (10, 17)
    assert keypoints.dtype == scores.dtype == torch.float32  # as torchvision, whatever the input
    expected_kp, expected_scores = reference_keypoints(maps, rois)
    torch.testing.assert_close(keypoints, expected_kp, rtol=0, atol=0)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=TOLERANCE[torch.float32])
    monkeypatch.setattr(masks_module, "_CANVAS_BUDGET", 17 * 60 * 60)  # about one box per chunk
    again = heatmaps_to_keypoints(maps, rois)
    torch.testing.assert_close(again[0], keypoints, rtol=0, atol=0)
    torch.testing.assert_close(again[1], scores, rtol=0, atol=1e-6)  # other matrix shapes: other rounding


def test_keypoints_known_peak():
    """A single peak on a box of the heatmap's size (no resize) lands at its pixel's centre."""
    maps = torch.zeros(2, 3, 56, 56)
    maps[0, :, 10, 20] = 5.0
    maps[1, 0, 55, 0] = 2.0  # the last row, first column; other joints flat: the first pixel wins
    rois = torch.tensor([[100.0, 50.0, 156.0, 106.0], [0.0, 0.0, 56.0, 56.0]])
    keypoints, scores = heatmaps_to_keypoints(maps, rois)
    assert keypoints[0].tolist() == [[120.5, 60.5, 1.0]] * 3 and scores[0].tolist() == [5.0] * 3
    assert keypoints[1, 0].tolist() == [0.5, 55.5, 1.0] and scores[1, 0] == 2.0
    assert keypoints[1, 1].tolist() == [0.5, 0.5, 1.0] and scores[1, 1] == 0.0


def test_keypoints_empty():
    keypoints, scores = heatmaps_to_keypoints(torch.zeros(0, 17, 56, 56), torch.zeros(0, 4))
    assert keypoints.shape == (0, 17, 3) and scores.shape == (0, 17)
