"""Which architectures the quick subset (`pytest -m "not slow"`) runs for per-architecture tests.

The full suite (CI) checks every architecture. The quick subset keeps, of each family, its smallest
member (by parameter count), so every family's code still runs; the others are marked slow.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import pytest

from visionzoo.registry import REGISTRY
from visionzoo.weights.lean import build_meta


@functools.cache
def num_params(arch: str) -> int:
    """Parameters of `arch`: its default weights' record, else counted on the meta device."""
    entry = REGISTRY.get_architecture(arch)
    if entry.default_weights is not None:
        return entry.default_weights.num_params
    return sum(p.numel() for p in build_meta(entry.build).parameters())


def representatives(archs: Iterable[str]) -> set[str]:
    """The smallest architecture of each family among `archs`."""
    best: dict[str, str] = {}
    for arch in archs:
        family = REGISTRY.get_architecture(arch).family
        if family not in best or num_params(arch) < num_params(best[family]):
            best[family] = arch
    return set(best.values())


def per_family(archs: Iterable[str]) -> list:
    """`archs` as pytest parameters, all but each family's representative marked slow."""
    archs = sorted(archs)
    return quick_only(archs, representatives(archs))


def quick_only(params: Iterable, keep: Iterable[str]) -> list:
    """`params` as pytest parameters, all but those whose first value is in `keep` marked slow: for
    tests whose cost varies so much by architecture that only the light ones fit the quick subset."""
    keep = set(keep)
    out = []
    for p in params:
        name = p[0] if isinstance(p, tuple) else p
        out.append(p if name in keep else pytest.param(*(p if isinstance(p, tuple) else (p,)), marks=pytest.mark.slow))
    return out
