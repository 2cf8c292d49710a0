"""Flow utilities: the Middlebury colour coding, .flo/.npy files (and their damaged forms), frame padding."""
from __future__ import annotations

import colorsys
import math
import struct

import numpy as np
import pytest
import torch

from visionzoo.data.flow import (
    FLO_MAGIC,
    Padding,
    color_wheel_legend,
    crop_padding,
    flow_to_color,
    load_flow,
    pad_to_multiple,
    read_flo,
    save_flow,
    write_flo,
)
from visionzoo.errors import InputError

# The wheel as Baker et al. define it, written out here independently of the implementation:
# six key colours, 15, 6, 4, 11, 13 and 6 steps apart (55 colours), and a flow direction (u, v)
# placed on the 54 intervals between them by the angle atan2(-v, -u) (right = red).
KEYS = [(255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 0, 255), (255, 0, 0)]
STEPS = [15, 6, 4, 11, 13, 6]


def wheel_rgb(u: float, v: float) -> tuple[float, float, float]:
    position = (math.atan2(-v, -u) / math.pi + 1) / 2 * 54
    start = 0
    for i, steps in enumerate(STEPS):
        if position <= start + steps:
            t = (position - start) / steps
            return tuple(a + (b - a) * t for a, b in zip(KEYS[i], KEYS[i + 1], strict=True))
        start += steps
    raise AssertionError("position beyond the wheel")


def hue_degrees(rgb) -> float:
    return 360 * colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def constant_field(u: float, v: float, h: int = 4, w: int = 5) -> np.ndarray:
    return np.stack([np.full((h, w), u), np.full((h, w), v)])


@pytest.mark.parametrize("u, v", [(3.0, -2.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0), (-2.0, 5.0)])
def test_a_constant_field_has_the_hue_of_its_direction_at_full_saturation(u, v):
    image = flow_to_color(constant_field(u, v))
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    assert (image == image[0, 0]).all()
    pixel = image[0, 0].astype(float)
    expected = wheel_rgb(u, v)
    hue_gap = abs(hue_degrees(pixel) - hue_degrees(expected))
    assert min(hue_gap, 360 - hue_gap) < 1.0
    assert np.abs(pixel - expected).max() <= 2  # the wheel's entries are floored to integers
    assert pixel.min() == 0 and pixel.max() == 255  # the field's own magnitude is the scale: saturated


def test_the_3_minus_2_field_is_magenta_leaning():
    # right and up: between blue (up) and red (right), near the blue-magenta-red boundary
    r, g, b = flow_to_color(torch.tensor(constant_field(3.0, -2.0)))[0, 0]
    assert g == 0 and b == 255 and 250 <= r <= 255


def test_magnitude_sets_saturation_and_unknown_flow_is_black():
    field = constant_field(3.0, -2.0)
    half = flow_to_color(field, max_magnitude=2 * math.hypot(3, -2))[0, 0]
    assert half.min() == 127  # halfway from white to the saturated colour
    beyond = flow_to_color(field, max_magnitude=0.5 * math.hypot(3, -2))[0, 0]
    full = flow_to_color(field)[0, 0]
    assert np.abs(beyond - 0.75 * full.astype(float)).max() <= 1  # beyond the scale: same hue, darker
    field[:, 0, 0] = np.nan
    field[:, 0, 1] = 0.0
    field[:, 0, 2] = 1.7e308  # finite components, a length beyond float64
    image = flow_to_color(field)
    assert image[0, 0].tolist() == [0, 0, 0]
    assert image[0, 1].tolist() == [255, 255, 255]
    assert image[0, 2].tolist() == [0, 0, 0]
    assert (image[1:] == full).all()  # NaNs do not change the scale of the others


def test_batches_are_scaled_per_image_unless_a_scale_is_given():
    batch = torch.stack([torch.tensor(constant_field(1.0, 0.0)), torch.tensor(constant_field(4.0, 0.0))])
    own = flow_to_color(batch)
    assert own.shape == (2, 4, 5, 3)
    assert (own[0] == own[1]).all()
    shared = flow_to_color(batch, max_magnitude=4.0)
    assert shared[0, 0, 0].min() > shared[1, 0, 0].min()  # the shorter vector is paler


