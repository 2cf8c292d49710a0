"""Deterministic weight filling for parity tests (the spec of fixtures/parity/fill.py).

Same state-dict names and shapes -> bit-identical parameters, so two implementations of
one architecture must give the same outputs.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch


def fill_values(name: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n = int(np.prod(shape)) if len(shape) else 1
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        v = 0.5 + rng.random(n)
    elif leaf == "running_mean":
        v = 0.1 * rng.standard_normal(n)
    elif len(shape) >= 2:
        v = rng.standard_normal(n) * math.sqrt(2.0 / max(n // shape[0], 1))
    elif leaf == "weight":
        v = 0.5 + rng.random(n)
    else:
        v = 0.1 * rng.standard_normal(n)
    return v.astype(np.float32).reshape(tuple(shape))


def fill_targets(model: torch.nn.Module) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    names += [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    return names


@torch.no_grad()
def fill_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    sd = model.state_dict(keep_vars=True)
    for name in fill_targets(model):
        t = sd[name]
        t.copy_(torch.from_numpy(fill_values(name, tuple(t.shape), seed)).to(t.dtype))
    return model


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
