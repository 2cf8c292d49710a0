"""Benchmark a model on every backend: throughput, latency, memory, size, and (with data) accuracy.

    result = benchmark("efficientnet_lite0", batches=(1, 32), backends=("torch", "openvino"))
    print(result.to_json())

For every (backend, precision) the runner is opened once, then for every batch size a
random batch of the model's input size (a segmentation model's: a 4:3 photo after its
recipe's resize, 520 x 693 for torchvision's weights) is timed with `measure.time_calls`: `warmup`
untimed calls (OpenVINO compiles each batch shape on its first call), then `repeats`
timed ones; throughput is taken at the median time, latency reported as p50 and p95.

Memory: the peak resident memory during a batch size's runs (Linux `VmHWM`, reset
before each batch size) less the process's resident memory before the runner was
opened: the model, the runtime and the activations of that batch. Memory that earlier
backends freed may be reused without showing up, so compare it between runs of one
backend, or benchmark one backend per process for exact figures.

With `data` (an ImageFolder tree or `path,label` CSV with the model's class names),
the images are decoded and preprocessed once (exact path) and every backend and
precision scores the same tensors (classifiers; `evaluate` scores segmentation models).

The notes say what `auto` (the default backend and precision of predict, embed and serve)
chooses at each batch size and why.

`model` is a name (`arch[.TAG]`), a bundle folder, a visionzoo model, or an ONNX file from
`export`/`quantize` (which runs on onnxruntime and openvino only). Combinations that
cannot run (bf16 on ONNX Runtime, a file on torch) are skipped with a note.
"""
from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..enums import Precision, Task, parse_enum
from ..errors import InputError, MissingDependencyError, check_at_least
from ..models.base import VisionModel


@dataclass(frozen=True)
class BenchmarkRow:
    model: str
    backend: str
    precision: str
    batch: int
    throughput: float  # images per second, at the median batch time
    p50_ms: float  # per batch
    p95_ms: float
    peak_mib: float | None  # peak resident memory over the process's before the runner was opened
    size_mib: float  # the model file, or the torch model's parameters and buffers
    accuracy: float | None = None  # on `data`, when given
    repeats: int = 0  # timed runs


@dataclass(frozen=True)
class Skipped:
    backend: str
    precision: str
    reason: str


@dataclass
class BenchmarkResult:
    model: str
    rows: list[BenchmarkRow]
    machine: dict[str, Any]
    machine_text: str
    skipped: list[Skipped] = field(default_factory=list)
    auto: dict[int, dict[str, Any]] = field(default_factory=dict)  # batch size -> what `auto` chose, and why
    data: str | None = None
    data_images: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "settings": self.settings,
                "data": self.data, "data_images": self.data_images, "auto": self.auto,
                "rows": [asdict(r) for r in self.rows], "skipped": [asdict(s) for s in self.skipped]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def write_json(self, path: str | os.PathLike) -> Path:
        from ..fileutil import atomic_path

        path = Path(path).expanduser()
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json() + "\n")
        return path

    HEADERS = ("model", "backend", "precision", "batch", "img/s", "p50 ms", "p95 ms", "peak MiB", "size MiB",
               "accuracy")

    def table_rows(self) -> list[tuple[str, ...]]:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        return [(r.model, r.backend, r.precision, str(r.batch), num(r.throughput, ".1f"), num(r.p50_ms, ".2f"),
                 num(r.p95_ms, ".2f"), num(r.peak_mib, ".0f"), num(r.size_mib, ".1f"),
                 "-" if r.accuracy is None else f"{r.accuracy:.2%}") for r in self.rows]

    def table(self):
        """The rows as a rich `Table`."""
        from rich.table import Table

        table = Table(*self.HEADERS)
        for row in self.table_rows():
            table.add_row(*row)
        return table

    def lines(self) -> list[str]:
        """The rows as plain, aligned text (and the notes)."""
        rows = [self.HEADERS, *self.table_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADERS))]
        text = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                for r in rows]
        return [f"machine: {self.machine_text}", *text, *self.notes()]

    def notes(self) -> list[str]:
        out = [f"batch {batch}: {choice['summary']}" for batch, choice in self.auto.items()]
        out += [f"skipped {s.backend} {s.precision}: {s.reason}" for s in self.skipped]
        if self.data is not None:
            out.append(f"accuracy on {self.data_images} images of {self.data}")
        return out


def _split(values: str | int | os.PathLike | Iterable[Any] | None) -> list[Any] | None:
    if values is None:
        return None
    if isinstance(values, str):
        return [v.strip() for v in values.split(",") if v.strip()]
    if isinstance(values, (int, os.PathLike)):
        return [values]
    return list(values)


