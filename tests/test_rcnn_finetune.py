"""Fine-tuning Faster and Mask R-CNN: the acceptance run (a Mask R-CNN head on EfficientNet-Lite0's ImageNet weights
to >= 0.70 box AP50 and >= 0.60 mask AP50 on held-out images), instance masks read from COCO annotations (polygons,
RLE, uncompressed RLE) with one-line errors, masks moved by the augmentation, mask AP (pycocotools' "segm"), and
the mechanics (a tiny run's bundle in `evaluate` and `detect`, a published R-CNN's new class layers); resuming a
killed Mask R-CNN run is tested with the other detectors' in test_detection_finetune.py, Keypoint R-CNN in
test_keypoints.py.

The data is `tests/shapes.py`'s detection set with each shape's exact mask. One intra-op thread: the CI machine is
shared.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import visionzoo
from visionzoo.data.detection import BACKGROUND, BoxAugment, open_box_dataset
from visionzoo.data.images import DecodeLimits
from visionzoo.data.instance_masks import decode_masks
from visionzoo.enums import Task
from visionzoo.errors import InputError
from visionzoo.tasks.evaluate import evaluate
from visionzoo.train.detection import coco_map

from .cli_runner import run_cli as run
from .shapes import DETECTION_CLASSES, MASK_RECIPE, acceptance_run, write_boxes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pycocotools_mask = pytest.importorskip("pycocotools.mask")

# what learns the shapes' boxes and masks in a few minutes on two CPU cores: a Mask R-CNN head (a 64-channel
# pyramid and mask head) on EfficientNet-Lite0 (ImageNet weights), 128 x 128 images, the heads and the last two
# stages trained
TINY_RUN = {**MASK_RECIPE, "image_size": 64, "batch_size": 4, "epochs": 1}


@pytest.fixture(scope="module")
def small_masks(tmp_path_factory) -> Path:
    """12 images of 64 x 64 with boxes and exact masks: for the mechanics."""
    return write_boxes(tmp_path_factory.mktemp("masks_small") / "masks", 12, seed=3, size=(64, 64), negatives=0.1,
                       masks=True)


# -- reading masks ------------------------------------------------------------------------------

def _column_major_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of `mask`, written independently of pycocotools: run lengths of 0s and 1s
    down the columns, starting with 0s."""
    flat = mask.T.reshape(-1)
    runs, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    return runs


def _one_image_dataset(folder: Path, segmentations: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (90, 90, 90)).save(folder / "a.png")
    annotations = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "iscrowd": 0,
                    **({} if seg is None else {"segmentation": seg})} for k, seg in enumerate(segmentations)]
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}]}))
    return folder / "instances.json"


def test_masks_are_read_from_polygons_rle_and_uncompressed_rle(tmp_path):
    blob = np.zeros((30, 40), dtype=np.uint8)
    blob[5:12, 3:9] = 1
    blob[20:28, 30:39] = 1  # two pieces
    compressed = pycocotools_mask.encode(np.asfortranarray(blob))["counts"].decode("ascii")
    square = [10.0, 5.0, 20.0, 5.0, 20.0, 15.0, 10.0, 15.0]
    data = _one_image_dataset(tmp_path, [[square], {"size": [30, 40], "counts": _column_major_runs(blob)},
                                         {"size": [30, 40], "counts": compressed}])
    found = open_box_dataset(data)
    assert found.has_masks and len(found.samples[0].masks) == 3
    masks = decode_masks(found.samples[0].masks).numpy()
    assert masks.shape == (3, 30, 40) and masks.dtype == np.uint8
    inside = np.argwhere(masks[0])
    assert inside.min(0).tolist() == [5, 10] and inside.max(0).tolist() in ([14, 19], [15, 20])  # the square
    np.testing.assert_array_equal(masks[1], blob)
    np.testing.assert_array_equal(masks[2], blob)
    # boxes-only data has no masks
    assert not open_box_dataset(_one_image_dataset(tmp_path / "plain", [None])).has_masks


