"""The compatibility doctor: what a checkpoint file is and whether it fits a model.

`inspect_checkpoint(path, model=None)` reads the file safely (memory-mapped, weights
only) and reports its format, tensors, dtypes and size, the wrapper and prefixes it
carries, its key layout, the registered architectures it most likely belongs to, and,
given a model name, exactly what `create_model(model, weights=path)` would do with it:
the renaming, the adaptations, and the missing, unexpected and mis-shaped keys.

Identification compares key names and shapes (after renaming) with each architecture's
signature, built cheaply on the meta device. To avoid building every architecture, a
family is only examined if its first variant shares enough key patterns (names with
the numbers blanked) with the checkpoint.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..registry import REGISTRY, split_name
from ..weights.adapt import BATCH_COUNTER, LoadReport, plan_load
from ..weights.io import read_checkpoint
from ..weights.lean import build_meta
from ..weights.remap import LAYOUTS, detect_layout, strip_prefixes

FAMILY_OVERLAP = 0.5  # share of a checkpoint's key patterns a family must have to be examined
IDENTIFIED = 0.9  # score from which a candidate counts as identified


@dataclass(frozen=True)
class Candidate:
    """A registered architecture a checkpoint may belong to."""

    arch: str
    score: float  # keys with the same name and shape / all keys of both (1.0: identical)
    matched: int  # keys with the same name and shape
    mismatched: int  # keys with the same name, other shape (a different head, width, ...)


@dataclass
class CheckpointReport:
    """What `inspect_checkpoint` found; `lines()` renders it, `to_dict()` for JSON."""

    path: str
    format: str
    file_bytes: int
    num_tensors: int
    num_values: int  # elements in all tensors
    tensor_bytes: int
    dtypes: dict[str, int]  # dtype -> number of tensors
    wrapper: list[str] = field(default_factory=list)  # entries unwrapped ("state_dict", ...)
    prefixes: list[str] = field(default_factory=list)  # prefixes stripped ("module.", ...)
    layout: str = "native"  # key layout detected ("native" = torchvision names)
    candidates: list[Candidate] = field(default_factory=list)  # best first
    model: str | None = None  # the model it was checked against
    fit: LoadReport | None = None  # what loading into `model` would do

    @property
    def architecture(self) -> str | None:
        """The architecture the checkpoint belongs to, if one matches well."""
        best = self.candidates[0] if self.candidates else None
        return best.arch if best is not None and best.score >= IDENTIFIED else None

    def lines(self, limit: int | None = None) -> list[str]:
        """Human-readable lines; `limit` caps the keys listed per kind."""
        dtypes = ", ".join(f"{d} x{n}" for d, n in self.dtypes.items())
        out = [f"file          {self.path}",
               f"format        {self.format}, {_size(self.file_bytes)}",
               f"tensors       {self.num_tensors} ({self.num_values:,} values, {_size(self.tensor_bytes)}): {dtypes}"]
        wrapped = [f"unwrapped '{k}'" for k in self.wrapper] + [f"stripped '{p}'" for p in self.prefixes]
        out.append(f"wrapper       {'; '.join(wrapped) if wrapped else 'none'}")
        desc = LAYOUTS[self.layout].description if self.layout in LAYOUTS else "torchvision names"
        out.append(f"layout        {self.layout} ({desc})")
        if self.candidates:
            best, rest = self.candidates[0], self.candidates[1:4]
            verdict = best.arch if self.architecture else f"unknown (closest: {best.arch})"
            others = ", ".join(f"{c.arch} {c.score:.0%}" for c in rest)
            out.append(f"architecture  {verdict}: {best.score:.0%} of keys and shapes match"
                       + (f" ({best.mismatched} keys differ in shape)" if best.mismatched else "")
                       + (f"; next: {others}" if others else ""))
        else:
            out.append("architecture  unknown: no registered architecture shares its keys")
        if self.fit is not None:
            verdict = "fits" if self.fit.fits else f"does not fit: {self.fit.problems()}"
            out.append(f"against       {self.model}: {verdict}")
            out += [f"  {line}" for line in self.fit.lines(limit)[1:-1]]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["architecture"] = self.architecture
        d["fit"] = self.fit.to_dict() if self.fit is not None else None
        return d


def inspect_checkpoint(path: str | Path, model: str | None = None) -> CheckpointReport:
    """Report what the checkpoint at `path` is, and, with `model` (`arch` or `arch.TAG`),
    what loading it into that model would do. Raises `CheckpointError` for unreadable files."""
    ckpt = read_checkpoint(path)
    sd = ckpt.state_dict
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in sd.values())
    report = CheckpointReport(
        path=str(ckpt.path), format=ckpt.format, file_bytes=ckpt.path.stat().st_size, num_tensors=len(sd),
        num_values=sum(t.numel() for t in sd.values()),
        tensor_bytes=sum(t.numel() * t.element_size() for t in sd.values()),
        dtypes=dict(dtypes.most_common()), wrapper=list(ckpt.wrapper))
    bare, report.prefixes = strip_prefixes(sd)
    report.layout = detect_layout(bare)
    report.candidates = identify(bare, report.layout)
    if model is not None:
        report.model = model
        report.fit = _fit(ckpt, model)
    return report


def _fit(ckpt, model: str) -> LoadReport:
    """What `create_model(model, weights=<file>)` would do, without loading anything."""
    arch = REGISTRY.get_architecture(model)
    _, tag = split_name(model)
    record = REGISTRY.get_weights(model) if tag else None
    kwargs = dict(record.builder_kwargs) if record else {}
    kwargs["num_classes"] = record.num_classes if record else 1000
    report = LoadReport(source=str(ckpt.path), format=ckpt.format,
                        remapped=[f"unwrapped the '{k}' entry" for k in ckpt.wrapper])
    plan_load(lambda **kw: build_meta(lambda: arch.build(**kw)), ckpt.state_dict, kwargs=kwargs,
              layout=None, size_from_checkpoint=record is None, report=report)
    return report


# -- identification ------------------------------------------------------------------------------
def identify(sd: dict[str, torch.Tensor], layout: str, limit: int = 5) -> list[Candidate]:
    """Registered architectures ranked by how well `sd` (prefixes stripped) matches them."""
    families: dict[str, list[str]] = {}
    for name in REGISTRY.list_models():
        entry = REGISTRY.get_architecture(name)
        if not entry.composed:  # a head composed on a backbone has no state dict of its own to match
            families.setdefault(entry.family, []).append(name)
    scored: list[tuple[float, str]] = []
    for family, names in families.items():
        converted = _convert(sd, layout, _signature(names[0]))
        if converted is None:
            continue
        mine = {_pattern(k) for k in converted if not k.endswith(BATCH_COUNTER)}
        theirs = {_pattern(k) for k in _signature(names[0])}
        if mine:
            scored.append((len(mine & theirs) / len(mine), family))
    scored.sort(reverse=True)
    examine = [f for overlap, f in scored if overlap >= FAMILY_OVERLAP] or [f for _, f in scored[:1]]
    candidates = []
    for family in examine:
        for name in families[family]:
            signature = _signature(name)
            converted = _convert(sd, layout, signature)
            if converted is not None:
                candidates.append(_score(name, converted, signature))
    candidates.sort(key=lambda c: (-c.score, -c.matched, c.arch))
    return [c for c in candidates if c.score > 0][:limit]


@cache
def _signature(arch: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an architecture's state dict (no batch counters), built on meta."""
    model = build_meta(REGISTRY.get_architecture(arch).build)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(BATCH_COUNTER)}


def _convert(sd: dict[str, torch.Tensor], layout: str, signature: dict[str, tuple[int, ...]]
             ) -> dict[str, tuple[int, ...]] | None:
    if layout == "native":
        return {k: tuple(v.shape) for k, v in sd.items()}
    try:
        converted = LAYOUTS[layout].convert(sd, list(signature))
    except Exception:  # noqa: BLE001 - a converter that cannot handle this target: not a candidate
        return None
    return {k: tuple(v.shape) for k, v in converted.items()}


def _score(arch: str, shapes: dict[str, tuple[int, ...]], signature: dict[str, tuple[int, ...]]) -> Candidate:
    keys = {k for k in shapes if not k.endswith(BATCH_COUNTER)}
    common = keys & signature.keys()
    matched = sum(shapes[k] == signature[k] for k in common)
    union = len(keys | signature.keys())
    return Candidate(arch, matched / union if union else 0.0, matched, len(common) - matched)


def _pattern(key: str) -> str:
    return re.sub(r"\d+", "#", key)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
