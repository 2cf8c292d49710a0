"""What the server does with an image, per task: decode and preprocess, run a batch, answer.

The server is the same for every task; a `TaskHandler` holds what differs, and the model card's
task (`runner.info.task`) picks it from `HANDLERS`. Classification is the one served today;
segmentation (a mask as PNG or RLE, with class fractions) and detection (boxes) each become one
handler class here, registered in `HANDLERS`, with nothing else in the server changing shape.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...data.images import draft_info, load_image
from ...enums import Task
from ...errors import InputError
from ...runtime.backends import Runner
from ..predict import near_ties

MAX_TOPK = 100


@dataclass(frozen=True)
class Prepared:
    """One decoded, preprocessed image, ready to join a batch."""

    tensor: torch.Tensor  # the model's input, (3, S, S)
    reduced: bool  # decoded at a reduced scale (the fast JPEG path)
    size: tuple[int, int]  # the image's (width, height) as decoded in full


class TaskHandler(ABC):
    """The task-specific part of the server. `prepare` runs in the decode pool, `run` in the
    inference thread on a batch, the rest on the event loop."""

    task: ClassVar[Task]

    def __init__(self, runner: Runner, *, topk: int, max_pixels: int | None, fast: bool):
        self.runner = runner
        self.topk = topk
        self.max_pixels = max_pixels
        self.fast = fast

    def parse_query(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The request's options from its query string; `InputError` for a bad value."""
        return {}

    @abstractmethod
    def prepare(self, path: Path, *, exact: bool = False) -> Prepared:
        """Decode and preprocess the uploaded file (`ImageError` when it is not a readable image)."""

    @abstractmethod
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """The model on a batch: one output row per image."""

    def needs_exact(self, prepared: Prepared, output: torch.Tensor) -> bool:
        """Whether the answer of a fast-path decode must be redone on the full-size decode."""
        return False

    @abstractmethod
    def respond(self, output: torch.Tensor, options: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON answer for one image's output row."""


class ClassificationHandler(TaskHandler):
    """Top-k classes, exactly as `predict` computes them: the same decode (fast JPEG path, model
    recipe), softmax over the logits, and a near-tie of a reduced decode decided on the full one."""

    task = Task.CLASSIFICATION

    def __init__(self, runner: Runner, **settings: Any):
        super().__init__(runner, **settings)
        self.transform = runner.preprocess.transforms()
        self.reduce_to = runner.preprocess.resize_size if self.fast else None

    def parse_query(self, params: Mapping[str, str]) -> dict[str, Any]:
        text = params.get("topk")
        if text is None:
            return {"topk": self.topk}
        try:
            k = int(text)
        except ValueError:
            raise InputError(f"topk must be a whole number, got {text!r}") from None
        if not 1 <= k <= MAX_TOPK:
            raise InputError(f"topk must be between 1 and {MAX_TOPK}, got {k}")
        return {"topk": k}

    def prepare(self, path: Path, *, exact: bool = False) -> Prepared:
        img = load_image(path, max_pixels=self.max_pixels, reduce_to=None if exact else self.reduce_to)
        draft = draft_info(img)
        return Prepared(self.transform(img), draft is not None, draft.full_size if draft else img.size)

    def run(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.runner.logits(images).float(), dim=1)

    def needs_exact(self, prepared: Prepared, output: torch.Tensor) -> bool:
        return prepared.reduced and bool(near_ties(output[None])[0])

    def respond(self, output: torch.Tensor, options: Mapping[str, Any]) -> dict[str, Any]:
        k = min(int(options.get("topk", self.topk)), self.runner.num_classes)
        values, classes = output.topk(k)
        names = self.runner.categories
        return {"model": self.runner.arch, "task": self.task.value, "predictions": [
            {"rank": r + 1, "index": c, "label": names[c] if names else f"class_{c}", "probability": v}
            for r, (v, c) in enumerate(zip(values.tolist(), classes.tolist(), strict=True))]}


HANDLERS: dict[Task, type[TaskHandler]] = {Task.CLASSIFICATION: ClassificationHandler}


def handler_for(runner: Runner, **settings: Any) -> TaskHandler:
    """The handler of the runner's task; `InputError` for a task the server cannot serve yet."""
    task = runner.info.task
    cls = HANDLERS.get(task)
    if cls is None:
        served = ", ".join(t.value for t in HANDLERS)
        raise InputError(f"{runner.arch} is a {task.value} model; the server serves {served} models")
    return cls(runner, **settings)