@pytest.mark.parametrize("segmentation, message", [
    ([[1, 2, 3, 4]], "segmentation polygon 0 must be a list of at least 3 points"),
    ([[1, 2, 3, "x", 5, 6]], "segmentation polygon 0 has a coordinate that is not a finite number"),
    ([[1, 2, 80, 2, 3, 9]], "segmentation polygon 0 reaches outside the 40x30 image"),
    ([], "has no segmentation, unlike the annotations before it"),
    ({"size": [40, 30], "counts": [1200]}, "the segmentation's size [40, 30] is not the image's [height, width] "
                                           "[30, 40]"),
    ({"size": [30, 40], "counts": [100, 50]}, "the segmentation's runs cover 150 pixels, not the image's 30x40"),
    ({"size": [30, 40], "counts": "ab\x01"}, "the segmentation's compressed counts hold the character"),
    ({"size": [30, 40], "counts": [1200]}, "the segmentation covers no pixel of the 40x30 image"),
    ("polygon", "segmentation must be a list of polygons or a run-length encoding"),
])
def test_a_bad_segmentation_is_a_one_line_error_naming_the_file_and_annotation(tmp_path, segmentation, message):
    good = [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0]]
    data = _one_image_dataset(tmp_path, [good, segmentation])
    with pytest.raises(InputError) as info:
        open_box_dataset(data)
    text = str(info.value)
    assert "instances.json: annotations[1] (id 2)" in text and message in text and "\n" not in text, text


def test_decoding_masks_beyond_the_byte_budget_is_refused(small_masks):
    sample = next(s for s in open_box_dataset(small_masks).samples if s.masks)
    assert decode_masks(sample.masks, sample.image).shape == (len(sample.masks), 64, 64)
    with pytest.raises(InputError, match=r"masks of 64x64 would take .* over the decode limit"):
        decode_masks(sample.masks, sample.image, DecodeLimits(max_bytes=64 * 64 * len(sample.masks) - 1))


def test_a_mask_head_on_data_without_masks_is_refused(tmp_path):
    plain = write_boxes(tmp_path / "plain", 6, seed=5, size=(64, 64))
    with pytest.raises(InputError, match="has no instance masks .*--head fasterrcnn"):
        visionzoo.finetune(plain / "instances.json", tmp_path / "run", **TINY_RUN, progress=False)


# -- augmentation ---------------------------------------------------------------------------------

def test_augmentation_moves_the_masks_with_the_image():
    """A red disk and a blue triangle on grey, with their masks: after rescaling, flipping and cropping, each
    kept mask covers its colour's pixels (and only those, up to the resampled edge) and lies in its box."""
    img = Image.new("RGB", (120, 80), (128, 128, 128))
    shapes = [("ellipse", [(10, 10), (50, 50)], (255, 0, 0)), ("polygon", [(70, 70), (115, 70), (90, 25)], (0, 0, 255))]
    masks = torch.zeros((2, 80, 120), dtype=torch.uint8)
    for k, (kind, points, colour) in enumerate(shapes):
        getattr(ImageDraw.Draw(img), kind)(points, fill=colour)
        mask = Image.new("L", (120, 80), 0)
        getattr(ImageDraw.Draw(mask), kind)(points, fill=1)
        masks[k] = torch.from_numpy(np.array(mask))
    boxes = torch.tensor([[10.0, 10.0, 51.0, 51.0], [70.0, 25.0, 116.0, 71.0]])
    augment = BoxAugment(base=80, crop=64, scale=(0.6, 1.4))
    flipped = dropped = 0
    for seed in range(30):
        x, b, labels, m = augment.apply(img, boxes, torch.tensor([1, 2]), masks, torch.Generator().manual_seed(seed))
        assert m is not None and m.shape == (len(labels), 64, 64) and m.dtype == torch.uint8
        pixels = (x.permute(1, 2, 0) * 255).round()
        for box, label, mask in zip(b.tolist(), labels.tolist(), m, strict=True):
            colour = torch.tensor([255.0, 0, 0] if label == 1 else [0, 0, 255.0])
            coloured = (pixels - colour).abs().max(2).values < 60
            agree = (coloured == mask.bool()).float().mean()
            assert mask.sum() > 0 and agree > 0.97, (seed, label, float(agree))
            ys, xs = torch.where(mask.bool())
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
        dropped += 2 - len(labels)
        flipped += bool(len(labels) == 2 and b[0, 0] > b[1, 0])
    assert dropped and flipped
    # the call without masks draws the same view
    x0, b0, _ = augment(img, boxes, torch.tensor([1, 2]), torch.Generator().manual_seed(3))
    x1, b1, _, _ = augment.apply(img, boxes, torch.tensor([1, 2]), masks, torch.Generator().manual_seed(3))
    assert torch.equal(x0, x1) and torch.equal(b0, b1)


