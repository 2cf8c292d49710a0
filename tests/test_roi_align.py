"""RoIAlign and the multi-scale pooler against a slow reference written from the operator's
definition (one bilinear sample at a time, in NumPy), on random maps and boxes: boxes partly
outside the map, empty and inverted ones, several images, aligned or not, fixed and adaptive
sampling, float32 and float64."""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from visionzoo.errors import InputError
from visionzoo.ops import MultiScaleRoIAlign, roi_align
from visionzoo.ops.poolers import infer_scale, map_levels

roi_align_module = importlib.import_module("visionzoo.ops.roi_align")  # the package's roi_align is the function

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


def _bilinear(plane: np.ndarray, y, x) -> np.ndarray:
    """One sample of a (C, H, W) map with RoIAlign's border rules."""
    height, width = plane.shape[1:]
    if not (-1.0 <= y <= height and -1.0 <= x <= width):
        return np.zeros(plane.shape[0], plane.dtype)
    y, x = max(y, 0), max(x, 0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = y.dtype.type(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = x.dtype.type(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * plane[:, y0, x0] + hy * lx * plane[:, y0, x1]
            + ly * hx * plane[:, y1, x0] + ly * lx * plane[:, y1, x1])


def reference_roi_align(features: np.ndarray, rois: np.ndarray, output_size: tuple[int, int], scale: float,
                        sampling_ratio: int, aligned: bool) -> np.ndarray:
    out_h, out_w = output_size
    real = features.dtype.type
    out = np.zeros((len(rois), features.shape[1], out_h, out_w), features.dtype)
    for k, (batch, *box) in enumerate(rois):
        x1, y1, x2, y2 = (real(v) * real(scale) - real(0.5 if aligned else 0.0) for v in box)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, real(1)), max(roi_h, real(1))
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        for ph in range(out_h):
            for pw in range(out_w):
                total = np.zeros(features.shape[1], features.dtype)
                for iy in range(grid_h):
                    y = y1 + ph * bin_h + real(iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x1 + pw * bin_w + real(ix + 0.5) * bin_w / grid_w
                        total += _bilinear(features[int(batch)], y, x)
                out[k, :, ph, pw] = total / max(grid_h * grid_w, 1)
    return out


def random_rois(rng: np.random.Generator, count: int, images: int, height: float, width: float) -> np.ndarray:
    """Boxes in map coordinates x 4 (scale 0.25): many partly outside, some empty or inverted."""
    x1 = rng.uniform(-0.3, 1.1, count) * width * 4
    y1 = rng.uniform(-0.3, 1.1, count) * height * 4
    w = rng.exponential(0.4, count) * width * 4
    h = rng.exponential(0.4, count) * height * 4
    boxes = np.stack([x1, y1, x1 + w, y1 + h], 1)
    boxes[:3, 2] = boxes[:3, 0]  # zero width
    boxes[2:5, 3] = boxes[2:5, 1]  # zero height
    boxes[5:7, 2] = boxes[5:7, 0] - 3  # inverted
    batch = rng.integers(0, images, count)
    return np.concatenate([batch[:, None], boxes], 1)


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, 4, 9, 11)), random_rois(rng, 40, 3, 9, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_matches_reference(case, dtype, aligned, sampling_ratio):
    features, rois = case
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    expected = reference_roi_align(features.astype(np_dtype), rois.astype(np_dtype), (3, 4), 0.25, sampling_ratio,
                                   aligned)
    out = roi_align(torch.from_numpy(features).to(dtype), torch.from_numpy(rois).to(dtype), (3, 4), 0.25,
                    sampling_ratio, aligned)
    assert out.shape == (len(rois), 4, 3, 4) and out.dtype == dtype
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=TOLERANCE[dtype])
    assert np.abs(expected).max() > 0.5  # the boxes do pool something


