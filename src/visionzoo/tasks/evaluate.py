"""Evaluate a model (usually a fine-tuned bundle) on a labelled dataset.

    ev = evaluate("runs/digits", "digits_test/", out="runs/digits/eval")
    ev.accuracy, ev.top5, ev.per_class[0].f1, ev.confusion

Images are preprocessed exactly as in validation during training (the bundle's recipe,
no fast decoding path). With `out`, writes `metrics.json`, `confusion_matrix.png` and,
when the bundle has a training history, `training_curves.png` (plots need matplotlib:
`pip install "visionzoo[plots]"`; without it they are skipped with a note).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bundle import is_bundle
from ..data.datasets import open_dataset
from ..data.inputs import Failure
from ..data.loader import image_batches
from ..errors import InputError
from ..factory import resolve_model
from ..fileutil import atomic_path
from ..metrics import ClassMetrics, confusion_matrix, per_class, topk_hits
from ..models.base import ZooModel

log = logging.getLogger("visionzoo")


@dataclass(frozen=True)
class Evaluation:
    model: str  # the bundle folder or model name evaluated
    data: str
    num_images: int  # images scored (failures excluded)
    accuracy: float
    top5: float  # true class among the 5 most probable (all classes when there are fewer)
    macro_precision: float
    macro_recall: float
    macro_f1: float  # unweighted mean over the classes present in the data
    classes: tuple[str, ...]
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]  # confusion[true][predicted]
    failures: tuple[Failure, ...] = ()  # images that could not be read
    files: dict[str, str] = field(default_factory=dict)  # what was written: name -> path
    notes: tuple[str, ...] = ()  # e.g. plots skipped

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": f.path, "reason": f.reason} for f in self.failures]
        d["confusion"] = [list(r) for r in self.confusion]
        return d


def evaluate(model: str | os.PathLike | ZooModel, data: str | os.PathLike, *, out: str | os.PathLike | None = None,
             batch_size: int = 64, num_workers: int | None = None, device: str | torch.device = "cpu",
             plots: bool = True) -> Evaluation:
    """Score `model` (a bundle folder, a run folder, a model name or instance) on `data`
    (an ImageFolder tree or a `path,label` CSV whose class names the model knows)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(model, ZooModel) and Path(model).exists() and not is_bundle(model):
        raise InputError(f"{model} is not a bundle (no bundle.json); give a folder written by `visionzoo finetune`")
    net = resolve_model(model)
    if not isinstance(net, ZooModel):
        raise InputError(f"{model} is a {net.task.value} model; evaluate scores classifiers")
    card = net.card
    if card is None or card.classes is None:
        raise InputError(f"{model} has no class names or preprocessing to evaluate against; give a bundle "
                         f"written by `visionzoo finetune`")
    classes = tuple(card.classes)
    dataset = open_dataset(data, classes=classes)  # refuses folders naming classes the model lacks
    paths, labels = [p for p, _ in dataset.samples], np.array(dataset.targets, dtype=np.int64)
    device = torch.device(device)
    net = net.to(device).eval()
    preds = np.full(len(paths), -1, dtype=np.int64)
    top5_hit = np.zeros(len(paths), dtype=bool)
    failures: list[Failure] = []
    with torch.inference_mode():
        for batch in image_batches(paths, card.preprocess, batch_size=batch_size, num_workers=num_workers,
                                   fast=False, pin_memory=device.type == "cuda"):
            failures += [Failure(str(paths[i]), reason) for i, reason in batch.failures]
            if batch.images is None:
                continue
            logits = net(batch.images.to(device)).float().cpu()
            idx = np.asarray(batch.indices)
            preds[idx] = logits.argmax(1).numpy()
            top5_hit[idx] = topk_hits(logits, torch.as_tensor(labels[idx]), 5).numpy()
    ok = preds >= 0
    if not ok.any():
        raise InputError(f"no image of {data} could be read ({failures[0].path}: {failures[0].reason}, ...)")
    y, p = labels[ok], preds[ok]
    confusion = confusion_matrix(y, p, len(classes))
    scores = per_class(confusion, classes)
    present = [m for m in scores if m.support > 0]
    ev = Evaluation(
        model=str(card.bundle.path if card.bundle is not None else model if not isinstance(model, ZooModel)
                  else card.architecture),
        data=str(data), num_images=int(ok.sum()), accuracy=float((y == p).mean()), top5=float(top5_hit[ok].mean()),
        macro_precision=float(np.mean([m.precision for m in present])),
        macro_recall=float(np.mean([m.recall for m in present])),
        macro_f1=float(np.mean([m.f1 for m in present])), classes=classes, per_class=tuple(scores),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion), failures=tuple(failures))
    if out is not None:
        ev = _write(ev, Path(out).expanduser(), card.bundle.history if card.bundle is not None else (), plots)
    return ev


def _write(ev: Evaluation, out: Path, history, plots: bool) -> Evaluation:
    out.mkdir(parents=True, exist_ok=True)
    files, notes = {}, []
    if plots:
        try:
            from . import _plots
        except ImportError:
            notes.append("plots skipped: matplotlib is not installed (pip install \"visionzoo[plots]\")")
        else:
            files["confusion_matrix"] = str(_plots.confusion_matrix(ev.confusion, ev.classes,
                                                                    out / "confusion_matrix.png"))
            if history:
                files["training_curves"] = str(_plots.training_curves(history, out / "training_curves.png"))
            else:
                notes.append("no training curves: the model has no training history")
    files["metrics"] = str(out / "metrics.json")
    ev = replace(ev, files=files, notes=tuple(notes))
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(ev.to_dict(), indent=2) + "\n")
    return ev