# -- mask AP --------------------------------------------------------------------------------------

def _rle(mask: np.ndarray) -> dict:
    rle = pycocotools_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def test_perfect_masks_score_mask_ap_1_and_wrong_ones_less():
    a, b = np.zeros((60, 80), bool), np.zeros((60, 80), bool)
    a[10:40, 5:30] = True
    b[20:50, 40:75] = True
    half = b.copy()
    half[:, 55:] = False  # the right box, but more than half of the mask missing (IoU 0.43)
    gt = [[5, 10, 30, 40], [40, 20, 75, 50]]

    def result(masks: list[np.ndarray]) -> dict:
        return {"image_id": 1, "width": 80, "height": 60, "gt_boxes": np.array(gt, dtype=np.float64),
                "gt_labels": np.array([1, 2]), "gt_masks": [_rle(a), _rle(b)],
                "boxes": np.array(gt, dtype=np.float64), "scores": np.array([0.9, 0.8]), "labels": np.array([1, 2]),
                "masks": [_rle(m) for m in masks]}

    perfect = coco_map([result([a, b])], 2, "segm")
    assert perfect.ap == pytest.approx(1.0) and perfect.ap50 == pytest.approx(1.0)
    holed = coco_map([result([a, half])], 2, "segm")
    assert holed.class_ap50 == pytest.approx((1.0, 0.0)) and holed.ap50 == pytest.approx(0.5)
    assert coco_map([result([a, half])], 2).ap50 == pytest.approx(1.0)  # (the boxes are right)
    with pytest.raises(InputError, match="iou_type must be"):
        coco_map([result([a, b])], 2, "boxes")


# -- the run's mechanics --------------------------------------------------------------------------

