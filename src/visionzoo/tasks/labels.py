"""A class a model predicts, with its probability: what predict writes for images and videos alike."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Label:
    index: int
    label: str
    probability: float


def top_labels(probs: torch.Tensor, topk: int, categories: Sequence[str] | None) -> tuple[Label, ...]:
    """The `topk` most probable classes of one (classes,) probability vector, most probable first."""
    values, classes = probs.topk(min(topk, probs.shape[0]))
    return tuple(Label(c, categories[c] if categories else f"class_{c}", v)
                 for v, c in zip(values.tolist(), classes.tolist(), strict=True))
