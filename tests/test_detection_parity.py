"""The single-stage detectors are torchvision's networks: identical state-dict keys and shapes, and on
filled weights in float64 the same detections (count, order, labels) with boxes and scores within
1e-10 (relative) of the reference, on two images of different sizes batched together."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import visionzoo
from visionzoo.registry import REGISTRY

from .parity import TASKS, build_filled_task_model, relative_error, tolerance

_ALL_CASES = json.loads((TASKS / "manifest.json").read_text())["cases"]
_CASES = {name: case for name, case in _ALL_CASES.items() if case["task"] == "detection"}
# the two-stage detectors' cases: their parity is test_rcnn_parity.py's
TWO_STAGE = {name for name in _CASES if REGISTRY.get_architecture(name).family == "detection.rcnn"}
# ResNet-50-FPN at 800 px on two images in float64: tens of seconds each
SLOW = {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"}


def detection_archs() -> set[str]:
    """The registered detectors with published weights (not the heads composed on any classifier)."""
    return {name for name in visionzoo.list_models(task="detection") if not REGISTRY.get_architecture(name).composed}


def coverage_gaps(archs: set[str], cases: set[str]) -> tuple[set[str], set[str]]:
    """(registered detectors without a case, cases without a registered detector)."""
    return archs - cases, cases - archs


def test_detection_cases_and_architectures_cover_each_other():
    assert coverage_gaps(detection_archs(), set(_CASES)) == (set(), set())
    assert set(_CASES) - TWO_STAGE == {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
                                       "ssd300_vgg16", "ssdlite320_mobilenet_v3_large"}


def test_the_coverage_check_fails_when_an_architecture_or_a_case_is_removed():
    archs, cases = detection_archs(), set(_CASES)
    assert coverage_gaps(archs - {"fcos_resnet50_fpn"}, cases) == (set(), {"fcos_resnet50_fpn"})
    assert coverage_gaps(archs, cases - {"ssd300_vgg16"}) == ({"ssd300_vgg16"}, set())


@pytest.fixture(scope="module")
def task_data():
    return np.load(TASKS / "inputs.npz"), np.load(TASKS / "outputs.npz")


def build_filled(name: str) -> torch.nn.Module:
    return build_filled_task_model(name, _CASES[name])


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(set(_CASES) - TWO_STAGE)])
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