def test_roi_align_box_list_chunks_and_groups_agree(case, monkeypatch):
    """A list of boxes per image is the (K, 5) form; chunking and adaptive grid groups change
    nothing; rois come out in the order they went in."""
    features, rois = case
    x, r = torch.from_numpy(features), torch.from_numpy(rois)
    full = roi_align(x, r, 5, 0.25, -1)
    per_image = [r[r[:, 0] == i, 1:] for i in range(3)]
    order = torch.cat([torch.nonzero(r[:, 0] == i).squeeze(1) for i in range(3)])
    torch.testing.assert_close(roi_align(x, per_image, 5, 0.25, -1), full[order], rtol=0, atol=1e-12)
    monkeypatch.setattr(roi_align_module, "_ENTRY_BUDGET", 2000)  # several chunks per grid group
    torch.testing.assert_close(roi_align(x, r, 5, 0.25, -1), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(roi_align(x, r[3:4], 5, 0.25, -1), full[3:4], rtol=0, atol=1e-12)


def test_roi_align_known_values():
    """A ramp map: the average of bilinear samples of a linear function is its value at the bin
    centre (inside the map); one image's box does not read another image."""
    ramp = torch.arange(8.0, dtype=torch.float64).repeat(8, 1)  # value = x
    x = torch.stack([ramp, 100 + ramp.T])[:, None]  # image 1: value = 100 + y
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 3.0], [1, 2.0, 0.5, 4.0, 6.5]], dtype=torch.float64)
    out = roi_align(x, rois, (2, 4), 1.0, 2, aligned=False)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.5, 2.5, 3.5, 4.5], dtype=torch.float64).expand(2, 4))
    torch.testing.assert_close(out[1, 0], torch.tensor([[2.0], [5.0]], dtype=torch.float64).expand(2, 4) + 100)
    # one sample per bin, at x = 8 (the map's width: still read, as the last column) and at
    # x = 10 (beyond: 0); at y = -1 (still read, as the first row) and y = -1.5 (beyond: 0)
    edge = torch.tensor([[0, 7.0, 2.0, 11.0, 4.0], [1, 1.0, -1.5, 3.0, -0.5], [1, 1.0, -2.0, 3.0, -1.0]],
                        dtype=torch.float64)
    out = roi_align(x, edge, (1, 2), 1.0, 1)
    assert out[:, 0, 0].tolist() == [[7.0, 0.0], [100.0, 100.0], [0.0, 0.0]]


def test_roi_align_empty_inputs():
    x = torch.randn(2, 3, 6, 6)
    assert roi_align(x, torch.zeros(0, 5), 7).shape == (0, 3, 7, 7)
    assert roi_align(x, [torch.zeros(0, 4), torch.zeros(0, 4)], (2, 3)).shape == (0, 3, 2, 3)
    out = roi_align(x, [torch.zeros(0, 4), torch.tensor([[0.0, 0, 3, 3]])], 2)
    assert out.shape == (1, 3, 2, 2) and out.abs().sum() > 0


def test_roi_align_gradient():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.6, 4.2, 3.9], [0, -1.5, 2.0, 2.5, 7.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 2, 1.0, 2), (x,))


