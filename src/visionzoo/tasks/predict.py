"""Classify images: files, folders and globs in; top-k labels out, bad files reported.

`iter_predict` streams one result per input (a `Prediction` or a `Failure`) so the
caller can write results as they come; `predict` collects them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import load_image
from ..data.inputs import Failure, expand_inputs
from ..errors import ImageError, InputError
from ..models._base import ZooModel


@dataclass(frozen=True)
class Label:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    path: str
    top: tuple[Label, ...]  # most probable first

    @property
    def label(self) -> str:
        return self.top[0].label

    def to_dict(self) -> dict:
        return {"path": self.path, "predictions": [
            {"rank": r + 1, "index": t.index, "label": t.label, "probability": t.probability}
            for r, t in enumerate(self.top)]}


class _ImageFiles(Dataset):
    """Decoded, preprocessed images; a bad file yields its error message instead."""

    def __init__(self, paths: Sequence[os.PathLike], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.paths[i])), None
        except ImageError as e:
            return i, None, e.reason


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, _, err in items if err is not None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, bad


def resolve_model(model: str | ZooModel) -> ZooModel:
    """A model instance from a name (`arch[.TAG]`, with default weights) or an instance."""
    if isinstance(model, ZooModel):
        return model
    if isinstance(model, str):
        from ..factory import create_model
        from ..registry import split_name

        _, tag = split_name(model)
        return create_model(model, weights=None if tag else "DEFAULT")
    raise InputError(f"model must be a name or a visionzoo model, got {type(model).__name__}")


def iter_predict(inputs: Sequence[str | os.PathLike], model: str | ZooModel = "efficientnet_lite0",
                 topk: int = 5, batch_size: int = 32, num_workers: int = 0,
                 device: str | torch.device = "cpu") -> Iterator[Prediction | Failure]:
    """Yield a `Prediction` or a `Failure` for every input file, in input order per batch."""
    if topk < 1:
        raise InputError(f"topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    net = resolve_model(model)
    files, failures = expand_inputs(list(inputs))
    yield from failures
    if not files:
        return
    net = net.to(device).eval()
    if net.preprocess is None:
        raise InputError("the model has no preprocessing recipe; build it with visionzoo.create_model")
    categories = net.categories
    k = min(topk, net.num_classes)
    loader = DataLoader(_ImageFiles(files, net.preprocess.transforms()), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    with torch.inference_mode():
        for indices, batch, bad in loader:
            results: dict[int, Prediction | Failure] = {i: Failure(str(files[i]), err) for i, err in bad}
            if batch is not None:
                probs = torch.softmax(net(batch.to(device)).float(), dim=1)
                values, classes = probs.topk(k, dim=1)
                for i, v_row, c_row in zip(indices, values.tolist(), classes.tolist(), strict=True):
                    top = (Label(c, categories[c] if categories else f"class_{c}", v)
                           for v, c in zip(v_row, c_row, strict=True))
                    results[i] = Prediction(str(files[i]), tuple(top))
            for i in sorted(results):
                yield results[i]


def predict(inputs: Sequence[str | os.PathLike] | str | os.PathLike, model: str | ZooModel = "efficientnet_lite0",
            topk: int = 5, batch_size: int = 32, **kwargs) -> list[Prediction | Failure]:
    """Classify images. Returns one `Prediction` (or `Failure`, for a bad input) per file."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return list(iter_predict(inputs, model, topk, batch_size, **kwargs))
