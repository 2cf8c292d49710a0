"""The six segmentation models are torchvision's networks: identical state-dict keys and shapes,
and float64 `out` / `aux` logits within 1e-10 (relative) of the reference on filled weights, at
every 4th pixel and in their sums, with the same class (argmax) at every pixel."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visionzoo.models import segmentation

from .parity import TASKS, TOL, assert_keys_match, build_float64, fill_, relative_error

_CASES = {name: case for name, case in json.loads((TASKS / "manifest.json").read_text())["cases"].items()
          if case["task"] == "segmentation"}


@pytest.fixture(scope="module")
def fixtures():
    with np.load(TASKS / "inputs.npz") as inputs, np.load(TASKS / "outputs.npz") as outputs:
        yield dict(inputs), {k: v for k, v in outputs.items() if k.split("/")[0] in _CASES}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


def test_cases_and_variants_cover_each_other():
    assert set(_CASES) == set(segmentation.VARIANTS)


@pytest.mark.parametrize("name", sorted(_CASES))
def test_segmentation_parity(name, fixtures):
    inputs, expected = fixtures
    case = _CASES[name]
    model = build_float64(lambda: segmentation.MODEL_CLASS(segmentation.VARIANTS[name], **case["kwargs"]))
    assert_keys_match(model, case)
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    fill_(model, seed=0)
    (key,) = case["inputs"]
    with torch.no_grad():
        outputs = model(torch.from_numpy(inputs[key]).double())

    heads = sorted({name.split("_")[0] for name in case["outputs"]})
    assert sorted(outputs) == heads
    for head, logits in outputs.items():
        full = logits.numpy()
        assert full.shape == (1, 21, *inputs[key].shape[-2:])
        strided = full[..., ::4, ::4]
        assert list(strided.shape) == case["outputs"][f"{head}_strided4"]
        assert relative_error(strided, expected[f"{name}/{head}_strided4"]) <= TOL, head
        sums = np.array([full.sum(), np.abs(full).sum()])
        assert relative_error(sums, expected[f"{name}/{head}_sum"]) <= TOL, head
        assert np.array_equal(full.argmax(1), expected[f"{name}/{head}_argmax"]), head
