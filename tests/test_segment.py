"""`segment`: masks at each image's own size in the VOC palette, overlays with a legend, the share of each
class, mixed image sizes in a batch, the fast decode path, every backend, bad files; and `resize_argmax`,
the labels of resized scores without resizing them."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import visionzoo
from visionzoo import CheckpointError, InputError
from visionzoo.data.inputs import Failure
from visionzoo.ops.labels import resize_argmax
from visionzoo.runtime.backends import Backend, installed_backends
from visionzoo.tasks.segment import PALETTE, Segmentation, output_names, voc_palette

from .cli_runner import run_cli as run
from .photos import sample_image
from .shapes import write_shapes

CLASSES = ("background", "disk", "rectangle", "triangle")
RUNTIMES = [b.value for b in (Backend.ONNXRUNTIME, Backend.OPENVINO) if b in installed_backends()]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory):
    """LR-ASPP on EfficientNet-Lite0 (ImageNet weights, seeded 4-class heads) as a bundle whose recipe
    resizes the shorter side to 128 (quick)."""
    torch.manual_seed(0)
    net = visionzoo.create_model("lraspp", backbone="efficientnet_lite0", pretrained_backbone=True, num_classes=4)
    pp = dataclasses.replace(net.card.preprocess, resize_size=128)
    return visionzoo.save_bundle(net, tmp_path_factory.mktemp("seg") / "bundle", classes=CLASSES, preprocess=pp)


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    """Three real photos of different sizes (one portrait), and a copy of one under another folder."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("coffee.png", "chelsea.png", "grace_hopper.jpg"):
        Image.open(sample_image(name)).convert("RGB").save(folder / f"{name.split('.')[0]}.jpg", quality=92)
    return folder


def reference_labels(bundle, path) -> np.ndarray:
    """What a user writes: full decode, the recipe's preprocessing, the model, the scores upsampled to the
    image's size, arg-max."""
    net = visionzoo.create_model(bundle).eval()
    img = Image.open(path).convert("RGB")
    with torch.no_grad():
        scores = net(net.card.preprocess.transforms()(img)[None])["out"]
        return F.interpolate(scores, size=(img.height, img.width), mode="bilinear",
                             align_corners=False)[0].argmax(0).numpy()


# -- resize_argmax -----------------------------------------------------------------------------------

