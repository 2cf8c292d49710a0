"""Metrics, once for every workflow: top-k hits, confusion matrices, per-class scores; and for
segmentation, pixel confusion matrices, intersection over union and pixel accuracy.

Training (validation each epoch), `evaluate`, `benchmark`, `prune` and `quantize` all count with
these, so a number means the same thing wherever it is printed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Per row: whether the label is among the `k` highest scores (k is capped at the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels.to(logits.device)[:, None]).any(dim=1)


def confusion_matrix(labels: np.ndarray | Sequence[int], predictions: np.ndarray | Sequence[int],
                     num_classes: int) -> np.ndarray:
    """`confusion[true, predicted]` counts (int64)."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(predictions, dtype=np.int64)
    return np.bincount(y * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float  # of the images predicted as this class, the fraction that are
    recall: float  # of the images of this class, the fraction predicted as it
    f1: float
    support: int  # images of this class in the data


def per_class(confusion: np.ndarray, classes: Sequence[str]) -> list[ClassMetrics]:
    """Precision, recall and F1 of each class from a confusion matrix (0 where undefined)."""
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return [ClassMetrics(c, float(precision[i]), float(recall[i]), float(f1[i]), int(actual[i]))
            for i, c in enumerate(classes)]


def agreement(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """The share of positions where two label vectors agree (NaN when empty)."""
    a, b = np.asarray(a), np.asarray(b)
    return float((a == b).mean()) if a.size else float("nan")


# -- segmentation ----------------------------------------------------------------------------------

def pixel_confusion(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int,
                    ignore_index: int = 255) -> torch.Tensor:
    """`confusion[true, predicted]` pixel counts (int64, on the labels' device) of two label maps of
    one shape; pixels labelled `ignore_index` are left out."""
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and predictions {tuple(predictions.shape)} differ in shape")
    y = labels.reshape(-1).long()
    keep = y != ignore_index
    y, p = y[keep], predictions.reshape(-1).long().to(y.device)[keep]
    return torch.bincount(y * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per class: intersection over union of the predicted and the true pixels; NaN for a class
    neither present nor predicted (its IoU is undefined, not 0)."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    return np.divide(tp, union, out=np.full_like(tp, np.nan), where=union > 0)


def mean_iou(confusion: np.ndarray | torch.Tensor) -> float:
    """mIoU: the mean IoU over the classes present in the labels or the predictions (NaN if none)."""
    iou = class_iou(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(confusion: np.ndarray | torch.Tensor) -> float:
    """The share of labelled pixels predicted right (NaN without labelled pixels)."""
    cm = np.asarray(confusion, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")
