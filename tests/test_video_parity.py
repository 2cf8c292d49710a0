"""The video classifiers are torchvision's networks: identical state-dict keys and shapes, and
float64 logits within 1e-10 (relative) of the reference on filled weights (tests/fixtures/tasks)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visionzoo.models import mvit, s3d, swin3d, video_resnet

from .parity import TASKS, TOL, assert_keys_match, build_float64, fill_, relative_error

_CASES = {name: case for name, case in json.loads((TASKS / "manifest.json").read_text())["cases"].items()
          if case["task"] == "video"}
FAMILIES = {video_resnet: ("r3d_18", "mc3_18", "r2plus1d_18"), s3d: ("s3d",), mvit: ("mvit_v1_b", "mvit_v2_s"),
            swin3d: ("swin3d_t", "swin3d_s", "swin3d_b")}
FAMILY_OF = {name: family for family, names in FAMILIES.items() for name in names}
# over ~30 s each in float64 on two cores (MViT takes 16x224x224 clips; the larger Swin3Ds are deep)
SLOW = {"mvit_v1_b", "mvit_v2_s", "swin3d_s", "swin3d_b"}


def test_every_video_case_has_a_family_and_every_variant_a_case():
    assert set(FAMILY_OF) == set(_CASES)
    assert {name for family in FAMILIES for name in family.VARIANTS} == set(_CASES)


@pytest.fixture(scope="module")
def task_data():
    return np.load(TASKS / "inputs.npz"), np.load(TASKS / "outputs.npz")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(_CASES)])
def test_video_parity(name, task_data):
    inputs, outputs = task_data
    case = _CASES[name]
    family = FAMILY_OF[name]
    model = build_float64(lambda: family.MODEL_CLASS(family.VARIANTS[name], **case["kwargs"]))
    assert_keys_match(model, case)
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    fill_(model, seed=0)
    (key,) = case["inputs"]
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs[key]).double()).numpy()
    assert relative_error(logits, outputs[f"{name}/logits"]) <= TOL