@pytest.mark.parametrize("call, message", [
    (lambda x: roi_align(x, torch.zeros(3, 4), 7), "(K, 5)"),
    (lambda x: roi_align(x, [torch.zeros(3, 5)], 7), "(L, 4)"),
    (lambda x: roi_align(x, torch.zeros(3, 5, dtype=torch.float64), 7), "convert the boxes"),
    (lambda x: roi_align(x, torch.tensor([[2.0, 0, 0, 1, 1]]), 7), "batch indices"),
    (lambda x: roi_align(x, torch.tensor([[-1.0, 0, 0, 1, 1]]), 7), "batch indices"),
    (lambda x: roi_align(x, torch.zeros(1, 5), 0), "output_size"),
    (lambda x: roi_align(x, torch.zeros(1, 5), (7, 7, 7)), "output_size"),
    (lambda x: roi_align(x, torch.zeros(1, 5), 7, sampling_ratio=2.0), "sampling_ratio"),
    (lambda x: roi_align(x[0], torch.zeros(1, 5), 7), "(N, C, H, W)"),
    (lambda x: roi_align(x.long(), torch.zeros(1, 5).long(), 7), "floating-point"),
    (lambda x: roi_align(x, "boxes", 7), "list of (L, 4)"),
])
def test_roi_align_bad_input(call, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(torch.randn(2, 3, 8, 8))


# -- the multi-scale pooler ------------------------------------------------------------------------

def test_level_rule_on_known_boxes():
    """floor(4 + log2(sqrt(area) / 224) + 1e-6), clamped to [2, 5], less 2: a 224 px box is
    level 4; exactly 112 px is level 3 (the eps); just below is level 2."""
    sides = torch.tensor([224.0, 112.0, 111.9, 448.0, 447.0, 1.0, 0.0, 5000.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], 1)
    wide = torch.tensor([[10.0, 20.0, 10.0 + 4 * 224, 20.0 + 224 / 4]])  # area of a 224 px square
    inverted = torch.tensor([[10.0, 10.0, 5.0, 30.0]])
    levels = map_levels([boxes, wide, inverted], 2, 5)
    assert levels.tolist() == [2, 1, 0, 3, 2, 0, 0, 3, 2, -1]
    assert map_levels([boxes.double()], 2, 5).tolist() == levels[:8].tolist()


def test_infer_scale_rounds_to_powers_of_two():
    assert infer_scale((200, 304), (800, 1216)) == 0.25
    assert infer_scale((25, 38), (800, 1216)) == 1 / 32
    assert infer_scale((101, 9), (800, 1216)) == 0.125  # the height ratio, rounded in log2
    assert infer_scale((160, 9), (800, 1216)) == 0.25  # 0.2 is nearer 1/4 than 1/8 in log2
    assert infer_scale((13, 17), (100, 100)) == 0.125


def _pyramid(rng: np.random.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sizes = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "pool": 64}
    return {name: torch.from_numpy(rng.standard_normal((2, 3, 256 // s, 320 // s))).to(dtype)
            for name, s in sizes.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiscale_pools_each_box_from_its_level_in_input_order(dtype):
    rng = np.random.default_rng(1)
    features = _pyramid(rng, dtype)
    sides = np.exp(rng.uniform(np.log(4), np.log(400), (30, 2)))
    corner = rng.uniform(-20, 300, (30, 2))
    boxes = np.concatenate([corner, corner + sides], 1)
    boxes[0] = [10, 10, 10, 50]  # empty: the lowest level
    boxes[1] = [60, 10, 20, 50]  # inverted: no level, zeros
    boxes[2] = [0, 0, 224, 224]
    boxes[3] = [-50, -40, 450, 460]  # mostly outside the image: the top level
    per_image = [torch.from_numpy(boxes[:18]).to(dtype), torch.from_numpy(boxes[18:]).to(dtype)]
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], (3, 2), 2)
    out = pooler(features, per_image, [(250, 320), (240, 300)])
    assert out.shape == (30, 3, 3, 2) and out.dtype == dtype

    levels = map_levels(per_image, 2, 5).numpy()
    assert set(levels[2:]) >= {0, 1, 2, 3} and levels[0] == 0 and levels[1] == -1
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    names = ["p2", "p3", "p4", "p5"]
    expected = np.zeros((30, 3, 3, 2), np_dtype)
    for k, level in enumerate(levels):
        if level >= 0:
            roi = np.concatenate([[0 if k < 18 else 1], boxes[k]])[None].astype(np_dtype)
            expected[k] = reference_roi_align(features[names[level]].numpy(), roi, (3, 2), 2.0 ** -(level + 2), 2,
                                              False)[0]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=TOLERANCE[dtype])


def test_multiscale_single_level_and_unused_maps():
    """One named map: plain RoIAlign at its scale, every box (even an inverted one); maps not
    named are ignored; an image without boxes is fine."""
    rng = np.random.default_rng(2)
    features = _pyramid(rng, torch.float64)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 120.0], [60.0, 10.0, 20.0, 50.0]], dtype=torch.float64)
    pooler = MultiScaleRoIAlign(["p4"], 4, -1)
    out = pooler(features, [torch.zeros(0, 4, dtype=torch.float64), boxes], [(256, 320)] * 2)
    rois = torch.cat([torch.ones(2, 1, dtype=torch.float64), boxes], 1)
    torch.testing.assert_close(out, roi_align(features["p4"], rois, 4, 1 / 16, -1), rtol=0, atol=0)
    assert out[1].abs().sum() > 0
    empty = pooler(features, [torch.zeros(0, 4, dtype=torch.float64)] * 2, [(256, 320)] * 2)
    assert empty.shape == (0, 3, 4, 4)


def test_multiscale_bad_input():
    features = _pyramid(np.random.default_rng(3), torch.float32)
    boxes = [torch.zeros(1, 4), torch.zeros(1, 4)]
    with pytest.raises(InputError, match="none of the pooled feature maps"):
        MultiScaleRoIAlign(["x"], 7, 2)(features, boxes, [(256, 320)] * 2)
    with pytest.raises(InputError, match="image_shapes"):
        MultiScaleRoIAlign(["p2"], 7, 2)(features, boxes, [])
    with pytest.raises(InputError, match="one \\(L, 4\\) tensor per image"):
        MultiScaleRoIAlign(["p2"], 7, 2)(features, boxes[:1], [(256, 320)])
    with pytest.raises(InputError, match="featmap_names"):
        MultiScaleRoIAlign("p2", 7, 2)
    with pytest.raises(InputError, match="output_size"):
        MultiScaleRoIAlign(["p2"], -7, 2)
