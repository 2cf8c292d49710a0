"""`detect` with the two-stage detectors: Mask R-CNN's instance masks in COCO RLE and drawn as outlined
overlays, one colour per instance; Keypoint R-CNN's keypoints listed by name and drawn as a skeleton. Random
weights at a small size (offline, cheap), the score threshold off so that there is something to report."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import visionzoo
from visionzoo.data.loader import prepare_image
from visionzoo.models.detection.rcnn import COCO_PERSON_KEYPOINTS
from visionzoo.tasks.detect import PALETTE, Detections, detect, draw_detections, overlay_masks

from .photos import sample_image

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # pycocotools 2.0 decoding under NumPy 2:
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
mask_api = pytest.importorskip("pycocotools.mask")

SMALL = dict(box_score_thresh=0.0, box_detections_per_img=4, min_size=160, max_size=224, rpn_pre_nms_top_n_test=100,
             rpn_post_nms_top_n_test=40)


@pytest.fixture(scope="module")
def masker():
    torch.manual_seed(0)
    return visionzoo.create_model("maskrcnn_resnet50_fpn", **SMALL)


@pytest.fixture(scope="module")
def posed():
    torch.manual_seed(0)
    return visionzoo.create_model("keypointrcnn_resnet50_fpn", **SMALL)


@pytest.fixture
def folder(tmp_path):
    shutil.copy(sample_image("coffee.png"), tmp_path / "coffee.png")
    return tmp_path


def test_masks_are_reported_as_coco_rle_and_drawn_per_instance(masker, folder, tmp_path):
    result = detect(folder / "coffee.png", masker, threshold=0.0, draw_dir=tmp_path / "drawn")[0]
    assert isinstance(result, Detections) and len(result.boxes) == 4
    image = prepare_image(folder / "coffee.png", masker.card.preprocess.transforms())[0]
    with torch.inference_mode():
        expected = masker([image])[0]
    for box, probs in zip(result.boxes, expected["masks"][:, 0], strict=True):
        assert box.mask is not None and box.mask["size"] == [result.height, result.width]
        decoded = mask_api.decode({"size": box.mask["size"], "counts": box.mask["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), (probs >= 0.5).numpy())
        assert box.keypoints is None
    row = json.loads(json.dumps(result.to_dict()))
    assert isinstance(row["detections"][0]["mask"]["counts"], str) and "keypoints" not in row["detections"][0]
    # the overlay: the drawing with masks differs from the one with boxes only where some mask is
    masks = expected["masks"][:, 0] >= 0.5
    assert bool(masks.any())
    with_masks = np.asarray(draw_detections(image, result.boxes, masks), dtype=np.int16)
    boxes_only = np.asarray(draw_detections(image, result.boxes), dtype=np.int16)
    changed = np.abs(with_masks - boxes_only).sum(-1) > 0
    assert changed.any() and not changed[~masks.any(0).numpy()].any()  # (box outlines and tags cover some)
    pixels = image.permute(1, 2, 0).clamp(0, 1)
    overlaid = overlay_masks(pixels, masks)
    assert bool(((overlaid - pixels).abs().sum(-1) > 0)[masks.any(0)].all())
    first = masks[0] & ~masks[1:].any(0)  # drawn last-to-first: the best instance on top, in the first colour
    edge = first & ~torch.roll(first, 1, 0)
    assert torch.allclose(overlaid[edge], torch.tensor(PALETTE[0], dtype=pixels.dtype) / 255)
    with Image.open(result.drawn) as png:
        assert np.array_equal(np.asarray(png.convert("RGB"), dtype=np.int16), with_masks)


def test_keypoints_are_listed_by_name_and_drawn_as_a_skeleton(posed, folder, tmp_path):
    result = detect(folder / "coffee.png", posed, threshold=0.0, draw_dir=tmp_path / "drawn")[0]
    assert isinstance(result, Detections) and len(result.boxes) == 4
    image = prepare_image(folder / "coffee.png", posed.card.preprocess.transforms())[0]
    with torch.inference_mode():
        expected = posed([image])[0]
    for box, points, scores in zip(result.boxes, expected["keypoints"], expected["keypoints_scores"], strict=True):
        assert box.mask is None and box.keypoints is not None
        assert tuple(k.name for k in box.keypoints) == COCO_PERSON_KEYPOINTS
        # (detect runs the model with its FrozenBatchNorms folded: the same values to float rounding)
        assert torch.allclose(torch.tensor([[k.x, k.y] for k in box.keypoints]), points[:, :2], rtol=1e-4)
        assert [k.score for k in box.keypoints] == pytest.approx(scores.tolist(), rel=1e-4)
    row = result.to_dict()["detections"][0]
    assert [k["name"] for k in row["keypoints"]][:3] == ["nose", "left_eye", "right_eye"]
    plain = np.asarray(draw_detections(image, [dataclasses.replace(b, keypoints=None) for b in result.boxes]),
                       dtype=np.int16)
    with Image.open(result.drawn) as png:
        drawn = np.asarray(png.convert("RGB"), dtype=np.int16)
    visible = any(k.score > 0 for b in result.boxes for k in b.keypoints or ())
    assert visible and np.abs(drawn - plain).sum() > 0