def test_a_tiny_mask_rcnn_run_writes_a_bundle_that_evaluate_and_detect_load(small_masks, tmp_path, capsys):
    result = visionzoo.finetune(small_masks / "instances.json", tmp_path / "run", **TINY_RUN, progress=False)
    assert result.task is Task.DETECTION and result.classes == (BACKGROUND, *DETECTION_CLASSES)
    assert {"val_ap50", "val_mask_ap", "val_mask_ap50", "val_loss"} <= result.metrics.keys()
    assert result.metrics["val_loss"] > 0
    meta = json.loads((result.bundle / "bundle.json").read_text())
    assert meta["architecture"] == "maskrcnn" and meta["builder_kwargs"]["backbone"] == "efficientnet_lite0"
    code, out, err = run(capsys, "evaluate", result.bundle, small_masks / "instances.json", "--out",
                         tmp_path / "eval", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["num_images"] == 12 and 0 <= report["mask_ap50"] <= 1 and 0 <= report["ap50"] <= 1
    detections = json.loads(Path(report["files"]["detections"]).read_text())
    assert detections and all(d["segmentation"]["size"] == [64, 64] for d in detections)
    found = visionzoo.detect(small_masks / "images" / "box_3_0000.jpg", result.bundle, threshold=0.0)[0]
    assert found.boxes and all(b.mask is not None and b.label in DETECTION_CLASSES for b in found.boxes)
    # box data (no masks) evaluates the boxes only
    plain = evaluate(result.bundle, small_masks / "boxes.csv", num_workers=0)
    assert plain.mask_ap is None and plain.ap50 == pytest.approx(report["ap50"], abs=1e-3)


def test_a_faster_rcnn_head_trains_on_boxes_with_frozen_stages(tmp_path):
    data = write_boxes(tmp_path / "plain", 8, seed=6, size=(64, 64))
    result = visionzoo.finetune(data / "boxes.csv", tmp_path / "run", **{**TINY_RUN, "head": "fasterrcnn",
                                                                         "strategy": "linear"}, progress=False)
    assert "val_ap50" in result.metrics and "val_mask_ap50" not in result.metrics
    start = visionzoo.create_model("fasterrcnn", backbone="efficientnet_lite0", pretrained_backbone=True,
                                   num_classes=4, fpn_channels=64)
    tuned = load_file(result.bundle / "model.safetensors")
    assert tuned.keys() == start.state_dict().keys()
    for name, value in start.state_dict().items():
        if name.startswith("backbone.body."):  # linear: the classifier as pre-trained
            torch.testing.assert_close(tuned[name], value, rtol=0, atol=0, msg=name)


def test_a_published_mask_rcnn_gets_new_class_layers_and_trains_on_masks():
    """`--model maskrcnn_resnet50_fpn` with K classes: the box predictor and the mask predictor's last
    convolution are rebuilt for K, the rest kept (here without the download: random weights)."""
    net = visionzoo.create_model("maskrcnn_resnet50_fpn", weights=None, num_classes=91, min_size=64, max_size=64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.reset_classifier(4)
    after = net.state_dict()
    assert after["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert after["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 16
    assert after["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4
    assert after["roi_heads.mask_predictor.conv5_mask.weight"].shape[0] == 256
    changed = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}
    assert changed == {f"roi_heads.{layer}.{p}" for layer in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                                               "mask_predictor.mask_fcn_logits")
                       for p in ("weight", "bias")}
    net.train()
    masks = torch.zeros((1, 64, 64), dtype=torch.uint8)
    masks[0, 10:30, 20:50] = 1
    losses = net([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[20.0, 10.0, 50.0, 30.0]]),
                                             "labels": torch.tensor([3]), "masks": masks}])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_a_keypoint_rcnn_on_masks_without_keypoints_is_refused(tmp_path, small_masks):
    with pytest.raises(InputError, match="keypointrcnn_resnet50_fpn predicts keypoints but the data has none"):
        visionzoo.finetune(small_masks / "instances.json", tmp_path / "run",
                           **{**TINY_RUN, "model": "keypointrcnn_resnet50_fpn", "head": None,
                              "fpn_channels": None}, progress=False)


# -- the acceptance run -------------------------------------------------------------------------------

@pytest.mark.slow
def test_mask_rcnn_from_imagenet_weights_reaches_70_box_and_60_mask_ap50_on_held_out_images(tmp_path, capsys):
    _, ev, seconds, _ = acceptance_run(tmp_path, MASK_RECIPE, masks=True)
    with capsys.disabled():
        print(f"\nMask R-CNN fine-tune: {seconds:.0f} s; held-out box AP50 {ev.ap50:.3f}, AP {ev.ap:.3f}; "
              f"mask AP50 {ev.mask_ap50:.3f}, mask AP {ev.mask_ap:.3f}")
    assert ev.num_images == 60 and ev.ap50 >= 0.70 and ev.mask_ap50 is not None and ev.mask_ap50 >= 0.60
