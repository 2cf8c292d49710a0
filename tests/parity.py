"""Parity support: the deterministic filler (one copy: `fixtures/parity/fill.py`, the spec the
reference outputs were made with), the tolerance rule, and float64 builds without a random init."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"
TASKS = FIXTURES / "tasks"

_spec = importlib.util.spec_from_file_location("visionzoo_parity_fill", PARITY / "fill.py")
_fill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fill)
fill_values = _fill.fill_values
fill_targets = _fill.fill_targets
fill_ = _fill.fill_

TOL = 1e-10  # float64: a faithful network lands at ~1e-15..1e-12, a part run in float32 at ~1e-7


def tolerance(case: dict) -> float:
    """`max(1e-10, 1e-7 * fp32_rel_err)`: the second term only for the few filled networks so
    ill-conditioned that float64 rounding alone moves them (see fixtures/parity/README.md)."""
    return max(TOL, 1e-7 * float(case.get("fp32_rel_err") or 0.0))


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """`max|ours - ref| / max|ref|`."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise AssertionError(f"shape {ours.shape} differs from the reference's {ref.shape}")
    scale = np.abs(ref).max() if ref.size else 0.0
    diff = np.abs(ours - ref).max() if ref.size else 0.0
    return float(diff / scale) if scale else float(diff)


def build_float64(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` in float64, eval mode, without a throw-away random init: the largest models are
    GBs in float64, so the model is built on the meta device and materialised once. Counters are
    zeroed and derived buffers (Swin/MaxViT position indices) recomputed; `fill_` then sets the
    rest."""
    from visionzoo.weights.lean import build_meta

    model = build_meta(build).double().to_empty(device="cpu")
    for name, buf in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    model.init_computed_buffers()
    return model.eval()


def state_dict_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def assert_keys_match(model: torch.nn.Module, case: dict) -> None:
    """Same state-dict names and shapes as the reference (so published files load strictly)."""
    ours = state_dict_shapes(model)
    ref = {name: shape for name, shape, _dtype, _kind in case["keys"]}
    assert sorted(set(ref) - set(ours)) == [], "keys missing from our model"
    assert sorted(set(ours) - set(ref)) == [], "keys our model has and the reference does not"
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}, "shape mismatches"


def build_filled_task_model(name: str, case: dict) -> torch.nn.Module:
    """A task model as the fixtures were made (`weights="DEFAULT"`): the case's kwargs plus the build
    settings its default weights record implies (e.g. frozen_bn_eps 0), keys and parameter count
    checked, filled, float64, then the case's `scaled` modules multiplied, in the listed order."""
    from visionzoo.registry import REGISTRY

    arch = REGISTRY.get_architecture(name)
    implied = dict(REGISTRY.get_weights(name).builder_kwargs)
    model = build_float64(lambda: arch.build(**case["kwargs"], **implied))
    assert_keys_match(model, case)
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    fill_(model, seed=0)
    with torch.no_grad():
        for module_name, factor in case.get("scaled", {}).items():
            module = model.get_submodule(module_name)
            module.weight.mul_(factor)
            module.bias.mul_(factor)
    return model
