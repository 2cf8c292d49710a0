"""PNG plots for `evaluate`: the confusion matrix, per-class scores, precision-recall curves and the training
curves (matplotlib, no display)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window or need a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..fileutil import atomic_path  # noqa: E402

MAX_LABELLED = 40  # above this many classes, tick labels and cell counts become unreadable


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                     unit: str = "images") -> Path:
    """Rows: the true class; columns: the predicted one. Cells show counts of `unit`, or for pixels
    (counts too large to read) the percentage of the true class."""
    cm = np.asarray(confusion, dtype=float)
    # colour by the fraction of each true class (a row), so rare classes are as visible as common ones
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    size = min(16.0, 3.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= MAX_LABELLED:
        labels = [c if len(c) <= 18 else c[:17] + "…" for c in classes]
        ax.set_xticks(range(n), labels, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), labels)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    text = f"{int(cm[i, j])}" if unit == "images" else f"{share[i, j]:.1%}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"confusion matrix ({int(cm.sum()):,} {unit}, accuracy {accuracy:.2%})")
    fig.tight_layout()
    return _save(fig, path)


def class_scores(scores: Sequence[float | None], classes: Sequence[str], path: Path, title: str) -> Path:
    """A horizontal bar per class (a score in [0, 1]; missing scores left empty)."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(7, min(16.0, 1.5 + 0.3 * n)), dpi=100)
    values = [np.nan if v is None else v for v in scores]
    ax.barh(range(n), values, color="tab:blue")
    labels = [c if len(c) <= 18 else c[:17] + "…" for c in classes]
    ax.set_yticks(range(n), labels if n <= MAX_LABELLED * 2 else [""] * n)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    for i, v in enumerate(values):
        ax.text(min(v, 0.85) + 0.01 if v == v else 0.01, i, "-" if v != v else f"{v:.1%}", va="center", fontsize=8)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def precision_recall(recall: Sequence[float], curves: Mapping[str, Sequence[float | None]], path: Path,
                     title: str) -> Path:
    """Precision against recall, a line per class (COCO's interpolated curves: None past the highest
    recall reached)."""
    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=100)
    for name, precision in list(curves.items())[:MAX_LABELLED]:
        values = [np.nan if v is None else v for v in precision]
        ax.plot(recall, values, label=name if len(name) <= 18 else name[:17] + "…")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(history: Sequence[Mapping], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    segmentation = any("val_miou" in h for h in history)  # scored by mIoU, not accuracy
    detection = any("val_ap50" in h for h in history)  # scored by COCO AP
    score = "val_miou" if segmentation else "val_ap50" if detection else "val_acc"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    curves = [("train_loss", "train", ax_loss), ("val_loss", "validation", ax_loss)]
    if detection:
        curves += [("val_ap", "validation AP", ax_acc), ("val_ap50", "validation AP50", ax_acc),
                   ("val_ap75", "validation AP75", ax_acc)]
    elif segmentation:
        curves += [("train_acc", "train pixel accuracy", ax_acc),
                   ("val_pixel_acc", "validation pixel accuracy", ax_acc), ("val_miou", "validation mIoU", ax_acc)]
    else:
        curves += [("train_acc", "train", ax_acc), ("val_acc", "validation", ax_acc)]
    for key, label, ax in curves:
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
    val = [h.get(score) for h in history]
    if any(v is not None for v in val):
        best = int(np.nanargmax([v if v is not None else np.nan for v in val]))
        ax_acc.axvline(epochs[best], color="grey", linestyle=":", label=f"best (epoch {epochs[best]})")
    if detection:
        ax_loss.set_title("detection loss (training: on augmented crops)")
        ax_acc.set_title("COCO AP")
    elif segmentation:
        ax_loss.set_title("loss (training: on augmented crops)")
        ax_acc.set_title("mIoU and pixel accuracy")
    else:
        ax_loss.set_title("loss (training: with label smoothing and augmentation)")
        ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
