"""Inference inside a distributed engine: a picklable batch predictor for Ray Data (or any map over batches).

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    ds = ds.map_batches(BatchPredictor, fn_constructor_kwargs={"model": "resnet50"}, concurrency=4, batch_size=64)
    ds.write_parquet("s3://bucket/labels.parquet")

A `BatchPredictor` loads its model once, in its constructor (so once per Ray actor; pickling
one sends its arguments, and the copy loads the model where it lands), and maps a batch, a
dict of columns, to a `pyarrow.Table` with one row per input row: the image's `path`, the
task's output columns, and `error` (null, or why the image failed). A bad image never raises;
an exception from the model itself (a broken runtime, out of memory) does, so that the engine
retries the batch and a lasting fault stops the job instead of writing error rows.

Input columns: `path` (required: it names the row) and the image as `bytes` (the encoded file,
as `read_binary_files` gives it), `image` (decoded pixels, as `read_images` gives them: no EXIF
orientation, which only the file carries) or neither (the file at `path` is read: on a cluster,
a path every worker sees). Decoding, the fast path, the preprocessing, the near-tie rule and the
backends are the local commands' (`loader.prepare_image`, `predict.classify_batch`,
`embed.Encoder`): an image gives the same answer here as in `visionzoo predict` or `embed`.

Decoding may run as its own, earlier stage (CPU tasks, while actors keep the model busy):
`predictor.decoder()` is a picklable `BatchDecoder` that adds the preprocessed `pixels` (with
`reduced` and `error`) which the predictor then takes as they are.

Output columns, chosen by the model card's task (`task_columns`, one class per task):
- classification: `label` (the most probable class), `labels`, `indices`, `probabilities`
  (the top-k, most probable first);
- embeddings (`embed=True`, any classifier): `embedding`, a fixed-size list of float32.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..data.images import DEFAULT_MAX_PIXELS
from ..data.loader import ImageSource, prepare_image, reduce_target
from ..data.preprocess import Preprocess
from ..enums import Task
from ..errors import InputError
from ..optional import require
from ..registry import DEFAULT_MODEL
from ..runtime.backends import Runner
from ..runtime.options import InferenceOptions
from .embed import Encoder
from .predict import classify_batch

PATH, ERROR = "path", "error"
BYTES, IMAGE = "bytes", "image"  # the image as read_binary_files / read_images give it
PIXELS, REDUCED = "pixels", "reduced"  # a decoding stage's output: the preprocessed image, fast path taken


class TaskColumns(Protocol):
    """A task's output columns: their types, and their values for a batch of preprocessed images."""

    def fields(self) -> list[Any]:
        """The `pyarrow.Field`s of the columns."""

    def __call__(self, images: torch.Tensor, reduced: Sequence[int],
                 exact: Callable[[int], torch.Tensor | None]) -> dict[str, Any]:
        """One `pyarrow.Array` per column, one value per image. `reduced`: the rows decoded at a
        reduced scale; `exact(row)`: that row decoded at full size and preprocessed (None if it
        no longer decodes), for the near-tie rule."""


class ClassificationColumns:
    """`label`, and the top-k `labels`, `indices` and `probabilities` (most probable first)."""

    def __init__(self, runner: Runner, topk: int):
        if topk < 1:
            raise InputError(f"topk must be >= 1, got {topk}")
        self.runner, self.topk = runner, topk

    def fields(self) -> list[Any]:
        pa = require("pyarrow")
        return [pa.field("label", pa.string()), pa.field("labels", pa.list_(pa.string())),
                pa.field("indices", pa.list_(pa.int32())), pa.field("probabilities", pa.list_(pa.float32()))]

    def __call__(self, images: torch.Tensor, reduced: Sequence[int],
                 exact: Callable[[int], torch.Tensor | None]) -> dict[str, Any]:
        pa = require("pyarrow")
        tops = classify_batch(self.runner, images, self.topk, reduced=reduced, exact=exact)
        return {"label": pa.array([top[0].label for top in tops], pa.string()),
                "labels": pa.array([[t.label for t in top] for top in tops], pa.list_(pa.string())),
                "indices": pa.array([[t.index for t in top] for top in tops], pa.list_(pa.int32())),
                "probabilities": pa.array([[t.probability for t in top] for top in tops], pa.list_(pa.float32()))}


