"""`flow`: RAFT on a pair shifted by a known translation, the plumbing around it (padding and cropping
odd sizes, resizing frames over the memory limit, files), the colour of a known field, and videos.

A filled (not pre-trained) RAFT predicts no meaningful flow, so what is checked is everything but
the network's answer: shapes, formats, the hue of an exact field, the limit, the CLI."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo.data.flow import flow_to_color, load_flow
from visionzoo.errors import InputError
from visionzoo.tasks.flow import correlation_bytes, estimate_flow, flow_image, working_size, write_flow_outputs

from .parity import fill_
from .photos import sample_image

SHIFT = (3, -2)  # the second frame is the first moved 3 pixels right and 2 up


@pytest.fixture(scope="module")
def raft():
    import visionzoo

    model = visionzoo.create_model("raft_small")
    return fill_(model, 0).eval()


@pytest.fixture(scope="module")
def shifted_pair(tmp_path_factory):
    """A real photo and the same photo shifted by SHIFT, odd-sized (not multiples of 8)."""
    folder = tmp_path_factory.mktemp("pair")
    photo = np.asarray(Image.open(sample_image("chelsea.png")).convert("RGB").resize((141, 131)))
    dx, dy = SHIFT
    second = np.roll(photo, shift=(dy, dx), axis=(0, 1))
    Image.fromarray(photo).save(folder / "a.png")
    Image.fromarray(second).save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def _hue(rgb) -> float:
    r, g, b = (c / 255 for c in rgb)
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360


def test_the_colour_of_an_exact_shift_field_has_the_expected_hue():
    field = np.stack([np.full((8, 8), 3.0), np.full((8, 8), -2.0)])
    color = flow_to_color(field)[0, 0]
    # Middlebury's wheel: right and up lies between blue-magenta and magenta-red; it is magenta at full
    # saturation (the largest vector of the image), about 300 degrees of hue
    assert tuple(color) == pytest.approx((255, 0, 255), abs=25) and abs(_hue(color) - 300) < 12
    opposite = flow_to_color(-field)[0, 0]  # left and down: between green and cyan
    assert abs(_hue(opposite) - 135) < 20
    half = flow_to_color(field, max_magnitude=2 * float(np.hypot(3, 2)))[0, 0]  # half the scale: paler, same hue
    assert half.min() > color.min() and abs(_hue(half) - _hue(color)) < 3


def test_flow_of_a_shifted_pair_is_padded_and_cropped_back(raft, shifted_pair, tmp_path):
    seen = []
    handle = raft.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        flow = estimate_flow(raft, *shifted_pair, updates=2)
    finally:
        handle.remove()
    assert flow.shape == (2, 131, 141) and flow.dtype == np.float32 and np.isfinite(flow).all()
    assert seen == [(1, 3, 136, 144)]  # padded to multiples of 8 for the network
    outputs = write_flow_outputs(flow, [tmp_path / "flow.png", tmp_path / "flow.npy", tmp_path / "flow.flo"])
    assert [p.name for p in outputs] == ["flow.png", "flow.npy", "flow.flo"]
    assert np.array_equal(load_flow(tmp_path / "flow.npy"), flow)  # the .npy round-trips exactly
    assert np.array_equal(load_flow(tmp_path / "flow.flo"), flow)
    image = Image.open(tmp_path / "flow.png")
    assert image.height == 131 and image.width > 141  # the flow, then the legend beside it
    assert np.array_equal(np.asarray(image)[:, :141], flow_to_color(flow))


def test_an_exact_field_round_trips_through_the_files(tmp_path):
    field = np.stack([np.full((20, 30), 3.0, np.float32), np.full((20, 30), -2.0, np.float32)])
    write_flow_outputs(field, [tmp_path / "f.npy", tmp_path / "f.png"])
    assert np.array_equal(load_flow(tmp_path / "f.npy"), field)
    pixel = np.asarray(Image.open(tmp_path / "f.png"))[10, 15]
    assert abs(_hue(pixel) - 300) < 12


def test_frames_over_the_limit_are_resized_and_the_flow_scaled_back(raft, shifted_pair):
    assert correlation_bytes(720, 1280) == pytest.approx(1.03 * 2**30, rel=0.01)
    assert working_size(720, 1280, 1280 * 720) == (720, 1280)
    assert working_size(1080, 1920, 1280 * 720) == (720, 1280)
    seen = []
    handle = raft.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        flow = estimate_flow(raft, *shifted_pair, updates=1, max_pixels=128 * 128)
    finally:
        handle.remove()
    assert flow.shape == (2, 131, 141)
    # the network saw the frames reduced to 132x123, padded to multiples of 8 (144x136 at full size)
    assert working_size(131, 141, 128 * 128) == (123, 132) and seen == [(1, 3, 128, 136)]


def test_a_constant_flow_from_a_resized_run_is_scaled_to_the_frames(monkeypatch, raft, shifted_pair):
    """The flow computed on frames resized by (sx, sy) comes back multiplied by (1/sx, 1/sy)."""
    def constant(self, image1, image2, num_flow_updates=12, *, all_estimates=True):
        n, _, h, w = image1.shape
        return [torch.stack([torch.full((n, h, w), 1.5), torch.full((n, h, w), -1.0)], dim=1)]

    monkeypatch.setattr(type(raft), "forward", constant)
    flow = estimate_flow(raft, *shifted_pair, updates=1, max_pixels=70 * 65)
    h, w = working_size(131, 141, 70 * 65)
    assert np.allclose(flow[0], 1.5 * 141 / w) and np.allclose(flow[1], -1.0 * 131 / h)


def test_errors_name_the_problem(raft, shifted_pair, tmp_path):
    with pytest.raises(InputError, match="unknown output type"):
        write_flow_outputs(np.zeros((2, 4, 4), np.float32), [tmp_path / "flow.txt"])
    Image.new("RGB", (50, 40)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="differ in size"):
        estimate_flow(raft, shifted_pair[0], tmp_path / "small.png")
    import visionzoo

    with pytest.raises(InputError, match="optical flow model"):
        estimate_flow(visionzoo.create_model("resnet18"), *shifted_pair)


def test_flow_image_has_a_legend_panel():
    field = np.stack([np.full((100, 120), 3.0), np.full((100, 120), -2.0)])
    with_legend, bare = flow_image(field), flow_image(field, legend=False)
    assert bare.size == (120, 100) and with_legend.width > 120
    panel = np.asarray(with_legend)[:, 120:]
    assert (panel == 255).all(axis=2).mean() > 0.3 and (panel != 255).any()  # white, with the wheel on it


def test_cli_flow_on_frames_and_on_a_video(raft, shifted_pair, tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is in the test extra")
    from visionzoo.weights.io import save_state_dict

    from . import videos as V
    from .cli_runner import run_cli

    weights = tmp_path / "raft_small_filled.safetensors"
    save_state_dict(raft.state_dict(), weights)
    code, _, err = run_cli(capsys, "flow", *shifted_pair, "--out", tmp_path / "f.png", "--out", tmp_path / "f.npy",
                           "--model", "raft_small", "--weights", weights, "--updates", "2")
    assert code == 0, err
    assert load_flow(tmp_path / "f.npy").shape == (2, 131, 141) and (tmp_path / "f.png").is_file()
    video = V.write_video(tmp_path / "moving.mp4", frames=12, size=(128, 128), velocity=(2.0, -1.0))
    code, _, err = run_cli(capsys, "flow", video, "--out", tmp_path / "flows", "--every", "5", "--model",
                           "raft_small", "--weights", weights, "--updates", "1")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "flows").iterdir()) == [
        "000000.npy", "000000.png", "000005.npy", "000005.png", "000010.npy", "000010.png"]  # 12 frames
    assert load_flow(tmp_path / "flows" / "000005.npy").shape == (2, 128, 128)