@pytest.mark.parametrize("classes, low, high", [
    (4, (16, 20), (128, 160)),  # upsampling by 8
    (21, (65, 87), (300, 401)),  # non-integer factors
    (5, (30, 40), (17, 23)),  # downsampling
    (3, (7, 9), (7, 9)),  # same size
    (2, (1, 1), (5, 5)),  # a single input pixel
    (3, (10, 10), (10, 37)),  # one axis only
])
def test_resize_argmax_equals_resizing_the_scores(classes, low, high):
    g = torch.Generator().manual_seed(sum(low) + sum(high))
    # smooth scores with large regions (as a model's) plus noise that makes boundaries ragged
    scores = F.interpolate(torch.randn(1, classes, max(2, low[0] // 4), max(2, low[1] // 4), generator=g),
                           size=low, mode="bilinear")[0] * 4 + 0.3 * torch.randn(classes, *low, generator=g)
    expected = F.interpolate(scores[None], size=high, mode="bilinear", align_corners=False)[0].argmax(0)
    got = resize_argmax(scores, high)
    assert got.shape == high and got.dtype == torch.uint8
    assert torch.equal(got.long(), expected)


def test_resize_argmax_refuses_what_is_not_scores():
    with pytest.raises(InputError, match="classes, height, width"):
        resize_argmax(torch.zeros(1, 3, 4, 4), (8, 8))
    with pytest.raises(InputError, match="at least 1 x 1"):
        resize_argmax(torch.zeros(3, 4, 4), (0, 8))


def test_voc_palette_is_pascals():
    assert PALETTE[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # background black, aeroplane dark red, bicycle green
    assert PALETTE[15 * 3:16 * 3] == [192, 128, 128]  # person
    assert PALETTE[255 * 3:] == [224, 224, 192]  # ignored borders
    assert len(voc_palette()) == 768


def test_output_names_mirror_the_inputs_only_when_names_repeat(tmp_path):
    assert output_names([tmp_path / "a" / "x.jpg", tmp_path / "b" / "y.png"]) == ["x.png", "y.png"]
    assert output_names([tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"]) == ["a/x.png", "b/x.png"]


# -- segment ---------------------------------------------------------------------------------------

def test_masks_overlays_and_rows_at_each_images_own_size(seg_bundle, photos_dir, tmp_path):
    out = tmp_path / "out"
    results = visionzoo.segment(photos_dir, model=seg_bundle, out=out, num_workers=0, batch_size=3, fast=False)
    assert [type(r) for r in results] == [Segmentation] * 3
    rows = [json.loads(line) for line in (out / "segments.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [r.path for r in results]
    for r in results:
        with Image.open(r.path) as img:
            size = img.size
        mask = Image.open(r.mask)
        assert (r.width, r.height) == size and mask.size == size
        assert mask.mode == "P" and mask.getpalette()[:12] == PALETTE[:12]
        labels = np.asarray(mask)
        # the mask is what the idiomatic script computes (three photos of three sizes in one batch)
        assert np.array_equal(labels, reference_labels(seg_bundle, r.path))
        counts = np.bincount(labels.reshape(-1), minlength=4) / labels.size
        assert r.fractions == pytest.approx({c: counts[i] for i, c in enumerate(CLASSES) if counts[i]})
        assert list(r.fractions.values()) == sorted(r.fractions.values(), reverse=True)
        overlay = Image.open(r.overlay)
        assert overlay.mode == "RGB" and overlay.width > size[0] and overlay.height >= size[1]  # + legend
    assert not list(out.glob(".*"))  # no temporary file left


def test_mixed_sizes_in_a_batch_give_what_each_image_gives_alone(seg_bundle, photos_dir):
    together = visionzoo.segment(photos_dir, model=seg_bundle, num_workers=0, batch_size=3)
    alone = [visionzoo.segment(p, model=seg_bundle, num_workers=0)[0] for p in sorted(photos_dir.iterdir())]
    for a, b in zip(together, alone, strict=True):
        assert a.path == b.path and np.array_equal(a.labels, b.labels)


def test_fast_decode_keeps_the_masks(seg_bundle, tmp_path):
    """A 5.9 MP JPEG decoded at a reduced scale (the fast path) gives nearly the full decode's mask. The heads
    here are random: they draw class boundaries all over the image, each of which a slightly different decode
    moves by a pixel, so this bound is looser than a trained model's (>= 99.5%, checked on one in
    test_segmentation_finetune.py)."""
    img = Image.open(sample_image("coffee.png")).convert("RGB").resize((2800, 2100), Image.Resampling.BICUBIC)
    img.save(tmp_path / "big.jpg", quality=90)
    fast = visionzoo.segment(tmp_path / "big.jpg", model=seg_bundle, num_workers=0)[0]
    exact = visionzoo.segment(tmp_path / "big.jpg", model=seg_bundle, num_workers=0, fast=False)[0]
    assert fast.labels.shape == exact.labels.shape == (2100, 2800)
    assert (fast.labels == exact.labels).mean() >= 0.97


@pytest.mark.parametrize("backend", RUNTIMES)
def test_the_runtimes_give_the_same_masks(seg_bundle, photos_dir, backend):
    ours = visionzoo.segment(photos_dir, model=seg_bundle, num_workers=0)
    theirs = visionzoo.segment(photos_dir, model=seg_bundle, num_workers=0, backend=backend)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.labels == b.labels).mean() >= 0.999


def test_cli_segment_reports_bad_files_and_goes_on(capsys, seg_bundle, photos_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    code, out, err = run(capsys, "segment", photos_dir / "coffee.jpg", broken, tmp_path / "missing.jpg", "--model",
                         seg_bundle, "--out", tmp_path / "out", "--workers", "0", "--format", "csv")
    assert code == 3, err
    lines = out.splitlines()
    assert lines[0] == "path,width,height,mask,overlay,background,disk,rectangle,triangle"
    assert len(lines) == 2 and lines[1].startswith(str(photos_dir / "coffee.jpg"))
    assert abs(sum(float(v) for v in lines[1].split(",")[5:]) - 1) < 1e-5
    assert "broken.jpg" in err and "missing.jpg" in err and "1 segmented, 2 failed" in err
    assert (tmp_path / "out" / "masks" / "coffee.png").is_file()
    code, out, err = run(capsys, "segment", broken, "--model", seg_bundle, "--out", tmp_path / "out2", "-j", "0")
    assert code == 4


def test_predict_and_embed_refuse_a_segmenter_in_one_line(capsys, seg_bundle, photos_dir):
    """A segmentation model given to `predict` names its task and the command that runs it."""
    code, out, err = run(capsys, "predict", photos_dir / "coffee.jpg", "--model", seg_bundle, "-j", "0")
    assert code == 1 and out == "", err  # EXIT_ERROR: a usage error, not a bad image
    assert "segmentation model" in err and "visionzoo segment" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError, match="segmentation model.*no embedding"):
        visionzoo.embed([photos_dir / "coffee.jpg"], model=seg_bundle, num_workers=0)


def test_a_bundle_of_a_head_on_a_classifier_loads_and_its_arguments_are_checked(seg_bundle, tmp_path):
    """The head's own builder (not the model class) says which arguments a composed bundle may record."""
    net = visionzoo.create_model(seg_bundle)
    assert dict(net.card.builder_kwargs) == {"backbone": "efficientnet_lite0"} and net.num_classes == 4
    for key, value, message in [("dilate", "yes", "'dilate' must be like its default True"),
                                ("stride", 8, "names 'stride', which lraspp does not take")]:
        bad = tmp_path / key
        shutil.copytree(seg_bundle, bad)
        meta = json.loads((bad / "bundle.json").read_text())
        meta["builder_kwargs"][key] = value
        (bad / "bundle.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=message):
            visionzoo.create_model(bad)


def test_segment_and_evaluate_decode_within_the_given_limits(seg_bundle, tmp_path):
    """Every limit of `limits` holds (not only the pixel limit), for `segment` and for `evaluate` on masks."""
    data = write_shapes(tmp_path / "shapes", 2, seed=0, size=(64, 48))  # 3072 pixels, 9 KiB as RGB
    images = sorted((data / "images").iterdir())
    assert all(isinstance(r, Segmentation) for r in visionzoo.segment(images, model=seg_bundle, num_workers=0))
    refused = visionzoo.segment(images, model=seg_bundle, num_workers=0, limits="bytes=4KiB")
    assert [type(r) for r in refused] == [Failure, Failure] and all("memory" in r.reason for r in refused), refused
    assert visionzoo.evaluate(seg_bundle, data, num_workers=0, plots=False).num_images == 2
    with pytest.raises(InputError, match="no image of .* could be read"):
        visionzoo.evaluate(seg_bundle, data, num_workers=0, plots=False, limits="pixels=3000")


def test_a_classifier_is_refused(tmp_path):
    with pytest.raises(InputError, match="classification model; segment needs a segmentation model"):
        visionzoo.segment(sample_image("coffee.png"), model="efficientnet_lite0", out=tmp_path)