def test_flow_to_color_rejects_bad_input():
    with pytest.raises(InputError, match="shape"):
        flow_to_color(np.zeros((3, 4, 4)))
    for bad in (0, -1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(InputError, match="max_magnitude"):
            flow_to_color(np.zeros((2, 4, 4)), max_magnitude=bad)


def test_color_wheel_legend():
    size = 41
    legend = color_wheel_legend(size)
    assert legend.shape == (size, size, 3) and legend.dtype == np.uint8
    assert legend[20, 20].tolist() == [255, 255, 255]  # no motion
    assert legend[0, 0].tolist() == [255, 255, 255]  # outside the wheel
    right, down = legend[20, 40].astype(float), legend[40, 20].astype(float)
    # exactly rightward is where the wheel closes: red, or the last step before it (255, 0, 43)
    assert right[0] == 255 and right[1] == 0 and right[2] <= 43
    assert np.abs(down - wheel_rgb(0, 1)).max() <= 2
    with pytest.raises(InputError):
        color_wheel_legend(2)


def test_flo_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    flow = rng.standard_normal((2, 5, 7)).astype(np.float32)
    path = write_flo(tmp_path / "a.flo", torch.from_numpy(flow))
    raw = path.read_bytes()
    assert raw[:12] == struct.pack("<fii", FLO_MAGIC, 7, 5)
    assert len(raw) == 12 + 8 * 35
    assert struct.unpack("<ff", raw[12:20]) == (flow[0, 0, 0], flow[1, 0, 0])  # u, v interleaved
    assert struct.unpack("<ff", raw[20:28]) == (flow[0, 0, 1], flow[1, 0, 1])  # row-major
    back = read_flo(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, flow)
    np.testing.assert_array_equal(load_flow(path), flow)
    assert not list(tmp_path.glob("*.tmp"))


def test_npy_round_trip(tmp_path):
    flow = np.random.default_rng(1).standard_normal((2, 6, 3))
    path = save_flow(tmp_path / "a.npy", flow)
    assert np.load(path).shape == (2, 6, 3)
    np.testing.assert_array_equal(load_flow(path), flow.astype(np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((3, 6, 3), np.float32))
    with pytest.raises(InputError, match=r"\(2, H, W\)"):
        load_flow(tmp_path / "bad.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(InputError):
        load_flow(tmp_path / "junk.npy")
    with pytest.raises(InputError, match="unknown flow file type"):
        save_flow(tmp_path / "a.png", flow)


def test_damaged_flo_files_are_refused(tmp_path):
    good = write_flo(tmp_path / "good.flo", np.ones((2, 4, 4), np.float32)).read_bytes()
    cases = {
        "empty.flo": b"",
        "short_header.flo": good[:7],
        "truncated.flo": good[:-4],
        "trailing.flo": good + b"\0\0\0\0",
        "garbage.flo": bytes(range(256)) * 3,
        "zero_size.flo": struct.pack("<fii", FLO_MAGIC, 0, 4),
        "negative.flo": struct.pack("<fii", FLO_MAGIC, -4, 4) + good[12:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError):
            read_flo(tmp_path / name)
    with pytest.raises(InputError, match="cannot read"):
        read_flo(tmp_path / "missing.flo")


def test_an_absurd_flo_header_is_refused_without_allocating(tmp_path):
    path = tmp_path / "huge.flo"
    path.write_bytes(struct.pack("<fii", FLO_MAGIC, 2**30, 2**30))  # 2**60 pixels announced
    with pytest.raises(InputError, match="outside"):
        read_flo(path)
    path.write_bytes(struct.pack("<fii", FLO_MAGIC, 10_000, 10_000))  # within the budget, but no data
    with pytest.raises(InputError, match="truncated"):
        read_flo(path)


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (3, 37, 53), (2, 3, 40, 56), (1, 3, 1, 9)])
def test_pad_and_crop_round_trip(shape):
    frames = [torch.rand(shape), torch.rand(shape)]
    padded, pads = pad_to_multiple(frames, 8)
    h, w = shape[-2:]
    for original, out in zip(frames, padded, strict=True):
        assert out.shape[:-2] == original.shape[:-2]
        assert out.shape[-2] % 8 == 0 and out.shape[-1] % 8 == 0
        assert 0 <= out.shape[-2] - h < 8 and 0 <= out.shape[-1] - w < 8
        assert torch.equal(crop_padding(out, pads), original)
        # edge pixels are repeated, not zeros
        assert torch.equal(out[..., 0, pads.left:pads.left + w], original[..., 0, :])
        assert torch.equal(out[..., -1, pads.left:pads.left + w], original[..., -1, :])
    assert abs(pads.top - pads.bottom) <= 1 and abs(pads.left - pads.right) <= 1
    flow = torch.zeros(*shape[:-3], 2, *padded[0].shape[-2:])
    assert crop_padding(flow, pads).shape[-2:] == (h, w)
    assert crop_padding(flow.numpy(), pads).shape[-2:] == (h, w)


def test_pad_to_a_minimum_size_and_bad_arguments():
    padded, pads = pad_to_multiple([torch.rand(3, 50, 130)], 8, min_size=128)
    assert padded[0].shape == (3, 128, 136)
    assert pads == Padding(39, 39, 3, 3)
    with pytest.raises(InputError, match="different sizes"):
        pad_to_multiple([torch.rand(3, 8, 8), torch.rand(3, 8, 16)])
    with pytest.raises(InputError, match="sequence"):
        pad_to_multiple(torch.rand(3, 8, 8))
    with pytest.raises(InputError, match="multiple"):
        pad_to_multiple([torch.rand(3, 8, 8)], 0)
    with pytest.raises(InputError, match="smaller than the padding"):
        crop_padding(torch.zeros(2, 4, 4), Padding(2, 2, 0, 0))
