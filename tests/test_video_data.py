"""Video in: decoding real (generated) videos of several codecs, clip sampling, the clip transform,
broken files reported by name, and predict / embed on videos."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from visionzoo.data.preprocess import Preprocess
from visionzoo.data.video import (
    ClipSampling,
    ClipTransform,
    VideoInfo,
    frame_pairs,
    probe_video,
    read_clips,
    read_frames,
)
from visionzoo.errors import InputError, VideoError

from . import videos as V

pytest.importorskip("av", reason="PyAV is in the test extra")

VELOCITY = (2.0, 1.0)
SIZE = (160, 120)
# a small video recipe: clips of 4 frames at 15 fps, resized to 36 (shorter side), cropped to 32
SMALL = Preprocess(36, 32, kind="VideoClassification", mean=(0.45,) * 3, std=(0.225,) * 3, clip_len=4,
                   frame_rate=15, clips=3)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module", params=V.FORMATS, ids=[f[0][1:] for f in V.FORMATS])
def coded(request, video_dir):
    suffix, codec, pix_fmt = request.param
    return V.write_video(video_dir / f"moving{suffix}", frames=48, size=SIZE, velocity=VELOCITY, codec=codec,
                         pix_fmt=pix_fmt)


def _expected_centre(t: int) -> tuple[float, float]:
    x, y = V.square_position(t, *SIZE, VELOCITY)
    return x + V.SQUARE / 2 - 0.5, y + V.SQUARE / 2 - 0.5


def test_every_container_decodes_the_frames_asked_for(coded):
    info = probe_video(coded)
    assert (info.fps, info.num_frames, info.width, info.height) == (30.0, 48, *SIZE)
    wanted = [0, 1, 7, 7, 30, 47]
    got = list(read_frames(coded, wanted))
    assert [i for i, _ in got] == wanted
    for t, rgb in got:
        assert rgb.shape == (SIZE[1], SIZE[0], 3) and rgb.dtype == np.uint8
        # the square is where it was drawn in frame t: the right frame was picked, in any codec
        assert np.allclose(V.square_centre(rgb), _expected_centre(t), atol=1.5), t


def test_far_frames_are_reached_by_seeking_not_by_decoding_everything(video_dir, monkeypatch):
    path = V.write_video(video_dir / "long.mp4", frames=600, size=(96, 64), velocity=(1.0, 0.5), gop=30)
    from visionzoo.data import video as video_module

    seen = []
    real = video_module.VideoReader._index

    def counting(self, frame, previous):
        index = real(self, frame, previous)
        seen.append(index)
        return index

    monkeypatch.setattr(video_module.VideoReader, "_index", counting)
    got = dict(read_frames(path, [0, 300, 599]))
    assert sorted(got) == [0, 300, 599]
    assert len(seen) < 200  # 600 frames, about two GOPs decoded per far frame
    for t, rgb in got.items():
        x, y = V.square_position(t, 96, 64, (1.0, 0.5))
        assert np.allclose(V.square_centre(rgb), (x + 7.5, y + 7.5), atol=1.5)


def test_clip_sampling_strides_by_the_frame_rate_and_spaces_clips_evenly():
    info = VideoInfo("v.mp4", fps=30.0, num_frames=300, width=320, height=240)
    sampling = ClipSampling(16, 15)
    assert sampling.step(30.0) == 2.0 and sampling.span(30.0) == 31
    clips = sampling.clip_indices(info, 5)
    assert [c[0] for c in clips] == [0, 67, 134, 202, 269]  # starts evenly over 0 .. 300 - 31
    assert all(c == list(range(c[0], c[0] + 31, 2)) for c in clips)
    assert sampling.clip_indices(info, 1)[0][0] == 134  # one clip: the middle one
    # MViT: 7.5 fps from 30 fps, every 4th frame; S3D-length clips longer than the video repeat its end
    assert ClipSampling(16, 7.5).clip_indices(info, 1)[0][:3] == [119, 123, 127]
    short = ClipSampling(128, 15).clip_indices(VideoInfo("v", 30.0, 200, 1, 1), 1)[0]
    assert short[:3] == [0, 2, 4] and short[-1] == 199 and len(short) == 128
    # a 25 fps source sampled at 15 fps: non-integer stride, each sampled frame the one showing then
    assert ClipSampling(4, 15).clip_indices(VideoInfo("v", 25.0, 100, 1, 1), 1)[0] == [47, 48, 50, 52]
    with pytest.raises(InputError):
        sampling.clip_indices(info, 0)


def test_clip_transform_matches_torchvision_video_preset_arithmetic():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    p = Preprocess(None, 16, kind="VideoClassification", resize_hw=(20, 27), mean=(0.4, 0.5, 0.6), std=(0.2,) * 3)
    clip = ClipTransform(p)(list(frames))
    assert clip.shape == (3, 3, 16, 16)
    # torchvision's VideoClassification: resize without antialias on floats, round to uint8, crop, scale
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(20, 27), mode="bilinear", align_corners=False).round()
    x = x[:, :, 2:18, 6:22] / 255  # centre crop: top round(4 / 2) = 2, left round(11 / 2) = 6
    x = (x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / 0.2
    assert torch.allclose(clip, x.permute(1, 0, 2, 3), atol=1e-6)


def test_clips_are_preprocessed_in_order_with_their_times(coded):
    clips = list(read_clips(coded, SMALL))
    assert [c.index for c in clips] == [0, 1, 2]
    assert [c.frames for c in clips] == [(0, 2, 4, 6), (20, 22, 24, 26), (41, 43, 45, 47)]
    assert all(c.tensor.shape == (3, 4, 32, 32) for c in clips)
    assert clips[2].start_time == pytest.approx(41 / 30) and clips[2].end_time == pytest.approx(48 / 30)
    one = list(read_clips(coded, SMALL, clips=1))
    assert one[0].frames == (20, 22, 24, 26) and torch.equal(one[0].tensor, clips[1].tensor)


def test_frame_pairs_for_flow(coded):
    pairs = list(frame_pairs(coded, every=10))
    assert [i for i, _, _ in pairs] == [0, 10, 20, 30, 40]
    for t, a, b in pairs:
        (xa, ya), (xb, yb) = V.square_centre(a), V.square_centre(b)
        assert (xa, ya) == pytest.approx(_expected_centre(t), abs=1.5)
        assert (xb, yb) == pytest.approx(_expected_centre(t + 1), abs=1.5)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "zero frames", "audio only", "missing", "image"])
def test_broken_videos_raise_a_video_error_naming_the_file(kind, video_dir):
    if kind == "corrupt":
        path = V.corrupt(video_dir / "corrupt.mp4")
    elif kind == "truncated":
        path = V.truncate(V.write_video(video_dir / "whole.mkv", frames=60, codec="ffv1"), video_dir / "cut.mkv")
    elif kind == "zero frames":
        path = V.write_zero_frames(video_dir / "empty.avi")
    elif kind == "audio only":
        path = V.write_audio_only(video_dir / "tone.mp4")
    elif kind == "missing":
        path = video_dir / "nowhere.mp4"
    else:
        from PIL import Image

        path = video_dir / "photo.mp4"
        Image.new("RGB", (8, 8)).save(path, format="PNG")
    with pytest.raises(VideoError) as info:
        list(read_clips(path, SMALL))
    assert info.value.path == str(path)
    words = {"corrupt": "not a readable video", "truncated": "truncated", "zero frames": "no frames",
             "audio only": "no video stream (only audio)", "missing": "no such file", "image": "video"}
    assert words[kind] in info.value.reason


# -- predict and embed on videos ---------------------------------------------------------------

@pytest.fixture(scope="module")
def small_video_model():
    """r3d_18 with random weights and a small recipe (4 frames of 32x32): seconds, not minutes."""
    import visionzoo

    torch.manual_seed(0)
    model = visionzoo.create_model("r3d_18", num_classes=5)
    model.card = model.card.replace(preprocess=SMALL, classes=("a", "b", "c", "d", "e"))
    return model


@pytest.fixture(scope="module")
def video_folder(video_dir):
    folder = video_dir / "mixed_ok"
    V.write_video(folder / "one.mp4", frames=40, size=(64, 48), velocity=(1.0, 0.0))
    V.write_video(folder / "sub" / "two.webm", frames=30, size=(64, 48), velocity=(0.0, 1.0), codec="libvpx-vp9")
    V.corrupt(folder / "sub" / "three.avi")
    V.write_audio_only(folder / "four.mp4")
    return folder


def test_predict_videos_top_k_per_clip_and_averaged(small_video_model, video_folder):
    from visionzoo.tasks.predict import predict
    from visionzoo.tasks.video import VideoPrediction

    results = predict([video_folder], small_video_model, topk=3, clips=2, num_workers=0, batch_size=3)
    assert [r.path.rsplit("/", 1)[-1] for r in results] == ["four.mp4", "one.mp4", "three.avi", "two.webm"]
    good = [r for r in results if isinstance(r, VideoPrediction)]
    assert [r.path.rsplit("/", 1)[-1] for r in good] == ["one.mp4", "two.webm"]
    bad = {r.path.rsplit("/", 1)[-1]: r.reason for r in results if not isinstance(r, VideoPrediction)}
    assert "no video stream" in bad["four.mp4"] and "not a readable video" in bad["three.avi"]
    for r in good:
        assert len(r.clips) == 2 and len(r.top) == 3
        clip_probs = np.array([[next((t.probability for t in c.top if t.index == k), np.nan) for k in range(5)]
                               for c in r.clips])
        # the average is the mean of the clips' probabilities (checked on classes both clips rank)
        for t in r.top:
            if not np.isnan(clip_probs[:, t.index]).any():
                assert t.probability == pytest.approx(clip_probs[:, t.index].mean(), rel=1e-5)
        d = r.to_dict()
        assert d["clips"][0]["clip"] == 1 and d["clips"][1]["start"] > 0 and len(d["predictions"]) == 3


def test_embed_videos_is_the_mean_of_the_clip_embeddings(small_video_model, video_folder, tmp_path):
    from visionzoo.runtime.backends import TorchRunner
    from visionzoo.tasks.embed import embed, read_embeddings

    out = tmp_path / "videos.npy"
    result = embed([video_folder], small_video_model, out=out, clips=2, num_workers=0)
    assert [p.rsplit("/", 1)[-1] for p in result.paths] == ["one.mp4", "two.webm"]
    assert len(result.failures) == 2 and result.vectors.shape == (2, 512)
    clips = torch.stack([c.tensor for c in read_clips(video_folder / "one.mp4", SMALL, clips=2)])
    runner = TorchRunner(small_video_model)
    expected = runner.embeddings(clips).mean(dim=0)
    assert np.allclose(read_embeddings(out)[1][0], expected.numpy(), atol=1e-5)
    stage = embed([video_folder / "one.mp4"], small_video_model, clips=1, layer="layer3", num_workers=0)
    assert stage.vectors.shape == (1, 256)


def test_decode_limits_apply_to_each_frame_of_a_video(small_video_model, video_folder):
    from visionzoo.data.images import DecodeLimits
    from visionzoo.tasks.predict import predict

    one = video_folder / "one.mp4"  # 64 x 48 frames: 3,072 pixels
    with pytest.raises(VideoError, match="over the limit of 3,000"):
        list(read_clips(one, SMALL, limits=DecodeLimits(max_pixels=3000)))
    with pytest.raises(VideoError, match="bytes"):
        list(read_clips(one, SMALL, limits=DecodeLimits(max_bytes=10_000)))
    assert len(list(read_clips(one, SMALL, clips=1, limits=DecodeLimits(max_pixels=3072)))) == 1
    results = predict([one], small_video_model, clips=1, num_workers=0, limits=DecodeLimits(max_pixels=3000))
    assert len(results) == 1 and "3,072 pixels" in results[0].reason and results[0].path == str(one)


def test_a_folder_mixing_videos_and_images_is_refused_for_a_video_model(small_video_model, tmp_path):
    from PIL import Image

    from visionzoo.tasks.predict import predict

    V.write_video(tmp_path / "clip.mp4", frames=10, size=(64, 48))
    Image.new("RGB", (16, 16)).save(tmp_path / "photo.png")
    with pytest.raises(InputError, match="mixes image files .* and video files .*separate folders"):
        predict([tmp_path], small_video_model, num_workers=0)


def test_cli_predicts_videos_as_csv_and_jsonl(small_video_model, video_folder, tmp_path, capsys):
    from visionzoo.bundle import save_bundle

    from .cli_runner import run_cli

    bundle = save_bundle(small_video_model, tmp_path / "bundle", classes=list("abcde"), preprocess=SMALL)
    code, out, err = run_cli(capsys, "predict", video_folder / "one.mp4", "--model", bundle, "--clips", "2", "--topk",
                             "2", "--format", "csv", "--workers", "0")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "path,clip,start,end,rank,index,label,probability"
    assert [line.split(",")[1] for line in lines[1:]] == ["all", "all", "1", "1", "2", "2"]
    code, out, err = run_cli(capsys, "predict", video_folder, "--model", bundle, "--clips", "1", "--format", "jsonl",
                             "--workers", "0")
    assert code == 3, err  # two bad files reported, two videos predicted
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert len(records) == 2 and all(len(r["clips"]) == 1 for r in records)
    assert "four.mp4" in err and "three.avi" in err
    code, out, err = run_cli(capsys, "embed", video_folder, "--model", bundle, "--clips", "1", "--out",
                             tmp_path / "v.npy", "--workers", "0")
    assert code == 3 and np.load(tmp_path / "v.npy").shape == (2, 512), err


def test_clip_times_cover_the_video(coded):
    clips = list(read_clips(coded, SMALL, clips=3))
    assert clips[0].start_time == 0 and math.isclose(clips[-1].end_time, 48 / 30)
