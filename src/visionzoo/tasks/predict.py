"""Classify images: files, folders, globs, lists in; top-k labels out, bad files reported.

`iter_predict` streams one result per input (a `Prediction` or a `Failure`) so the
caller can write results as they come and memory stays bounded over any number of
files; `predict` collects them. Decoding runs in parallel worker processes
(`data/loader.py`), with the fast JPEG path unless `fast=False`. The model runs on the
chosen backend (`runtime/backends.py`: torch, onnxruntime, openvino; by default the fastest
that keeps float32's answers, `runtime/autotune.py`), every backend fed by the same
preprocessing. Decoding workers and the model's threads share the cores without
oversubscribing them (`runtime/machine.py: split_cores`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..data.inputs import Failure, expand_inputs
from ..data.loader import image_batches, prepare_image
from ..enums import Task
from ..errors import InputError
from ..models.base import ZooModel
from ..registry import DEFAULT_MODEL
from ..runtime.backends import Runner, leading_gap
from ..runtime.machine import CoreBudget, split_cores, torch_threads
from ..runtime.options import InferenceOptions
from .labels import Label
from .video import VIDEO_KINDS, VideoPrediction, iter_predict_videos

log = logging.getLogger("visionzoo")

# fast path: an image decoded at a reduced scale whose two leading classes are closer than
# this (in probability) is decoded again at full size, so its top-1 is the exact path's
NEAR_TIE = 0.05


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


def iter_predict(inputs: Sequence[str | os.PathLike], model: str | os.PathLike | ZooModel | Runner = DEFAULT_MODEL,
                 topk: int = 5, *, clips: int | None = None, options: InferenceOptions | None = None,
                 **settings: Any) -> Iterator[Prediction | VideoPrediction | Failure]:
    """Yield a `Prediction` or a `Failure` for every input, files in input order; for a video model a
    `VideoPrediction` per video (`tasks/video.py`).

    Args:
        inputs: files, folders, globs, `@LIST` files, CSV datasets (see `expand_inputs`).
        model: a name (`arch[.TAG]`, default weights), a bundle folder, a model instance, an
            ONNX file from `export`/`quantize`, or a `Runner`.
        options: how to decode, batch and run (`InferenceOptions`); its fields may also be
            given as keywords: `batch_size`, `num_workers` (decoding processes; None: the cores
            the model's threads leave, `split_cores`; 0: in-process), `fast` (decode large JPEGs
            at a reduced scale first; images whose two leading classes are near-tied are decoded
            again at full size, so the top-1 is the exact path's; False gives torchvision's
            preprocessing exactly), `limits` (the decode budget of each image, a `DecodeLimits`),
            `max_pixels` (its pixel limit), `device`, `backend` (`torch`, `onnxruntime`,
            `openvino` or `auto`), `threads` (the model's; None: its share of the cores),
            `precision` (`fp32`, `bf16` or `auto`).
        clips: video models: evenly spaced clips per video (default: as many as the weights were
            evaluated with); `batch_size` then counts clips.

    torch's thread count is process-wide: it is set to the model's share while the generator runs.
    """
    if topk < 1:
        raise InputError(f"topk must be >= 1, got {topk}")
    opts = InferenceOptions.of(options, **settings)
    items = list(inputs)
    files, failures = expand_inputs(items)
    budget = split_cores(workers=opts.num_workers, threads=opts.threads, decoding=len(files) > opts.batch_size)
    with torch_threads(budget.threads):
        runner = replace(opts, threads=budget.threads).open(model)
        _check_classifier(runner)
        log.info("%s; %s", runner.describe(), budget.describe())
        if runner.info.task is Task.VIDEO:  # the inputs again, as videos (a video is decoded in a worker)
            files, failures = expand_inputs(items, kinds=VIDEO_KINDS)
            yield from failures
            yield from iter_predict_videos(files, runner, topk, clips=clips, options=opts)
            return
        if clips is not None:
            raise InputError(f"clips is for video models; {runner.arch} classifies images")
        yield from failures
        if files:
            yield from _predict_files(files, runner, topk, opts, budget)


# the command that runs a model of each task that `predict` does not take
OTHER_COMMANDS = {Task.SEGMENTATION: "visionzoo segment", Task.DETECTION: "visionzoo detect"}


def _check_classifier(runner: Runner) -> None:
    """Refuse, in one line, a model whose outputs are not class scores (a segmenter, a detector)."""
    if runner.task in OTHER_COMMANDS:
        raise InputError(f"{runner.arch} is a {runner.task.value} model and predict classifies images: "
                         f"run it with `{OTHER_COMMANDS[runner.task]}`")
    if runner.task is Task.OPTICAL_FLOW:
        raise InputError(f"{runner.arch} is an optical-flow model (two frames in, motion out), not a classifier")


def _predict_files(files: list, runner: Runner, topk: int, opts: InferenceOptions, budget: CoreBudget
                   ) -> Iterator[Prediction | Failure]:
    transform = runner.preprocess.transforms()
    batches = image_batches(files, runner.preprocess, batch_size=opts.batch_size, num_workers=budget.workers,
                            fast=opts.fast, limits=opts.limits, pin_memory=opts.torch_device.type == "cuda",
                            reuse_buffers=True)
    with torch.inference_mode():
        for batch in batches:
            results: dict[int, Prediction | Failure] = {i: Failure(str(files[i]), err) for i, err in batch.failures}
            images = batch.stacked()  # a classifier's preprocessing crops: one size
            if images is not None:
                reduced = set(batch.reduced)
                rows = [row for row, i in enumerate(batch.indices) if i in reduced]

                def exact(row: int, indices: list[int] = batch.indices) -> torch.Tensor | None:
                    return prepare_image(files[indices[row]], transform, limits=opts.limits,
                                         resize_to=runner.preprocess.resize_size)[0]

                tops = classify_batch(runner, images, topk, reduced=rows, exact=exact)
                for i, top in zip(batch.indices, tops, strict=True):
                    results[i] = Prediction(str(files[i]), top)
            for i in sorted(results):
                yield results[i]


def classify_batch(runner: Runner, images: torch.Tensor, topk: int, *, reduced: Sequence[int] = (),
                   exact: Callable[[int], torch.Tensor | None] | None = None) -> list[tuple[Label, ...]]:
    """The `topk` most probable classes of each image of a preprocessed batch, most probable first:
    the one classification step of `predict` and of the distributed predictor (`distributed.py`).

    `reduced`: the rows decoded at a reduced scale (the fast path). Those whose two leading
    classes are within `NEAR_TIE` are classified again on `exact(row)`, the row's full-size
    decode, preprocessed (None keeps the fast result: the file no longer decodes). The
    reduced-scale decode moves the probabilities a little: between the two leading classes of
    EfficientNet-Lite0, by at most 0.02 over 300 smooth upscaled photos, and on 300 noisy
    12 MP camera-like JPEGs (`benchmarks/predict_camera.py`'s) by 0.06 at the 99th percentile,
    where the fast top-1 alone differed from the exact path's on 11 images, all with leading
    classes within 0.04. Where the two are that close the top-1 could differ from the exact
    path's, so those images (14% of the camera-like files) take the exact path, after which
    none differed. Clear answers keep the fast path's result."""
    with torch.inference_mode():
        probs = torch.softmax(runner.logits(images), dim=1)
        if reduced and exact is not None:
            tied = near_ties(probs)
            redo = [(row, x) for row in reduced if tied[row] and (x := exact(row)) is not None]
            if redo:
                exact_probs = torch.softmax(runner.logits(torch.stack([x for _, x in redo])), dim=1)
                probs[[row for row, _ in redo]] = exact_probs
        values, classes = probs.topk(min(topk, probs.shape[1]), dim=1)
    categories = runner.categories
    return [tuple(Label(c, categories[c] if categories else f"class_{c}", v) for v, c in zip(v_row, c_row, strict=True))
            for v_row, c_row in zip(values.tolist(), classes.tolist(), strict=True)]


def predict(inputs: Sequence[str | os.PathLike] | str | os.PathLike,
            model: str | os.PathLike | ZooModel | Runner = DEFAULT_MODEL, topk: int = 5, *, clips: int | None = None,
            options: InferenceOptions | None = None, **settings: Any) -> list[Prediction | VideoPrediction | Failure]:
    """Classify images (or videos). Returns one `Prediction` (or `Failure`, for a bad input) per file; the
    arguments are `iter_predict`'s."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return list(iter_predict(inputs, model, topk, clips=clips, options=options, **settings))


def near_ties(probs: torch.Tensor) -> torch.Tensor:
    """Which rows of `probs` (N, classes) have their two most probable classes within `NEAR_TIE`."""
    return leading_gap(probs) < NEAR_TIE