class EmbeddingColumns:
    """`embedding`: the pooled pre-logits (or a pooled stage), as `visionzoo embed` writes it."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def fields(self) -> list[Any]:
        pa = require("pyarrow")
        return [pa.field("embedding", pa.list_(pa.float32(), self.encoder.dim))]

    def __call__(self, images: torch.Tensor, reduced: Sequence[int],
                 exact: Callable[[int], torch.Tensor | None]) -> dict[str, Any]:
        pa = require("pyarrow")
        vectors = self.encoder(images).cpu().numpy().astype(np.float32, copy=False)
        flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), pa.float32())
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat, self.encoder.dim)}


def task_columns(runner: Runner, *, embed: bool = False, topk: int = 5, layer: int | str | None = None,
                 normalize: bool = False) -> TaskColumns:
    """What a predictor writes for `runner`'s model: embeddings when asked, else its task's output."""
    if embed:
        return EmbeddingColumns(Encoder(runner, layer, normalize))
    if layer is not None or normalize:
        raise InputError("layer and normalize shape embeddings; pass embed=True with them")
    task = runner.info.task
    if task is Task.CLASSIFICATION:
        return ClassificationColumns(runner, topk)
    # segmentation (mask statistics) and detection (boxes) add their columns here, one class each
    raise InputError(f"{runner.arch} is a {task.value} model; the distributed predictor writes classification "
                     f"top-k and embeddings so far")


@dataclass(frozen=True)
class BatchDecoder:
    """Batch -> the same batch with the preprocessed `pixels`, `reduced` (decoded at a reduced scale)
    and `error` columns: decoding as its own stage. Picklable; a failed image gets zero pixels and
    its reason in `error`. `bytes` are kept only for reduced images (the near-tie rule may need the
    full-size decode); `image` columns are dropped once preprocessed."""

    preprocess: Preprocess
    fast: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __call__(self, batch: Any) -> dict[str, Any]:
        columns = batch_columns(batch)
        paths = [str(p) for p in columns[PATH]]
        transform = self.preprocess.transforms()
        reduce_to = reduce_target(self.preprocess, self.fast)
        tensors: list[torch.Tensor | None] = []
        errors: list[str | None] = []
        reduced: list[bool] = []
        for row, path in enumerate(paths):
            x, reason, was_reduced = prepare_image(image_source(columns, row), transform, name=path,
                                                   max_pixels=self.max_pixels, reduce_to=reduce_to)
            tensors.append(x)
            errors.append(reason)
            reduced.append(was_reduced)
        out = {k: v for k, v in columns.items() if k not in (IMAGE, BYTES, PIXELS, REDUCED, ERROR)}
        out[PIXELS] = _stack(tensors, self.preprocess)
        out[REDUCED] = np.asarray(reduced, dtype=bool)
        out[ERROR] = np.asarray(errors, dtype=object)
        if BYTES in columns:
            out[BYTES] = np.asarray([columns[BYTES][r] if reduced[r] else None for r in range(len(paths))],
                                    dtype=object)
        return out


def _stack(tensors: list[torch.Tensor | None], preprocess: Preprocess) -> np.ndarray:
    """(N, C, H, W) float32 with zeros for failed rows; an object array when the sizes differ (no crop)."""
    shapes = {tuple(x.shape) for x in tensors if x is not None}
    if len(shapes) > 1:
        column = np.empty(len(tensors), dtype=object)
        for i, x in enumerate(tensors):
            column[i] = x.numpy() if x is not None else np.zeros((3, 1, 1), np.float32)
        return column
    size = preprocess.crop_size or 1
    shape = shapes.pop() if shapes else (3, size, size)
    out = np.zeros((len(tensors), *shape), np.float32)
    for i, x in enumerate(tensors):
        if x is not None:
            out[i] = x.numpy()
    return out


class BatchPredictor:
    """A model (loaded once) mapping batches of images to rows of results; see the module docstring.

    Args:
        model: a name (`arch[.TAG]`, default weights), a bundle, a model instance or an `.onnx`
            file from `export`/`quantize`: on a cluster, a name or a path every worker sees.
        embed: write embeddings (`layer`, `normalize` as for `embed`) instead of the task's output.
        topk: classes per image, for a classifier.
        options: decoding and runtime (`InferenceOptions`: `fast`, `max_pixels`, `device`,
            `backend`, `threads`, `precision`; `batch_size` and `num_workers` are the engine's);
            its fields may also be given as keywords.
    """

    def __init__(self, model: str | os.PathLike | Any = DEFAULT_MODEL, *, embed: bool = False, topk: int = 5,
                 layer: int | str | None = None, normalize: bool = False, options: InferenceOptions | None = None,
                 **settings: Any):
        opts = InferenceOptions.of(options, **settings)
        self.kwargs = {"model": model, "embed": embed, "topk": topk, "layer": layer, "normalize": normalize,
                       "options": opts}
        if opts.threads:
            torch.set_num_threads(opts.threads)  # the torch backend's threads are per process: this worker's
        self.options = opts
        self.runner = opts.open(model)
        self.columns = task_columns(self.runner, embed=embed, topk=topk, layer=layer, normalize=normalize)
        self.transform = self.runner.preprocess.transforms()

    def __reduce__(self):
        # a copy is made from the arguments, loading the model where it is unpickled (once per worker)
        return functools.partial(type(self), **self.kwargs), ()

    @property
    def schema(self) -> Any:
        """The `pyarrow.Schema` of the tables it returns."""
        pa = require("pyarrow")
        return pa.schema([pa.field(PATH, pa.string()), *self.columns.fields(), pa.field(ERROR, pa.string())])

    def decoder(self) -> BatchDecoder:
        """The decoding stage for this model's preprocessing, to run before it as its own step."""
        return BatchDecoder(self.runner.preprocess, self.options.fast, self.options.max_pixels)

    def __call__(self, batch: Any) -> Any:
        pa = require("pyarrow")
        columns = batch_columns(batch)
        if PIXELS not in columns:
            columns = self.decoder()(columns)
        paths = [str(p) for p in columns[PATH]]
        errors = [e if isinstance(e, str) else None for e in columns[ERROR]]  # an all-null column may be NaNs
        good = [row for row, e in enumerate(errors) if e is None]
        values = {f.name: pa.nulls(0, f.type) for f in self.columns.fields()}
        if good:
            pixels = columns[PIXELS]
            if isinstance(pixels, np.ndarray) and pixels.dtype != object:
                images = torch.from_numpy(np.ascontiguousarray(pixels[good], np.float32))
            else:  # one array per row (sizes differ)
                images = torch.from_numpy(np.stack([np.asarray(pixels[row], np.float32) for row in good]))
            reduced = [j for j, row in enumerate(good) if columns[REDUCED][row]]

            def exact(j: int) -> torch.Tensor | None:
                row = good[j]
                return prepare_image(image_source(columns, row), self.transform, name=paths[row],
                                     max_pixels=self.options.max_pixels)[0]

            values = self.columns(images, reduced, exact)
        # the good rows' values, spread over all rows: a null index takes a null
        position = {row: j for j, row in enumerate(good)}
        take = pa.array([position.get(row) for row in range(len(paths))], pa.int32())
        table = {PATH: pa.array(paths, pa.string()), **{name: v.take(take) for name, v in values.items()},
                 ERROR: pa.array(errors, pa.string())}
        return pa.table(table, schema=self.schema)


def batch_columns(batch: Any) -> dict[str, Any]:
    """A batch as a dict of columns: a mapping (Ray's numpy batches), a pandas DataFrame or a pyarrow Table."""
    if hasattr(batch, "to_pydict") and hasattr(batch, "column_names"):  # pyarrow.Table
        columns = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
        columns = {name: batch[name].to_numpy() for name in batch.columns}
    elif isinstance(batch, Mapping):
        columns = dict(batch)
    else:
        raise InputError(f"a batch is a dict of columns (or a pandas DataFrame or pyarrow Table), got "
                         f"{type(batch).__name__}")
    if PATH not in columns:
        raise InputError(f"a batch needs a {PATH!r} column naming each image (read_binary_files and read_images "
                         f"add it with include_paths=True); it has {', '.join(map(repr, columns)) or 'none'}")
    return columns


def image_source(columns: Mapping[str, Any], row: int) -> ImageSource:
    """Row `row`'s image: its encoded bytes, its decoded pixels, or else its path."""
    # a column of nulls may come back as NaNs: only real values count
    data = columns[BYTES][row] if BYTES in columns else None
    if isinstance(data, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(data)
    pixels = columns[IMAGE][row] if IMAGE in columns else None
    if isinstance(pixels, np.ndarray) and pixels.ndim >= 2:
        return pixels
    return str(columns[PATH][row])
