"""Fine-tuning segmentation models on masks: the acceptance run (ImageNet weights to >= 0.80 mIoU on held-out
images), the data checks (each a one-line error naming the file, nothing written), joint augmentation of
image and mask, the strategies, exact resume after SIGKILL, and `evaluate`'s segmentation report.

The data is generated (`tests/shapes.py`): shapes painted on real photos with exact masks. Everything runs
on one intra-op thread, as in test_finetune.py: the CI machine is shared.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import visionzoo
from visionzoo.data.images import DecodeLimits
from visionzoo.data.masks import open_mask_folder
from visionzoo.data.preprocess import Preprocess
from visionzoo.enums import Task
from visionzoo.errors import ImageError, InputError
from visionzoo.train.config import Strategy
from visionzoo.train.recipe import random_split
from visionzoo.train.segmentation import EvalMasks, JointAugment, KeyedMasks, class_weights

from .cli_runner import run_cli as run
from .killing import resumes_like_straight
from .shapes import CLASSES, RECIPE, write_shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> Path:
    """24 shapes images of 64 x 64: for the mechanics (strategies, resume, errors)."""
    return write_shapes(tmp_path_factory.mktemp("shapes_small") / "shapes", 24, seed=0, size=(64, 64))


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """(result, held-out folder, seconds) of the acceptance fine-tune: LR-ASPP on EfficientNet-Lite0 from its
    ImageNet weights, trained on 144 generated images (16 more validate); the held-out split is drawn with
    another seed."""
    root = tmp_path_factory.mktemp("shapes")
    train = write_shapes(root / "train", 160, seed=0, size=(128, 128))
    held_out = write_shapes(root / "held_out", 40, seed=1, size=(128, 128))
    started = time.perf_counter()
    result = visionzoo.finetune(train, root / "run", val_fraction=0.1, progress=False, **RECIPE)
    seconds = time.perf_counter() - started
    print(f"shapes fine-tune: {seconds:.0f}s, val mIoU {result.metrics['val_miou']:.4f}")
    return result, held_out, seconds


# -- acceptance --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetuning_from_imagenet_weights_reaches_80_percent_miou_on_held_out_images(shapes_run, tmp_path, capsys):
    """Measured here (2 shared cores, one thread): about 3 minutes for the fine-tune and 0.82 mIoU."""
    result, held_out, seconds = shapes_run
    assert result.task is Task.SEGMENTATION and result.strategy is Strategy.FULL
    code, out, err = run(capsys, "evaluate", result.bundle, held_out, "--out", tmp_path / "eval", "--format", "json")
    assert code == 0, err
    ev = json.loads(out)
    print(f"held-out mIoU {ev['miou']:.4f}, pixel accuracy {ev['pixel_accuracy']:.4f}, per class {ev['iou']}")
    assert ev["task"] == "segmentation" and ev["num_images"] == 40
    assert ev["miou"] >= 0.80
    assert all(v >= 0.6 for v in ev["iou"])  # every class learnt, not only the background
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "class_iou.png", "confusion_matrix.png", "metrics.json", "training_curves.png"]


@pytest.mark.slow
def test_the_bundle_describes_a_segmentation_model(shapes_run):
    result, _, _ = shapes_run
    meta = json.loads((result.bundle / "bundle.json").read_text())
    assert meta["architecture"] == "lraspp" and meta["builder_kwargs"] == {"backbone": "efficientnet_lite0"}
    assert meta["classes"] == list(CLASSES) and meta["base_weights"] == "efficientnet_lite0.DEFAULT"
    assert meta["preprocess"]["kind"] == "SemanticSegmentation" and meta["preprocess"]["resize_size"] == 128
    assert meta["training"]["task"] == "segmentation" and meta["training"]["hflip"] is True
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3] and "val_miou" in meta["history"][0]
    model = visionzoo.create_model(result.bundle)
    assert model.task is Task.SEGMENTATION and model.num_classes == 4 and model.card.classes == CLASSES


@pytest.mark.slow
def test_a_trained_model_keeps_its_masks_on_the_fast_decode_path(shapes_run, tmp_path):
    """A camera-size JPEG of a held-out image: decoded at a reduced scale, the mask is the full decode's on
    >= 99.5% of its pixels."""
    result, held_out, _ = shapes_run
    for k, src in enumerate(sorted((held_out / "images").iterdir())[:3]):
        Image.open(src).resize((3000, 3000), Image.Resampling.BICUBIC).save(tmp_path / f"big{k}.jpg", quality=90)
    fast = visionzoo.segment(tmp_path, model=result.bundle, num_workers=0)
    exact = visionzoo.segment(tmp_path, model=result.bundle, num_workers=0, fast=False)
    for a, b in zip(fast, exact, strict=True):
        assert a.labels.shape == (3000, 3000) and (a.labels == b.labels).mean() >= 0.995


# -- the data checks -----------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("missing", "no mask"),
    ("size", "the mask is 60x64 but its image shape_0_0003.jpg is 64x64"),
    ("index", "class index 7 is beyond the 4 classes"),
    ("rgb", "is not a class-index mask"),
])
def test_a_bad_pair_is_a_one_line_error_naming_the_file_and_nothing_is_written(small_shapes, tmp_path, capsys,
                                                                                 damage, message):
    data = _copy(small_shapes, tmp_path / "data")
    mask = data / "masks" / "shape_0_0003.png"
    if damage == "missing":
        mask.unlink()
    elif damage == "size":
        Image.open(mask).crop((0, 0, 60, 64)).save(mask)
    elif damage == "index":
        labels = np.asarray(Image.open(mask)).copy()
        labels[5, 5] = 7
        Image.fromarray(labels).save(mask)
    else:
        Image.open(mask).convert("RGB").save(mask)
    code, out, err = run(capsys, "finetune", data, "--out", tmp_path / "run", "--epochs", "1", "--workers", "0")
    assert code == 1
    assert message in err and ("shape_0_0003" in err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_class_left_without_usable_training_pixels_is_refused(small_shapes, tmp_path):
    """Images over the decode limits are left out before training; a class whose every pixel was in them
    is refused as if it had none."""
    data = _copy(small_shapes, tmp_path / "data")
    folder = open_mask_folder(data)
    present = folder.pixel_counts[:, 1:] > 0  # (images, shape classes)
    rarest = 1 + int(np.argmin(present.sum(0)))
    assert 0 < present[:, rarest - 1].sum() < len(folder)
    for sample, has in zip(folder.samples, present[:, rarest - 1], strict=True):
        if has:  # twice the size: over a budget of 64 x 64 pixels
            for path, resample in ((sample.image, Image.Resampling.BILINEAR), (sample.mask, Image.Resampling.NEAREST)):
                with Image.open(path) as img:
                    img.resize((128, 128), resample).save(path)
    with pytest.raises(InputError, match=f"no training pixels of class {CLASSES[rarest]}"):
        visionzoo.finetune(data, tmp_path / "run", epochs=1, image_size=64, num_workers=0, progress=False,
                           limits="pixels=4096")
    assert not (tmp_path / "run").exists()


def test_the_classes_come_from_classes_txt_or_the_command_line(small_shapes, tmp_path):
    data = _copy(small_shapes, tmp_path / "data")
    (data / "classes.txt").unlink()
    with pytest.raises(InputError, match="no classes.txt; list the class names"):
        open_mask_folder(data)
    folder = open_mask_folder(data, "bg,round,box,tri")
    assert folder.classes == ("bg", "round", "box", "tri") and len(folder) == 24
    assert folder.class_pixels.sum() == 24 * 64 * 64
    with pytest.raises(InputError, match="no training pixels of class spare"):
        visionzoo.finetune(data, tmp_path / "run", classes=[*CLASSES, "spare"], epochs=1, progress=False)
    with pytest.raises(InputError, match="--classes names the classes of a segmentation dataset"):
        visionzoo.finetune(data / "images", tmp_path / "run", classes=list(CLASSES), progress=False)


def test_joint_augmentation_moves_image_and_mask_together():
    """An image whose colour encodes each pixel's class: after rescaling, flipping and cropping (nearest
    neighbour, so nothing blends) every labelled pixel still shows its class's colour, and padding is
    black with an ignored label."""
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 4, (6, 8)), np.ones((10, 10), dtype=np.int64)).astype(np.uint8)  # 60 x 80
    image = Image.fromarray(np.repeat(labels[..., None] * 60 + 20, 3, axis=2).astype(np.uint8))
    pp = Preprocess(60, None, "nearest", (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), kind="SemanticSegmentation")
    augment = JointAugment(pp, crop=72, scale=(0.5, 2.0), hflip=True)
    padded = flipped = 0
    for seed in range(40):
        x, y = augment(image, Image.fromarray(labels), torch.Generator().manual_seed(seed))
        assert x.shape == (3, 72, 72) and y.shape == (72, 72) and y.dtype == torch.int64
        grey = x[0].round().long()
        known = y != 255
        assert torch.equal(grey[known], y[known] * 60 + 20)
        assert torch.all(grey[~known] == 0)  # padding: black image, ignored label
        padded += int((~known).any())
        flipped += int(seed == 0)
    assert padded > 0  # small scales pad


def test_training_decodes_within_the_runs_limits(small_shapes):
    """The training and validation datasets decode with the run's budget (the one its images were checked
    against), not the default: an image over it is refused."""
    samples = [(s.image, s.mask) for s in open_mask_folder(small_shapes).samples[:1]]  # 64 x 64: 4096 pixels
    pp = Preprocess(64, None, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), kind="SemanticSegmentation")
    augment = JointAugment(pp, crop=64, scale=(1.0, 1.0), hflip=False)
    assert KeyedMasks(samples, augment, 4, DecodeLimits(max_pixels=4096))[(0, 1)][0].shape == (3, 64, 64)
    assert EvalMasks(samples, pp, 4, DecodeLimits(max_pixels=4096))[(0, None)][0].shape == (3, 64, 64)
    with pytest.raises(ImageError, match="pixel"):
        KeyedMasks(samples, augment, 4, DecodeLimits(max_pixels=4000))[(0, 1)]
    with pytest.raises(ImageError, match="pixel"):
        EvalMasks(samples, pp, 4, DecodeLimits(max_pixels=4000))[(0, None)]


def test_median_frequency_class_weights():
    w = class_weights([600, 100, 200, 100])
    freq = np.array([0.6, 0.1, 0.2, 0.1])
    np.testing.assert_allclose(w.numpy(), np.median(freq) / freq, rtol=1e-6)
    assert float(w[0]) < 1 < float(w[1])


def test_random_split_is_a_function_of_the_seed():
    assert random_split(10, 0.3, 0) == random_split(10, 0.3, 0)
    train, val = random_split(10, 0.3, 0)
    assert len(val) == 3 and sorted(train + val) == list(range(10))
    assert random_split(10, 0.3, 1) != (train, val)
    assert random_split(2, 0.1, 0)[1] != []  # at least one held out


# -- strategies and resume ---------------------------------------------------------------------------

def test_linear_trains_the_heads_only_and_auto_says_why(small_shapes, tmp_path):
    result = visionzoo.finetune(small_shapes, tmp_path / "linear", strategy="linear", epochs=1, image_size=64,
                                batch_size=8, num_workers=0, progress=False)
    start = visionzoo.create_model("lraspp", backbone="efficientnet_lite0", pretrained_backbone=True, num_classes=4)
    tuned = load_file(result.bundle / "model.safetensors")
    for name, value in start.state_dict().items():
        if name.startswith("backbone."):  # weights and BatchNorm statistics as pre-trained
            torch.testing.assert_close(tuned[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(tuned[n], v) for n, v in start.state_dict().items() if n.startswith("classifier."))
    auto = visionzoo.finetune(small_shapes, tmp_path / "auto", epochs=1, image_size=64, batch_size=8,
                              num_workers=0, progress=False)
    assert auto.strategy is Strategy.LINEAR and "only 18 training images" in auto.reason


RESUME_RUN = {"strategy": "full", "epochs": 3, "image_size": 64, "batch_size": 6, "num_workers": 0,
              "scale_range": (0.75, 1.25), "class_weights": True}


@pytest.mark.slow  # three short runs and a subprocess: 50 s measured on the shared machine
def test_a_run_killed_in_epoch_2_resumes_to_the_same_weights(small_shapes, tmp_path):
    resumes_like_straight(small_shapes, tmp_path, RESUME_RUN, ("val_miou",))
