"""RAFT large and small are torchvision's networks: identical state-dict keys and shapes, and the
first and the last of 12 flow estimates within 1e-10 (relative) of the reference in float64 on
filled weights (fixtures/tasks)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visionzoo.models import raft

from .parity import TASKS, TOL, assert_keys_match, build_float64, fill_, relative_error

_CASES = {name: case for name, case in json.loads((TASKS / "manifest.json").read_text())["cases"].items()
          if case["task"] == "optical_flow"}


def test_every_flow_case_is_a_variant():
    assert set(_CASES) == set(raft.VARIANTS)


@pytest.mark.parametrize("arch", sorted(_CASES))
def test_parity(arch):
    case = _CASES[arch]
    model = build_float64(lambda: raft.MODEL_CLASS(raft.VARIANTS[arch], **case["kwargs"]))
    assert_keys_match(model, case)
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    fill_(model, seed=0)
    inputs = np.load(TASKS / "inputs.npz")
    image1, image2 = (torch.from_numpy(inputs[key]).double() for key in case["inputs"])
    with torch.no_grad():
        flows = model(image1, image2, num_flow_updates=case["num_flow_updates"])
    assert len(flows) == case["num_flow_updates"]
    expected = np.load(TASKS / "outputs.npz")
    for name, flow in (("flow_first", flows[0]), ("flow_last", flows[-1])):
        assert relative_error(flow.numpy(), expected[f"{arch}/{name}"]) <= TOL, name
