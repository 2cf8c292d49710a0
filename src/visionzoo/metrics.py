"""Classification metrics, once for every workflow: top-k hits, confusion matrices, per-class scores.

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
