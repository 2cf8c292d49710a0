"""RAFT's behaviour around the network: the flow-model contract, input checks, dtypes, and the
pad -> flow -> crop path for frames of any size (parity itself is in test_raft_parity.py)."""
from __future__ import annotations

import pytest
import torch

from visionzoo.data.flow import crop_padding, pad_to_multiple
from visionzoo.enums import Task
from visionzoo.errors import InputError
from visionzoo.models import raft


@pytest.fixture(scope="module")
def small() -> raft.RAFT:
    torch.manual_seed(0)
    return raft.MODEL_CLASS(raft.VARIANTS["raft_small"]).eval()


def test_flow_models_have_no_classes(small):
    assert small.task is Task.OPTICAL_FLOW
    assert small.num_classes == 0
    with pytest.raises(InputError, match="no class head"):
        small.reset_classifier(10)


def test_returns_every_estimate_at_full_resolution_in_the_input_dtype(small):
    a, b = torch.rand(1, 3, 128, 136) * 2 - 1, torch.rand(1, 3, 128, 136) * 2 - 1
    with torch.no_grad():
        flows = small(a, b, num_flow_updates=2)
        last = small(a, b, num_flow_updates=2, all_estimates=False)
        flows64 = small.double()(a.double(), b.double(), num_flow_updates=1)
    small.float()
    assert len(flows) == 2
    assert all(f.shape == (1, 2, 128, 136) and f.dtype == torch.float32 for f in flows)
    assert not torch.equal(flows[0], flows[-1])  # each update moves the estimate
    assert len(last) == 1 and torch.equal(last[0], flows[-1])
    assert flows64[0].dtype == torch.float64
    assert torch.allclose(flows64[0].float(), flows[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape, match", [
    ((1, 3, 130, 136), r"130x136 \(HxW\) is not a multiple of 8; pad"),
    ((1, 3, 64, 128), "too small"),
    ((1, 1, 128, 128), r"\(N, 3, H, W\)"),
])
def test_bad_frame_sizes_are_refused(small, shape, match):
    with pytest.raises(InputError, match=match):
        small(torch.zeros(shape), torch.zeros(shape))


def test_bad_pairs_and_update_counts_are_refused(small):
    a = torch.zeros(1, 3, 128, 128)
    with pytest.raises(InputError, match="same size"):
        small(a, torch.zeros(1, 3, 128, 136))
    for bad in (0, 2.0, True):
        with pytest.raises(InputError, match="num_flow_updates"):
            small(a, a, num_flow_updates=bad)


def test_frames_of_any_size_go_through_pad_and_crop(small):
    frames = [torch.rand(1, 3, 101, 123), torch.rand(1, 3, 101, 123)]
    padded, pads = pad_to_multiple(frames, 8, min_size=small.min_size)
    assert padded[0].shape[-2:] == (128, 128)
    with torch.no_grad():
        flow = small(*padded, num_flow_updates=1)[-1]
    assert crop_padding(flow, pads).shape == (1, 2, 101, 123)


def test_lookup_matches_explicit_bilinear_sampling():
    """The correlation lookup against a direct formula, including matches far outside the map."""
    torch.manual_seed(0)
    n, h, w, radius = 1, 4, 5, 1
    pyramid = [torch.randn(n * h * w, 1, h, w, dtype=torch.float64)]
    pyramid.append(torch.nn.functional.avg_pool2d(pyramid[0], 2, 2))
    coords = raft.coords_grid(n, h, w, torch.float64, torch.device("cpu")) + 3 * torch.randn(n, 2, h, w,
                                                                                          dtype=torch.float64)
    coords[0, :, 0, 0] = torch.tensor([-40.0, 2.5])  # far off the map: zeros
    out = raft.lookup_correlation(pyramid, coords, radius)
    side = 2 * radius + 1
    assert out.shape == (n, 2 * side * side, h, w)

    def sample(img: torch.Tensor, x: float, y: float) -> float:
        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
        total = 0.0
        for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
            for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                if 0 <= xi < img.shape[1] and 0 <= yi < img.shape[0]:
                    total += wx * wy * float(img[yi, xi])
        return total

    for i in range(h):
        for j in range(w):
            x, y = coords[0, :, i, j].tolist()
            for level, volume in enumerate(pyramid):
                img = volume[i * w + j, 0]
                for dx in range(-radius, radius + 1):
                    for dy in range(-radius, radius + 1):
                        channel = level * side * side + (dx + radius) * side + (dy + radius)
                        expected = sample(img, x / 2**level + dx, y / 2**level + dy)
                        assert abs(float(out[0, channel, i, j]) - expected) < 1e-12
