"""The single-stage detectors are torchvision's networks: identical state-dict keys and shapes, and on
filled weights in float64 the same detections (count, order, labels) with boxes and scores within
1e-10 (relative) of the reference, on two images of different sizes batched together."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visionzoo.models.detection import fcos, retinanet, ssd, ssdlite

from .parity import TASKS, assert_keys_match, build_float64, fill_, relative_error, tolerance

_CASES = json.loads((TASKS / "manifest.json").read_text())["cases"]
FAMILIES = {
    "retinanet_resnet50_fpn": retinanet,
    "retinanet_resnet50_fpn_v2": retinanet,
    "fcos_resnet50_fpn": fcos,
    "ssd300_vgg16": ssd,
    "ssdlite320_mobilenet_v3_large": ssdlite,
}
# Build settings implied by the default (COCO_V1) weights rather than passed by the user; they belong
# in the weights records: torchvision sets FrozenBatchNorm eps to 0 after loading these.
WEIGHTS_IMPLIED = {"retinanet_resnet50_fpn": {"frozen_bn_eps": 0.0}}
# ResNet-50-FPN at 800 px on two images in float64: tens of seconds each
SLOW = {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"}


@pytest.fixture(scope="module")
def task_data():
    return np.load(TASKS / "inputs.npz"), np.load(TASKS / "outputs.npz")


def build_filled(name: str) -> torch.nn.Module:
    """The detector as the fixtures were made: manifest kwargs, filled, float64, heads scaled."""
    case, family = _CASES[name], FAMILIES[name]
    model = build_float64(lambda: family.MODEL_CLASS(family.VARIANTS[name], **case["kwargs"],
                                                      **WEIGHTS_IMPLIED.get(name, {})))
    assert_keys_match(model, case)
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    fill_(model, seed=0)
    with torch.no_grad():  # after the float64 conversion, in the listed order
        for module_name, factor in case.get("scaled", {}).items():
            module = model.get_submodule(module_name)
            module.weight.mul_(factor)
            module.bias.mul_(factor)
    return model


def test_every_single_stage_detector_has_a_case():
    assert set(FAMILIES) <= set(_CASES)
    assert all(_CASES[name]["task"] == "detection" for name in FAMILIES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES])
def test_detection_parity(name, task_data):
    inputs, outputs = task_data
    case = _CASES[name]
    model = build_filled(name)
    images = [torch.from_numpy(inputs[key]).double() for key in case["inputs"]]
    with torch.inference_mode():
        detections = model(images)
    assert len(detections) == len(images)
    for i, det in enumerate(detections):
        assert det["boxes"].shape[0] == case[f"num_detections_{i}"]
        for key in ("boxes", "scores", "labels"):
            ref = outputs[f"{name}/{i}_{key}"]
            ours = det[key].numpy()
            assert ours.shape == ref.shape, (i, key)
            if key == "labels":
                assert np.array_equal(ours, ref), (i, key)
            else:
                assert relative_error(ours, ref) <= tolerance(case), (i, key)