def parse_batches(batches: str | int | Iterable[int]) -> list[int]:
    items = _split(batches) or []
    try:
        sizes = [int(b) for b in items]
    except (TypeError, ValueError):
        raise InputError(f"batch sizes must be whole numbers, got {batches!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise InputError(f"batch sizes must be >= 1, got {batches!r}")
    return list(dict.fromkeys(sizes))


def benchmark(model, *, batches: str | Sequence[int] | None = None, backends: str | Sequence[str] | None = None,
              precisions: str | Sequence[str] = ("fp32",), data: str | os.PathLike | None = None,
              threads: int | None = None, repeats: int = 10, warmup: int = 2, limit: int | None = None,
              num_workers: int | None = None, max_seconds: float = 30.0, auto: bool = True) -> BenchmarkResult:
    """Time `model` on every backend and precision at every batch size.

    Args:
        model: a name (`arch[.TAG]`), a bundle folder, a visionzoo model, or an ONNX file
            written by `export` or `quantize`.
        batches: batch sizes (a sequence or a comma-separated string); default 1 and 32 (1 and 4
            for segmentation models, whose batches are photo-sized).
        backends: `torch`, `onnxruntime`, `openvino` (default: every installed one that can run
            `model`: not torch for a file).
        precisions: `fp32`, `bf16` (torch and openvino), `int8` (an int8 file from `quantize`).
        data: an ImageFolder tree or `path,label` CSV: accuracy of each backend and precision.
        threads: compute threads (torch's setting while the torch backend runs; the runtimes'
            own otherwise). Default: each library's (one per core).
        repeats, warmup: timed and untimed runs per batch size.
        limit: score at most this many images of `data`.
        num_workers: decoding processes for `data`.
        max_seconds: stop repeating (after at least 3 runs) once a batch size took this long.
        auto: also report what `auto` chooses at each batch size, and why (measured once per
            model and machine, then read from the cache).
    """
    from ..runtime.backends import Backend, installed_backends, is_model_file
    from ..runtime.measure import describe_machine, machine_description

    asked = None if batches is None else parse_batches(batches)
    check_at_least("repeats", repeats, 1)
    check_at_least("warmup", warmup, 0)
    check_at_least("threads", threads, 1, optional=True)
    check_at_least("limit", limit, 1, optional=True)
    is_file = is_model_file(model)
    default = [b for b in installed_backends() if not (is_file and b is Backend.TORCH)]
    wanted = [parse_enum(Backend, b, "backend") for b in (_split(backends) or default)]
    if Backend.AUTO in wanted:
        raise InputError("name the backends to benchmark (torch, onnxruntime, openvino), not auto")
    wanted = list(dict.fromkeys(wanted))
    precs = list(dict.fromkeys(parse_enum(Precision, p, "precision") for p in (_split(precisions) or ["fp32"])))
    if not is_file and isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx":
        raise InputError(f"{model}: no such file")
    if is_file:
        from ..runtime.export import read_onnx_info

        path = Path(model).expanduser()
        info = read_onnx_info(path)
        if info is None:
            raise InputError(f"{path} has no visionzoo metadata (preprocessing, classes); export it with "
                             f"`visionzoo export` or `visionzoo quantize`")
        source: Any = path
        label = path.name
    else:
        if Precision.INT8 in precs:
            raise InputError("int8 needs a quantized model file: run `visionzoo quantize MODEL --calibration DIR "
                             "--out MODEL.int8.onnx` first and benchmark that .onnx file")
        from ..factory import resolve_model
        from ..runtime.metadata import model_info

        if not isinstance(model, (str, os.PathLike, VisionModel)):
            raise InputError(f"model must be a name, a bundle, an ONNX file or a visionzoo model, got "
                             f"{type(model).__name__}")
        source = resolve_model(os.fspath(model) if isinstance(model, os.PathLike) else model)
        info = model_info(source)
        label = (str(model) if not isinstance(model, VisionModel) else info.arch)
        if isinstance(model, (str, os.PathLike)) and Path(model).exists():
            label = Path(model).name or str(model)

    sizes = asked or list(info.graph.default_batches)
    images = labels = None
    data_text = None
    if data is not None:
        images, labels = _labelled(data, info, limit, num_workers)
        data_text = str(data)

    plan, skipped = _plan(wanted, precs, is_file, info)
    rows: list[BenchmarkRow] = []
    for backend, precision in plan:
        try:
            rows += _run_one(source, label, backend, precision, sizes, threads=threads, repeats=repeats,
                             warmup=warmup, max_seconds=max_seconds, images=images, labels=labels)
        except MissingDependencyError as e:
            skipped.append(Skipped(backend.value, precision.value, str(e)))
    choices = {size: _auto_choice(source, threads, size) for size in sizes} if auto else {}
    return BenchmarkResult(model=label, rows=rows, machine=machine_description(threads),
                           machine_text=describe_machine(threads), skipped=skipped, auto=choices, data=data_text,
                           data_images=0 if images is None else len(images),
                           settings={"batches": sizes, "backends": [b.value for b in wanted],
                                     "precisions": [p.value for p in precs], "repeats": repeats,
                                     "warmup": warmup, "threads": threads, "limit": limit})


def _auto_choice(source, threads: int | None, batch: int) -> dict[str, Any]:
    """What `auto` runs `source` with at this batch size (measured now if not before), and why."""
    from ..runtime.backends import open_runner

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        runner = open_runner(source, threads=threads, batch_size=batch)
    finally:
        torch.set_num_threads(saved)
    choice = runner.choice
    if choice is None:  # not reached: auto always says why
        return {"backend": runner.backend.value, "precision": runner.precision.value, "summary": runner.describe()}
    return {**choice.to_dict(), "summary": choice.summary()}


def _plan(backends, precisions, is_file: bool, info) -> tuple[list[tuple[Any, Any]], list[Skipped]]:
    """The (backend, precision) pairs that can run, and why the others cannot."""
    from ..runtime.backends import Backend

    plan, skipped = [], []
    file_int8 = is_file and info.precision == Precision.INT8.value
    for backend in backends:
        for precision in precisions:
            reason = None
            if is_file and backend is Backend.TORCH:
                reason = "an ONNX file runs on onnxruntime and openvino; benchmark the model name or bundle on torch"
            elif file_int8 and precision is not Precision.INT8:
                if precision is Precision.FP32 and Precision.INT8 not in precisions:
                    precision = Precision.INT8  # the file is what it is: its one precision
                else:
                    reason = "the file is quantized: it runs in int8"
            elif is_file and precision is Precision.INT8:
                reason = "the file is float32; make an int8 file with `visionzoo quantize` and benchmark that"
            elif precision is Precision.BF16 and backend is Backend.ONNXRUNTIME:
                reason = "bf16 runs on the torch and openvino backends; ONNX Runtime's CPU kernels are float32"
            if reason is not None:
                skipped.append(Skipped(backend.value, precision.value, reason))
            elif (backend, precision) not in plan:
                plan.append((backend, precision))
    return plan, skipped


def _labelled(data, info, limit: int | None, num_workers: int | None):
    from ..data.datasets import open_dataset
    from ..runtime.measure import load_labelled

    if info.task is not Task.CLASSIFICATION:
        raise InputError(f"--data measures the accuracy of classifiers; score a {info.task.value} model with "
                         f"`visionzoo evaluate MODEL DATA`")
    if not info.classes:
        raise InputError(f"{info.arch} has no class names to score --data against; give a bundle written by "
                         f"`visionzoo finetune`, a model with published weights, or a file exported from them")
    dataset = open_dataset(data, classes=info.classes)  # refuses classes the model lacks
    images, labels = load_labelled(dataset.samples, info.preprocess, limit=limit, num_workers=num_workers)
    if not len(images):
        raise InputError(f"no image of {data} could be read")
    return images, labels


def _run_one(source, label: str, backend, precision, sizes: list[int], *, threads, repeats, warmup, max_seconds,
             images, labels) -> list[BenchmarkRow]:
    from ..runtime.backends import Backend, open_runner
    from ..runtime.measure import accuracy, peak_mib, reset_peak, rss_mib, time_calls

    saved_threads = torch.get_num_threads()
    if threads and backend is Backend.TORCH:
        torch.set_num_threads(threads)
    gc.collect()
    baseline = rss_mib()
    try:
        runner = open_runner(source, backend, threads=threads, precision=precision)
        size_mib = runner.size_bytes / 2**20
        rows = []
        acc = None
        if images is not None:
            acc = accuracy(runner.logits, images, labels)
        for batch in sizes:
            (x,) = runner.info.graph.example_inputs(runner.info, batch)
            tracked = reset_peak() and baseline is not None
            timing = time_calls(partial(runner.logits, x), batch, warmup=warmup, repeats=repeats,
                                min_repeats=min(3, repeats), max_seconds=max_seconds)
            peak = peak_mib() if tracked else None
            rows.append(BenchmarkRow(model=label, backend=backend.value, precision=runner.precision.value,
                                     batch=batch, throughput=timing.throughput, p50_ms=timing.p50_ms,
                                     p95_ms=timing.p95_ms,
                                     peak_mib=(max(0.0, peak - baseline) if peak is not None and baseline is not None
                                               else None),
                                     size_mib=size_mib, accuracy=acc, repeats=len(timing.times)))
        del runner
        return rows
    finally:
        torch.set_num_threads(saved_threads)
        gc.collect()
