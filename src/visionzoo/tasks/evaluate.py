"""Evaluate a model (usually a fine-tuned bundle) on a labelled dataset.

    ev = evaluate("runs/digits", "digits_test/", out="runs/digits/eval")
    ev.accuracy, ev.top5, ev.per_class[0].f1, ev.confusion

    ev = evaluate("runs/shapes", "shapes_test/", out="runs/shapes/eval")    # images/ + masks/
    ev.miou, ev.pixel_accuracy, ev.iou, ev.confusion                         # pixel counts

    ev = evaluate("runs/boxes", "boxes_test/instances.json", out="runs/boxes/eval")  # or a box CSV
    ev.ap, ev.ap50, ev.ap75, ev.class_ap, ev.files["pr_curve"]               # COCO mAP (pycocotools)

Images are preprocessed exactly as in validation during training (the bundle's recipe,
no fast decoding path); a segmentation model's labels are scored at each mask's own size,
as `segment` writes them. A video model is scored on a folder of class sub-folders of videos,
each video by the mean of its evenly spaced clips' probabilities (`clips`, default the recipe's).
With `out`, writes `metrics.json`, `confusion_matrix.png` (segmentation: also `class_iou.png`)
and, when the bundle has a training history, `training_curves.png` (plots need matplotlib:
`pip install "visionzoo[plots]"`; without it they are skipped with a note).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..bundle import is_bundle
from ..data.datasets import open_dataset
from ..data.images import DEFAULT_LIMITS, DecodeLimits, load_image
from ..data.inputs import Failure
from ..data.loader import ImageBatch, default_num_workers, image_batches
from ..data.masks import CLASSES_FILE, MaskFolder, open_mask_folder, read_classes, read_mask
from ..data.preprocess import Preprocess
from ..data.video import video_batches
from ..enums import Task
from ..errors import ImageError, InputError
from ..factory import resolve_model
from ..metrics import ClassMetrics, class_iou, confusion_matrix, mean_iou, per_class, pixel_accuracy, topk_hits
from ..models.base import VisionModel, ZooModel
from ..train.segmentation import score_masks
from ..train.video import labelled_videos
from .evaluate_detection import DetectionEvaluation, evaluate_detection
from .reports import report_dict, write_report

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
        return report_dict(self)


@dataclass(frozen=True)
class SegmentationEvaluation:
    model: str  # the bundle folder or model name evaluated
    data: str
    num_images: int  # images scored (failures excluded)
    miou: float  # mean IoU over the classes present in the masks or the predictions
    pixel_accuracy: float  # labelled pixels predicted right
    classes: tuple[str, ...]
    iou: tuple[float | None, ...]  # per class; None where the class is neither present nor predicted
    class_accuracy: tuple[float | None, ...]  # per class: its pixels predicted right (None: not present)
    confusion: tuple[tuple[int, ...], ...]  # pixels: confusion[true][predicted]
    failures: tuple[Failure, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return report_dict(self, Task.SEGMENTATION)


_Scores = TypeVar("_Scores", Evaluation, SegmentationEvaluation)


def evaluate(model: str | os.PathLike | VisionModel, data: str | os.PathLike, *,
             out: str | os.PathLike | None = None, batch_size: int = 64, num_workers: int | None = None,
             device: str | torch.device = "cpu", plots: bool = True,
             limits: DecodeLimits | str | None = None, clips: int | None = None
             ) -> Evaluation | SegmentationEvaluation | DetectionEvaluation:
    """Score `model` (a bundle folder, a run folder, a model name or instance) on `data`: for a
    classifier an ImageFolder tree or a `path,label` CSV whose class names the model knows (an
    `Evaluation`); for a segmentation model a folder of `images/` and `masks/` (a
    `SegmentationEvaluation`); for a detector a COCO instances JSON or a box CSV (a
    `DetectionEvaluation`: COCO mAP, see `evaluate_detection.py`); for a video model a folder of
    class sub-folders of videos, `clips` per video, `batch_size` counting clips (an `Evaluation`).
    Images that cannot be read or break the decode `limits` (a `DecodeLimits`, or text such as
    "pixels=200M,bytes=1G") are left out and listed in `failures`."""
    limits = DecodeLimits.parse(limits) if isinstance(limits, str) else limits or DEFAULT_LIMITS
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(model, VisionModel) and Path(model).exists() and not is_bundle(model):
        raise InputError(f"{model} is not a bundle (no bundle.json); give a folder written by `visionzoo finetune`")
    net = resolve_model(model)
    if net.task is Task.DETECTION:
        return evaluate_detection(net, model, data, out=out, batch_size=batch_size, num_workers=num_workers,
                                  device=torch.device(device), plots=plots, limits=limits)
    if net.task is Task.SEGMENTATION:
        return _evaluate_segmentation(net, model, data, out=out, batch_size=batch_size, num_workers=num_workers,
                                      device=torch.device(device), plots=plots, limits=limits)
    if not isinstance(net, ZooModel):
        raise InputError(f"{model} is a {net.task.value} model; evaluate scores classifiers")
    card = net.card
    if card is None or card.classes is None:
        raise InputError(f"{model} has no class names or preprocessing to evaluate against; give a bundle "
                         f"written by `visionzoo finetune`")
    classes = tuple(card.classes)
    video = net.task is Task.VIDEO
    batches: Iterator[ImageBatch]  # a VideoBatch is one, with (videos, clips, C, T, H, W) images
    if video:
        clips = clips or card.preprocess.clips or 1
        paths, targets = labelled_videos(data, classes)
        batches = video_batches(paths, card.preprocess, clips=clips, batch_size=max(1, batch_size // clips),
                                num_workers=num_workers, limits=limits)
    elif clips is not None:
        raise InputError(f"clips is for video models; {net.arch} classifies images")
    else:
        dataset = open_dataset(data, classes=classes)  # refuses folders naming classes the model lacks
        paths, targets = [p for p, _ in dataset.samples], dataset.targets
        batches = image_batches(paths, card.preprocess, batch_size=batch_size, num_workers=num_workers, fast=False,
                                limits=limits, pin_memory=torch.device(device).type == "cuda")
    labels = np.array(targets, dtype=np.int64)
    device = torch.device(device)
    net = net.to(device).eval()
    preds = np.full(len(paths), -1, dtype=np.int64)
    top5_hit = np.zeros(len(paths), dtype=bool)
    failures: list[Failure] = []
    with torch.inference_mode():
        for batch in batches:
            failures += [Failure(str(paths[i]), reason) for i, reason in batch.failures]
            images = batch.stacked()  # a classifier's preprocessing crops: one size
            if images is None:
                continue
            x = images.to(device)
            if video:  # (videos, clips, C, T, H, W): the mean of the clips' probabilities ranks the classes
                logits = torch.softmax(net(x.flatten(0, 1)).float(), dim=1).view(*x.shape[:2], -1).mean(1).cpu()
            else:
                logits = net(x).float().cpu()
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


def _write(ev: _Scores, out: Path, history, plots: bool) -> _Scores:
    out.mkdir(parents=True, exist_ok=True)

    def figures(_plots) -> dict[str, str]:
        unit = "pixels" if isinstance(ev, SegmentationEvaluation) else "images"
        drawn = {"confusion_matrix": str(_plots.confusion_matrix(ev.confusion, ev.classes,
                                                                 out / "confusion_matrix.png", unit=unit))}
        if isinstance(ev, SegmentationEvaluation):
            drawn["class_iou"] = str(_plots.class_scores(ev.iou, ev.classes, out / "class_iou.png",
                                                         title=f"IoU per class (mIoU {ev.miou:.2%})"))
        return drawn

    return write_report(ev, out, {}, [], plots=plots, history=history, figures=figures)


# -- segmentation ------------------------------------------------------------------------------

def _evaluate_segmentation(net: VisionModel, model, data, *, out, batch_size: int, num_workers: int | None,
                           device: torch.device, plots: bool, limits: DecodeLimits) -> SegmentationEvaluation:
    card = net.card
    if card is None or card.classes is None:
        raise InputError(f"{model} has no class names to evaluate against; give a bundle written by "
                         f"`visionzoo finetune` or a model with published weights")
    classes = tuple(card.classes)
    if (Path(data).expanduser() / CLASSES_FILE).is_file() and read_classes(data) != classes:
        raise InputError(f"{data}: its {CLASSES_FILE} names other classes ({list(read_classes(data))[:5]}) than "
                         f"the model's ({list(classes)[:5]}); masks must use the model's class indices")
    folder = open_mask_folder(data, classes)  # refuses masks with indices beyond the model's classes
    net = net.to(device).eval()
    workers = default_num_workers(-(-len(folder) // batch_size)) if num_workers is None else num_workers
    failures: list[Failure] = []
    items = _ScoredMasks(folder, card.preprocess, limits)

    def batches():
        for batch in DataLoader(items, batch_size=batch_size, num_workers=workers, collate_fn=list):
            failures.extend(Failure(str(folder.samples[i].image), reason) for i, _, reason in batch if reason)
            yield [x for _, x, reason in batch if not reason]

    confusion, _, images = score_masks(net, batches(), len(classes), device, None)
    if not images:
        raise InputError(f"no image of {data} could be read ({failures[0].path}: {failures[0].reason}, ...)")
    cm = confusion.numpy()
    iou = class_iou(cm)
    support = cm.sum(1)
    accuracy = np.divide(np.diag(cm), support, out=np.full(len(classes), np.nan), where=support > 0)
    ev = SegmentationEvaluation(
        model=str(card.bundle.path if card.bundle is not None else model if not isinstance(model, VisionModel)
                  else card.architecture),
        data=str(data), num_images=images, miou=mean_iou(cm), pixel_accuracy=pixel_accuracy(cm), classes=classes,
        iou=tuple(None if np.isnan(v) else float(v) for v in iou),
        class_accuracy=tuple(None if np.isnan(v) else float(v) for v in accuracy),
        confusion=tuple(tuple(int(v) for v in row) for row in cm), failures=tuple(failures))
    if out is not None:
        ev = _write(ev, Path(out).expanduser(), card.bundle.history if card.bundle is not None else (), plots)
    return ev


class _ScoredMasks(Dataset):
    """Position i -> (i, (image preprocessed as `segment` does, mask), None), or (i, None, reason) for an
    image that cannot be decoded (the masks were checked already)."""

    def __init__(self, folder: MaskFolder, preprocess: Preprocess, limits: DecodeLimits = DEFAULT_LIMITS):
        self.folder = folder
        self.transform = preprocess.transforms()
        self.limits, self.resize_to = limits, preprocess.resize_size  # (as `segment` decodes)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        sample = self.folder.samples[i]
        try:
            image = self.transform(load_image(sample.image, limits=self.limits, resize_to=self.resize_to))
        except ImageError as e:
            return i, None, e.reason
        return i, (image, torch.from_numpy(read_mask(sample.mask, len(self.folder.classes)))), None
