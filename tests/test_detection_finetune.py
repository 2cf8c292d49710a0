"""Fine-tuning detectors on boxes: the acceptance run (ImageNet weights to >= 0.80 AP50 on held-out images),
the annotation checks (each a one-line error naming the file and the entry, nothing written), box-aware
augmentation, COCO mAP scoring (pycocotools) and `evaluate`'s detection report, exact resume after SIGKILL.

The data is generated (`tests/shapes.py`): shapes painted on real photos with exact boxes, written as COCO
instances and as a box CSV. Everything runs on one intra-op thread: the CI machine is shared.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import visionzoo
from visionzoo.data.detection import BACKGROUND, BoxAugment, crop_boxes, open_box_dataset
from visionzoo.enums import Task
from visionzoo.errors import InputError
from visionzoo.tasks.evaluate import evaluate
from visionzoo.train.config import Strategy
from visionzoo.train.detection import coco_map

from .cli_runner import run_cli as run
from .killing import resumes_like_straight
from .shapes import DETECTION_CLASSES, DETECTION_RECIPE, write_boxes

SRC = Path(visionzoo.__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest
TINY_RUN = {"model": "efficientnet_lite0", "head": "fcos", "fpn_channels": 64, "image_size": 64, "batch_size": 6,
            "num_workers": 0, "strategy": "partial"}


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def small_boxes(tmp_path_factory) -> Path:
    """16 box images of 64 x 64 (with instance masks, which the box detectors ignore): for the mechanics
    (parsing, errors, resume)."""
    return write_boxes(tmp_path_factory.mktemp("boxes_small") / "boxes", 16, seed=3, size=(64, 64), negatives=0.1,
                       masks=True)


@pytest.fixture(scope="module")
def boxes_run(tmp_path_factory):
    """(result, held-out folder, seconds) of the acceptance fine-tune: FCOS on EfficientNet-Lite0 from its
    ImageNet weights, trained on 160 generated images of 96 x 96 (40 more validate); the held-out split is
    drawn with another seed."""
    root = tmp_path_factory.mktemp("boxes_run")
    train = write_boxes(root / "train", 200, seed=0, size=(96, 96))
    held_out = write_boxes(root / "held_out", 60, seed=1, size=(96, 96))
    started = time.perf_counter()
    result = visionzoo.finetune(train / "instances.json", root / "run", **DETECTION_RECIPE, val_fraction=0.2,
                                progress=False)
    return result, held_out, time.perf_counter() - started


# -- the acceptance run ------------------------------------------------------------------------

@pytest.mark.slow
def test_finetuning_from_imagenet_weights_reaches_80_percent_ap50_on_held_out_images(boxes_run, tmp_path, capsys):
    result, held_out, seconds = boxes_run
    assert result.task is Task.DETECTION and result.strategy is Strategy.PARTIAL
    assert result.classes == (BACKGROUND, *DETECTION_CLASSES)
    ev = evaluate(result.bundle, held_out / "instances.json", out=tmp_path / "eval", num_workers=0)
    with capsys.disabled():
        print(f"\ndetection fine-tune: {seconds:.0f} s; held-out AP50 {ev.ap50:.3f}, AP {ev.ap:.3f}, "
              f"AP75 {ev.ap75:.3f}, per class AP50 {dict(zip(ev.classes, ev.class_ap50, strict=True))}")
    assert ev.num_images == 60 and ev.ap50 >= 0.80
    assert {"metrics", "detections", "pr_curve", "training_curves"} <= ev.files.keys()
    assert Image.open(ev.files["pr_curve"]).size[0] > 300
    # the CSV of the same images scores the same
    again = evaluate(result.bundle, held_out / "boxes.csv", num_workers=0)
    assert again.ap50 == pytest.approx(ev.ap50, abs=1e-3) and again.num_boxes == ev.num_boxes


@pytest.mark.slow
def test_the_bundle_detects_with_visionzoo_detect(boxes_run, tmp_path, capsys):
    result, held_out, _ = boxes_run
    meta = json.loads((result.bundle / "bundle.json").read_text())
    assert meta["architecture"] == "fcos" and meta["builder_kwargs"]["backbone"] == "efficientnet_lite0"
    assert meta["builder_kwargs"]["min_size"] == DETECTION_RECIPE["image_size"]
    code, out, err = run(capsys, "detect", held_out / "images" / "box_1_0000.jpg", "--model", result.bundle,
                         "--out", tmp_path / "drawn")
    assert code == 0, err
    truth = [a for a in json.loads((held_out / "instances.json").read_text())["annotations"] if a["image_id"] == 1]
    found = json.loads(out.splitlines()[0])["detections"]
    assert (tmp_path / "drawn" / "box_1_0000.png").is_file()
    assert {d["label"] for d in found} == {DETECTION_CLASSES[a["category_id"] - 1] for a in truth}


# -- data ------------------------------------------------------------------------------------

def test_coco_and_csv_give_the_same_boxes(small_boxes):
    coco, table = open_box_dataset(small_boxes), open_box_dataset(small_boxes / "boxes.csv")
    assert coco.classes == table.classes == DETECTION_CLASSES
    assert [s.image for s in coco.samples] == [s.image for s in table.samples]
    assert any(not s.boxes for s in coco.samples)  # a negative image is kept
    for a, b in zip(coco.samples, table.samples, strict=True):
        assert a.labels == b.labels
        np.testing.assert_allclose(np.reshape(a.boxes, (-1, 4)), np.reshape(b.boxes, (-1, 4)), atol=0.006)


def _coco(folder: Path) -> dict:
    return json.loads((folder / "instances.json").read_text())


def _damaged(small_boxes: Path, tmp_path: Path, damage: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(small_boxes, data)
    coco = _coco(data)
    if damage == "json":
        (data / "instances.json").write_text((data / "instances.json").read_text()[:-20])
        return data
    if damage == "outside":
        coco["annotations"][2]["bbox"][0] = 60.0
    elif damage == "degenerate":
        coco["annotations"][2]["bbox"][2] = 0
    elif damage == "category":
        coco["annotations"][2]["category_id"] = 7
    elif damage == "missing":
        (data / "images" / coco["images"][4]["file_name"]).unlink()
    elif damage == "duplicate":
        coco["images"][4]["id"] = coco["images"][3]["id"]
    elif damage == "image_id":
        coco["annotations"][2]["image_id"] = 999
    (data / "instances.json").write_text(json.dumps(coco))
    return data


@pytest.mark.parametrize("damage, message", [
    ("json", "instances.json: not valid JSON"),
    ("outside", "instances.json: annotations[2] (id 3): bbox [60.0,"),
    ("degenerate", "instances.json: annotations[2] (id 3): bbox"),
    ("category", "instances.json: annotations[2] (id 3): unknown category_id 7"),
    ("missing", "instances.json: images[4] (id 5): the image box_3_0004.jpg is missing"),
    ("duplicate", "instances.json: images[4]: duplicate id 4"),
    ("image_id", "instances.json: annotations[2] (id 3): image_id 999 is not one of the images' ids"),
])
def test_a_bad_annotation_is_a_one_line_error_naming_the_file_and_entry_and_nothing_is_written(
        small_boxes, tmp_path, capsys, damage, message):
    data = _damaged(small_boxes, tmp_path, damage)
    code, out, err = run(capsys, "finetune", data / "instances.json", "--out", tmp_path / "run", "--epochs", "1",
                         "--workers", "0")
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert {"outside": "is outside the 64x64 image", "degenerate": "has no area"}.get(damage, "") in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("row, message", [
    ("images/box_3_0001.jpg,10,10,80,30,disk", "boxes.csv: line 2: the box is outside the 64x64 image"),
    ("images/box_3_0001.jpg,10,10,10,30,disk", "boxes.csv: line 2: the box has no area"),
    ("images/nowhere.jpg,10,10,20,30,disk", "boxes.csv: line 2: the image"),
    ("images/box_3_0001.jpg,10,ten,20,30,disk", "boxes.csv: line 2: the coordinates 10,ten,20,30 are not numbers"),
    ("images/box_3_0001.jpg,10,10,20,30,", "boxes.csv: line 2: give all of x1,y1,x2,y2,label"),
])
def test_a_bad_csv_row_is_a_one_line_error_naming_the_line(small_boxes, tmp_path, row, message):
    data = tmp_path / "data"
    shutil.copytree(small_boxes, data)
    lines = (data / "boxes.csv").read_text().splitlines()
    (data / "boxes.csv").write_text("\n".join([lines[0], row, *lines[1:]]) + "\n")
    with pytest.raises(InputError) as info:
        open_box_dataset(data / "boxes.csv")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_evaluating_on_classes_the_model_lacks_is_refused(small_boxes):
    found = open_box_dataset(small_boxes)
    with pytest.raises(InputError, match="class 'triangle' is not one of the model's classes"):
        open_box_dataset(small_boxes, ["disk", "rectangle"])
    relabelled = open_box_dataset(small_boxes, ["rectangle", "triangle", "disk"])
    index = {1: 3, 2: 1, 3: 2}
    assert [tuple(index[v] for v in s.labels) for s in found.samples] == [s.labels for s in relabelled.samples]


# -- augmentation ----------------------------------------------------------------------------

def test_augmentation_moves_the_boxes_with_the_image():
    """Two solid rectangles on grey: after rescaling, flipping and cropping, each box kept still frames its
    colour (the pixels just inside its edges), and the colour shows nowhere a box was dropped."""
    img = Image.new("RGB", (120, 80), (128, 128, 128))
    img.paste((255, 0, 0), (10, 10, 40, 50))
    img.paste((0, 0, 255), (70, 30, 110, 70))
    boxes = torch.tensor([[10.0, 10.0, 40.0, 50.0], [70.0, 30.0, 110.0, 70.0]])
    labels = torch.tensor([1, 2])
    augment = BoxAugment(base=80, crop=64, scale=(0.6, 1.4))
    flipped = kept_some = dropped_some = 0
    for seed in range(40):
        x, b, lab = augment(img, boxes, labels, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 64, 64) and b.shape == (len(lab), 4)
        assert (b[:, 2:] > b[:, :2]).all() and (b >= 0).all() and (b <= 64).all()
        pixels = (x.permute(1, 2, 0) * 255).round()
        for box, label in zip(b.tolist(), lab.tolist(), strict=True):
            colour = torch.tensor([255.0, 0, 0] if label == 1 else [0, 0, 255.0])
            x1, y1, x2, y2 = (round(v) for v in box)
            inner = pixels[y1 + 1:y2 - 1, x1 + 1:x2 - 1].reshape(-1, 3)
            assert inner.numel() and ((inner - colour).abs().max(1).values < 40).float().mean() > 0.95, (seed, box)
        for label in {1, 2} - set(lab.tolist()):
            colour = torch.tensor([255.0, 0, 0] if label == 1 else [0, 0, 255.0])
            visible = ((pixels - colour).abs().max(2).values < 40).sum()
            area = (30 * 40 if label == 1 else 40 * 40) * 1.4 ** 2  # at the largest scale
            assert visible < 0.4 * area, seed  # less than `min_visible` of it was left
            dropped_some += 1
        kept_some += len(lab)
        flipped += bool(len(lab) == 2 and b[0, 0] > b[1, 0])
    assert kept_some and dropped_some and flipped  # every case was drawn


def test_crop_boxes_clips_and_drops_the_boxes_mostly_outside():
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 50.0, 50.0], [55.0, 5.0, 75.0, 25.0]])
    kept, labels = crop_boxes(boxes, torch.tensor([1, 2, 3]), (10, 0, 70, 60), (60, 60), 2.0, 0.4)
    assert labels.tolist() == [1, 2, 3]
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.0, 10.0, 20.0], [20.0, 30.0, 40.0, 50.0],
                                                   [45.0, 5.0, 60.0, 25.0]]))
    kept, labels = crop_boxes(boxes, torch.tensor([1, 2, 3]), (15, 0, 75, 60), (60, 60), 2.0, 0.4)
    assert labels.tolist() == [2, 3]  # a quarter of box 1 is left: dropped


# -- COCO mAP --------------------------------------------------------------------------------

def _result(image_id: int, gt: list, gt_labels: list, boxes: list, scores: list, labels: list) -> dict:
    return {"image_id": image_id, "width": 100, "height": 100,
            "gt_boxes": np.array(gt, dtype=np.float64).reshape(-1, 4), "gt_labels": np.array(gt_labels),
            "boxes": np.array(boxes, dtype=np.float64).reshape(-1, 4), "scores": np.array(scores),
            "labels": np.array(labels)}


def test_perfect_detections_score_ap_1_and_wrong_ones_less():
    gt = [[10, 10, 50, 60], [60, 20, 90, 40]]
    perfect = [_result(1, gt, [1, 2], gt, [0.9, 0.8], [1, 2]), _result(2, [[5, 5, 30, 30]], [1], [[5, 5, 30, 30]],
                                                                         [0.7], [1])]
    scores = coco_map(perfect, 2)
    assert scores.ap == pytest.approx(1.0) and scores.ap50 == 1.0 and scores.ap75 == 1.0
    assert scores.class_ap50 == pytest.approx((1.0, 1.0)) and scores.ap_small == pytest.approx(1.0)
    assert scores.ap_large is None  # (no box over 96 x 96 pixels)
    swapped = [_result(1, gt, [1, 2], gt, [0.9, 0.8], [2, 1])]
    assert coco_map(swapped, 2).ap50 == 0.0
    shifted = [_result(1, gt, [1, 2], [[10, 10, 50, 60], [75, 20, 105, 40]], [0.9, 0.8], [1, 2])]
    half = coco_map(shifted, 2)  # the second box overlaps its truth by IoU 0.33: class 2 is missed
    assert half.class_ap50 == pytest.approx((1.0, 0.0)) and half.ap50 == pytest.approx(0.5)
    assert coco_map([_result(1, gt, [1, 2], [], [], [])], 2).ap50 == 0.0


# -- the run's mechanics -----------------------------------------------------------------------

def test_a_tiny_run_writes_a_detection_bundle_that_evaluate_and_detect_load(small_boxes, tmp_path, capsys):
    result = visionzoo.finetune(small_boxes / "boxes.csv", tmp_path / "run", epochs=1, **TINY_RUN, progress=False)
    assert result.task is Task.DETECTION and result.classes == (BACKGROUND, *DETECTION_CLASSES)
    assert {"val_ap", "val_ap50", "val_ap75", "val_loss"} <= result.metrics.keys()
    code, out, err = run(capsys, "evaluate", result.bundle, small_boxes / "instances.json", "--out",
                         tmp_path / "eval", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["task"] == "detection" and report["num_images"] == 16 and 0 <= report["ap50"] <= 1
    assert Path(report["files"]["pr_curve"]).is_file() and Path(report["files"]["detections"]).is_file()
    found = visionzoo.detect(small_boxes / "images" / "box_3_0000.jpg", result.bundle, threshold=0.0)
    assert found[0].width == 64 and all(b.label in DETECTION_CLASSES for b in found[0].boxes)


def test_an_ssdlite_head_trains_at_its_fixed_size(small_boxes, tmp_path):
    """SSDlite numbers its classes from the background (label 0) and takes one fixed input size."""
    run = {**TINY_RUN, "head": "ssdlite", "fpn_channels": None, "epochs": 1}
    result = visionzoo.finetune(small_boxes / "boxes.csv", tmp_path / "ssdlite", **run, progress=False)
    meta = json.loads((result.bundle / "bundle.json").read_text())
    assert meta["architecture"] == "ssdlite" and meta["builder_kwargs"]["size"] == 64
    net = visionzoo.create_model(result.bundle)
    assert net.transform.fixed_size == (64, 64) and net.num_classes == 4
    found = visionzoo.detect(small_boxes / "images" / "box_3_0002.jpg", result.bundle, threshold=0.0)[0]
    assert found.boxes and all(b.label in DETECTION_CLASSES for b in found.boxes)


def test_linear_trains_the_heads_only_and_a_bundle_restarts_with_other_classes(small_boxes, tmp_path):
    run = {**TINY_RUN, "strategy": "linear", "epochs": 1}
    result = visionzoo.finetune(small_boxes / "instances.json", tmp_path / "linear", **run, progress=False)
    start = visionzoo.create_model("fcos", backbone="efficientnet_lite0", pretrained_backbone=True, num_classes=4,
                                   fpn_channels=64)
    tuned = load_file(result.bundle / "model.safetensors")
    for name, value in start.state_dict().items():
        if name.startswith("backbone.body."):  # the classifier's weights and BatchNorm statistics as pre-trained
            torch.testing.assert_close(tuned[name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(tuned["head.classification_head.cls_logits.weight"],
                           start.state_dict()["head.classification_head.cls_logits.weight"])
    assert not torch.equal(tuned["backbone.fpn.layer_blocks.0.0.weight"],
                           start.state_dict()["backbone.fpn.layer_blocks.0.0.weight"])
    # the bundle as the starting model, on data with two of its three classes: new class heads, the rest kept
    lines = (small_boxes / "boxes.csv").read_text().splitlines()
    two = tmp_path / "two.csv"
    two.write_text("\n".join(line.replace("images/", f"{small_boxes}/images/") for line in lines
                              if not line.endswith("triangle")) + "\n")
    again = visionzoo.finetune(two, tmp_path / "again", **{**run, "model": str(result.bundle), "head": None,
                                                           "fpn_channels": None}, progress=False)
    assert again.classes == (BACKGROUND, "disk", "rectangle")
    weights = load_file(again.bundle / "model.safetensors")
    assert weights["head.classification_head.cls_logits.weight"].shape[0] == 3
    torch.testing.assert_close(weights["backbone.body.features.0.0.weight"], tuned["backbone.body.features.0.0.weight"])
    with pytest.raises(InputError, match="--fpn-channels sizes a RetinaNet, FCOS or R-CNN head put on a classifier"):
        visionzoo.finetune(two, tmp_path / "bad", **{**run, "model": str(result.bundle), "head": None}, progress=False)
    with pytest.raises(InputError, match="--head lraspp is not a detection head"):
        visionzoo.finetune(two, tmp_path / "bad", **{**run, "head": "lraspp"}, progress=False)


RESUME_RUN = {**TINY_RUN, "epochs": 2, "batch_size": 4}  # (3 steps an epoch: killed in the middle of epoch 2)


@pytest.mark.slow  # three short runs and a subprocess
@pytest.mark.parametrize("head", ["fcos", "maskrcnn"])  # (Mask R-CNN: its proposal sampling draws random numbers)
def test_a_run_killed_in_epoch_2_resumes_to_the_same_weights(small_boxes, tmp_path, head):
    resumes_like_straight(small_boxes / "instances.json", tmp_path, {**RESUME_RUN, "head": head},
                          ("val_ap50", "val_mask_ap50"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(("val_mask_ap50" in epoch) == (head == "maskrcnn") for epoch in history)
