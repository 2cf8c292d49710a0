"""Evaluate a detector on boxes: COCO mAP with pycocotools, and a precision-recall plot.

    ev = evaluate("runs/boxes", "boxes_test/instances.json", out="runs/boxes/eval")   # or a box CSV
    ev.ap, ev.ap50, ev.ap75, ev.ap_small, ev.class_ap50
    ev.mask_ap, ev.mask_ap50                 # a model with masks on data with segmentations; else None
    ev.keypoint_ap, ev.keypoint_ap50         # a model with keypoints on data with the same keypoints; else None

Each image is run as `detect` runs it (at its own size, the detector resizing it) and every
detection the model keeps (its own `score_thresh`, no display threshold) is scored by
pycocotools' `COCOeval` against the data's boxes; the data's class names are matched to the
model's. When the model predicts instance masks (Mask R-CNN) and the data has them, the masks
(thresholded at 0.5, COCO RLE) are scored too (`COCOeval`'s "segm"): mask AP. When it predicts
keypoints (Keypoint R-CNN) and the data has the same keypoints (by name, in order), they are
scored by object keypoint similarity (`COCOeval`'s "keypoints", at most 20 detections an image,
the OKS sigmas of `train.detection.oks_sigmas`: COCO's for its person keypoints, a uniform
default otherwise; each box's area is its scale): keypoint AP. With `out`, writes
`metrics.json`, `detections.json` (COCO results, the data's image and category ids, with each
detection's `segmentation` where the model predicts masks and `keypoints` (x, y, 1 for each)
where it predicts keypoints), `pr_curve.png` (box precision
against recall at IoU 0.5, per class) and, when the bundle has a training history,
`training_curves.png`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.detection import BACKGROUND, BoxDataset, open_box_dataset
from ..data.images import DecodeLimits, load_image
from ..data.inputs import Failure
from ..data.loader import default_num_workers
from ..enums import Task
from ..errors import ImageError, InputError
from ..fileutil import atomic_path
from ..models.base import VisionModel
from ..models.detection import DetectionModel
from ..train.detection import (
    coco_map,
    has_keypoint_results,
    has_mask_results,
    keypoint_detector,
    oks_sigmas,
    score_boxes,
)
from .reports import report_dict, write_report


@dataclass(frozen=True)
class DetectionEvaluation:
    model: str  # the bundle folder or model name evaluated
    data: str
    num_images: int  # images scored (failures excluded)
    num_boxes: int  # ground-truth boxes
    ap: float  # COCO AP, IoU 0.50:0.95, 100 detections per image
    ap50: float
    ap75: float
    ap_small: float | None  # None: no box of that size in the data
    ap_medium: float | None
    ap_large: float | None
    ar100: float
    classes: tuple[str, ...]  # the classes scored (the data's, named as the model names them)
    class_ap: tuple[float | None, ...]  # per class; None where the data has no box of it
    class_ap50: tuple[float | None, ...]
    mask_ap: float | None = None  # COCO mask AP, IoU 0.50:0.95; None: the model or the data has no masks
    mask_ap50: float | None = None
    mask_ap75: float | None = None
    keypoint_ap: float | None = None  # COCO keypoint AP (OKS 0.50:0.95); None: the model or data has no keypoints
    keypoint_ap50: float | None = None
    keypoint_ap75: float | None = None
    failures: tuple[Failure, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return report_dict(self, Task.DETECTION)


def evaluate_detection(net: VisionModel, model, data: str | os.PathLike, *, out, batch_size: int,
                       num_workers: int | None, device: torch.device, plots: bool,
                       limits: DecodeLimits) -> DetectionEvaluation:
    if not isinstance(net, DetectionModel):
        raise InputError(f"{model} is not a detector")
    card = net.card
    if card is None or card.classes is None:
        raise InputError(f"{model} has no class names to evaluate against; give a bundle written by "
                         f"`visionzoo finetune` or a detector with published weights")
    model_classes = list(card.classes)
    if not model_classes or model_classes[0] != BACKGROUND:
        raise InputError(f"{model}: its classes do not start with {BACKGROUND}; it is not a detector visionzoo wrote")
    dataset = open_box_dataset(data, model_classes[1:])  # refuses classes the model does not know
    net = net.to(device).eval()
    workers = default_num_workers(-(-len(dataset) // batch_size)) if num_workers is None else num_workers
    failures: list[Failure] = []
    items = _Images(dataset, card.preprocess.transforms(), limits)

    def batches():
        for batch in DataLoader(items, batch_size=batch_size, num_workers=workers, collate_fn=list):
            failures.extend(Failure(str(dataset.samples[i].image), reason) for i, _, reason in batch if reason)
            yield [x for _, x, reason in batch if not reason]

    results, _, images = score_boxes(net, batches(), device, None, limits)
    if not images:
        raise InputError(f"no image of {data} could be read ({failures[0].path}: {failures[0].reason}, ...)")
    used = sorted({int(v) for s in dataset.samples for v in s.labels})  # model class indices with boxes
    scores = coco_map(results, len(model_classes) - 1)
    masks = coco_map(results, len(model_classes) - 1, "segm") if has_mask_results(results) else None
    points, notes = None, []
    detector = keypoint_detector(net)
    if detector is not None and dataset.has_keypoints:
        if dataset.keypoint_names != detector.keypoint_names:
            notes.append(f"no keypoint AP: the data's keypoints ({', '.join(dataset.keypoint_names or ())}) are not "
                         f"the model's ({', '.join(detector.keypoint_names)})")
        elif has_keypoint_results(results, detector.num_keypoints):
            points = coco_map(results, len(model_classes) - 1, "keypoints", oks_sigmas(detector.keypoint_names))
    names = tuple(model_classes[k] for k in used)
    ev = DetectionEvaluation(
        model=str(card.bundle.path if card.bundle is not None else model if not isinstance(model, VisionModel)
                  else card.architecture),
        data=str(data), num_images=images, num_boxes=sum(len(s.boxes) for s in dataset.samples), ap=scores.ap,
        ap50=scores.ap50, ap75=scores.ap75, ap_small=scores.ap_small, ap_medium=scores.ap_medium,
        ap_large=scores.ap_large, ar100=scores.ar100, classes=names,
        class_ap=tuple(scores.class_ap[k - 1] for k in used), class_ap50=tuple(scores.class_ap50[k - 1] for k in used),
        mask_ap=masks.ap if masks else None, mask_ap50=masks.ap50 if masks else None,
        mask_ap75=masks.ap75 if masks else None, keypoint_ap=points.ap if points else None,
        keypoint_ap50=points.ap50 if points else None, keypoint_ap75=points.ap75 if points else None,
        failures=tuple(failures), notes=tuple(notes))
    if out is not None:
        curves = {model_classes[k]: scores.precision50[k - 1] for k in used}
        history = card.bundle.history if card.bundle is not None else ()
        ev = _write(ev, Path(out).expanduser(), results, dataset, scores.recall, curves, history, plots)
    return ev


class _Images(Dataset):
    """Position i -> (i, (image in [0, 1] at its own size, sample row), None), or (i, None, reason)."""

    def __init__(self, dataset: BoxDataset, transform, limits: DecodeLimits):
        self.dataset, self.transform, self.limits = dataset, transform, limits

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset.samples[i]
        try:
            image = self.transform(load_image(sample.image, limits=self.limits))
        except ImageError as e:
            return i, None, e.reason
        return i, (image, sample.row()), None


def _write(ev: DetectionEvaluation, out: Path, results, dataset: BoxDataset, recall, curves, history,
           plots: bool) -> DetectionEvaluation:
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    def nothing(r: dict) -> list:
        return [None] * len(r["labels"])

    detections = [{"image_id": r["image_id"], "category_id": dataset.category_ids[int(label) - 1],
                   "bbox": [round(float(b[0]), 2), round(float(b[1]), 2), round(float(b[2] - b[0]), 2),
                            round(float(b[3] - b[1]), 2)], "score": round(float(s), 5),
                   **({} if m is None else {"segmentation": m}),
                   **({} if k is None else {"keypoints": [round(float(v), 2) for v in k.reshape(-1)]})}
                  for r in results
                  for b, s, label, m, k in zip(r["boxes"], r["scores"], r["labels"], r.get("masks") or nothing(r),
                                               r["keypoints"] if "keypoints" in r else nothing(r), strict=True)
                  if 1 <= label <= len(dataset.category_ids) and dataset.category_ids[int(label) - 1] >= 0]
    with atomic_path(out / "detections.json") as tmp:
        tmp.write_text(json.dumps(detections) + "\n")
    files["detections"] = str(out / "detections.json")

    def figures(_plots) -> dict[str, str]:
        return {"pr_curve": str(_plots.precision_recall(recall, curves, out / "pr_curve.png",
                                                        title=f"precision-recall at IoU 0.5 (AP50 {ev.ap50:.3f})"))}

    return write_report(ev, out, files, list(ev.notes), plots=plots, history=history, figures=figures)
