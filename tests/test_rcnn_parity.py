"""The two-stage detectors are torchvision's networks: identical state-dict keys and shapes, and on filled
weights in float64 the same detections (count, order, labels) with boxes, scores, masks (the stored subsample
of the first ten and every mask's sum) and keypoints within 1e-10 (relative) of the reference, on two images
of different sizes batched together; and so does the model as the torch backend runs it (`detect`: its
FrozenBatchNorms folded into the convolutions, channels-last), which only rounds differently."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visionzoo.registry import REGISTRY
from visionzoo.runtime.torch_opt import optimize_for_inference

from .parity import TASKS, build_filled_task_model, relative_error, tolerance

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_ALL_CASES = json.loads((TASKS / "manifest.json").read_text())["cases"]
CASES = {name: case for name, case in _ALL_CASES.items() if "rcnn" in name}
# ResNet-50-FPN at 800 px on two images in float64 (minutes on one thread), and MobileNetV3 at 800 px (~25 s)
FAST = {"fasterrcnn_mobilenet_v3_large_320_fpn"}


@pytest.fixture(scope="module")
def task_data():
    return np.load(TASKS / "inputs.npz"), np.load(TASKS / "outputs.npz")


def build_filled(name: str) -> torch.nn.Module:
    return build_filled_task_model(name, CASES[name])


def stored_output(det: dict[str, torch.Tensor], key: str) -> np.ndarray:
    """Our output in the fixture's form (masks: the first ten at every second pixel, or each one's sum)."""
    if key == "masks_first10_strided2":
        return det["masks"][:10, :, ::2, ::2].numpy()
    if key == "masks_sum":
        return det["masks"].flatten(1).sum(1).numpy()
    return det[key].numpy()


def test_every_two_stage_architecture_has_a_case():
    assert set(CASES) == {"fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
                          "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn",
                          "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn"}
    assert {REGISTRY.get_architecture(name).family for name in CASES} == {"detection.rcnn"}


# the optimized model: the quick one, and the ResNet-50 trunk the speed anchor is measured on
OPTIMIZED = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
             for n in ("fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn")]


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_rcnn_parity(name, task_data):
    check_parity(name, build_filled(name), task_data)


@pytest.mark.parametrize("name", OPTIMIZED)
def test_optimized_rcnn_parity(name, task_data):
    model = optimize_for_inference(build_filled(name))
    assert not [m for m in model.modules() if type(m).__name__ == "FrozenBatchNorm2d"]  # all folded
    check_parity(name, model, task_data)


def check_parity(name: str, model: torch.nn.Module, task_data) -> None:
    inputs, outputs = task_data
    case = CASES[name]
    images = [torch.from_numpy(inputs[key]).double() for key in case["inputs"]]
    with torch.inference_mode():
        detections = model(images)
    assert len(detections) == len(images)
    checked = set()
    for i, det in enumerate(detections):
        assert det["boxes"].shape[0] == case[f"num_detections_{i}"]
        for output in case["outputs"]:
            index, _, key = output.partition("_")
            if int(index) != i:
                continue
            ref, ours = outputs[f"{name}/{output}"], stored_output(det, key)
            assert ours.shape == ref.shape, output
            if key == "labels":
                assert np.array_equal(ours, ref), output
            else:
                assert relative_error(ours, ref) <= tolerance(case), (output, relative_error(ours, ref))
            checked.add(key)
    expected = {"boxes", "labels", "scores"}
    expected |= {"masks_first10_strided2", "masks_sum"} if "maskrcnn" in name else set()
    expected |= {"keypoints", "keypoints_scores"} if "keypointrcnn" in name else set()
    assert checked == expected
