"""What every `evaluate` writes beside its metrics: the task's figures, the training curves and
`metrics.json`, the same way for each task (classification, segmentation, detection)."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from ..enums import Task
from ..fileutil import atomic_path

E = TypeVar("E")  # an evaluation dataclass with `files`, `notes` and `to_dict()`


def report_dict(ev: Any, task: Task | None = None) -> dict[str, Any]:
    """An evaluation dataclass as `metrics.json` holds it: nested dataclasses (failures) as
    objects, tuples as lists, and the task it scored when given."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    d: dict[str, Any] = plain(asdict(ev))
    if task is not None:
        d["task"] = task.value
    return d


def write_report(ev: E, out: Path, files: dict[str, str], notes: list[str], *, plots: bool,
                 history: Sequence[dict[str, Any]], figures: Callable[[ModuleType], dict[str, str]]) -> E:
    """Draw `figures(_plots)` (the task's plots: name -> file) and the training curves when `plots`
    and matplotlib is installed, then write `metrics.json` atomically; returns `ev` with the files
    and notes."""
    if plots:
        try:
            from . import _plots
        except ImportError:
            notes.append("plots skipped: matplotlib is not installed (pip install \"visionzoo[plots]\")")
        else:
            files.update(figures(_plots))
            if history:
                files["training_curves"] = str(_plots.training_curves(history, out / "training_curves.png"))
            else:
                notes.append("no training curves: the model has no training history")
    files["metrics"] = str(out / "metrics.json")
    ev = replace(ev, files=files, notes=tuple(notes))  # type: ignore[type-var]  # E is a dataclass
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(ev.to_dict(), indent=2) + "\n")  # type: ignore[attr-defined]
    return ev
