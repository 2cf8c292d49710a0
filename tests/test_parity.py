"""Every architecture is the same network as torchvision's: identical state-dict keys and
shapes, and float64 logits within 1e-6 (relative) of the reference on filled weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import visionzoo
from visionzoo.registry import REGISTRY
from visionzoo.weights.lean import build_meta

from .conftest import PARITY
from .parity import fill_, relative_error

_CASES = json.loads((PARITY / "manifest.json").read_text())["cases"]
ARCHS = [a for a in visionzoo.list_models() if a in _CASES]
TOL = 1e-6


def test_every_built_torchvision_architecture_has_a_parity_case():
    built = set(visionzoo.list_models())
    assert {a for a in built if not a.startswith("efficientnet_lite")} <= set(_CASES)


def _build_float64(arch: str, case: dict) -> torch.nn.Module:
    """The architecture in float64, eval mode, without a throw-away random init: the largest
    are GBs in float64 (ViT-H, RegNet-Y-128GF), so every model is built on the meta device
    and materialised once in float64. `fill_` then sets every parameter and BatchNorm
    statistic; the counters are zeroed and the model recomputes its derived buffers (Swin and
    MaxViT position indices)."""
    build = REGISTRY.get_architecture(arch).build
    model = build_meta(lambda: build(**case["kwargs"])).double().to_empty(device="cpu")
    for name, buf in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    model.init_computed_buffers()
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_parity(arch, parity_input, parity_outputs):
    case = _CASES[arch]
    model = _build_float64(arch, case)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = {name: shape for name, shape, _dtype, _kind in case["keys"]}
    assert sorted(set(ref) - set(ours)) == [], "keys missing from our model"
    assert sorted(set(ours) - set(ref)) == [], "keys our model has and the reference does not"
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}, "shape mismatches"
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    fill_(model, seed=0)
    with torch.no_grad():
        out = model(torch.from_numpy(parity_input).double()).numpy()
    expected = parity_outputs[arch]
    assert relative_error(out, expected) <= TOL
    assert out.argmax(1).tolist() == case["top1"]


@pytest.mark.parametrize("i", [0, 1, 2])
def test_packaged_lite_weights_match_reference_logits(i, parity_input):
    ref = np.load(PARITY / "packaged_lite_outputs.npz")[f"lite{i}_parity_input"]
    model = visionzoo.create_model(f"efficientnet_lite{i}", pretrained=True).double()
    with torch.no_grad():
        out = model(torch.from_numpy(parity_input).double()).numpy()
    assert relative_error(out, ref) <= TOL
