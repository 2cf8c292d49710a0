"""Image embeddings: one vector per image, for search, clustering, dedup or light classifiers.

The vector is the model's pooled pre-logit embedding,
`forward_head(forward_features(x), pre_logits=True)`, or with `layer` the global
average of an intermediate stage's NCHW map; optionally L2-normalised.

Output: `.npy` (float32, one row per embedded image) with a sidecar `<stem>.paths.jsonl`
(row order: one JSON string per line, ASCII only, so that no file name, whatever characters
it holds, can split or merge lines; a name that is not valid UTF-8 is kept losslessly as
Python's surrogate escapes, `os.fsencode(path)` gives its bytes back), or `.parquet` (a
`path` column and an `embedding` fixed-size-list column; Parquet's text is UTF-8, so a file
whose name is not is a failure there). Failed images are left out and reported. Sidecars
of the former `<stem>.paths.txt` format (one path per line) are still read.

A run owns its output and work folder (`fileutil.exclusive`): a second run on the same
output is refused with the first one's pid and command line, or waits (`wait=True`).

Resumable: with an output file, results are saved in chunks of `chunk_size` images to a
work folder next to it (`.<name>.embed-work/`), tagged with a key of the inputs (paths,
sizes, modification times), the model's weights and every option that changes a bit of
the result. A rerun after an interruption keeps the chunks saved under the same key and
computes the rest. Batches never straddle chunks, so each image is computed in the same
batch as in an uninterrupted run and the final file (assembled from the chunks and
written atomically) is the same, byte for byte.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.inputs import Failure, expand_inputs
from ..data.loader import image_batches
from ..data.video import video_batches
from ..enums import Task
from ..errors import InputError
from ..fileutil import atomic_path, exclusive, json_digest, remove_leftovers, sha256_file, weights_fingerprint
from ..models.base import ZooModel
from ..models.features import FeatureExtractor, resolve_stage
from ..optional import require
from ..progress import progress_bar
from ..registry import DEFAULT_MODEL
from ..runtime.backends import Backend, Runner, TorchRunner
from ..runtime.machine import CoreBudget, split_cores, torch_threads
from ..runtime.options import InferenceOptions
from .video import VIDEO_KINDS, check_video_runner, videos_per_batch

log = logging.getLogger("visionzoo")
FORMATS = {".npy": "npy", ".parquet": "parquet", ".pq": "parquet"}
CHUNK_BATCHES = 8  # default chunk: 8 batches (256 images at batch size 32)
_KEY_VERSION = 1


@dataclass
class Embeddings:
    """The result of `embed`: `vectors[i]` is the embedding of `paths[i]`."""

    paths: list[str]
    dim: int
    failures: list[Failure] = field(default_factory=list)
    out: Path | None = None  # the file written, if any
    model: str | None = None
    layer: str | None = None  # the stage's module name; None for the pooled pre-logits
    _vectors: np.ndarray | None = field(default=None, repr=False)

    @property
    def vectors(self) -> np.ndarray:
        """(len(paths), dim) float32; read from `out` on first access when it was written there."""
        if self._vectors is None:
            if self.out is None:
                self._vectors = np.zeros((0, self.dim), np.float32)
            else:
                self._vectors = read_embeddings(self.out)[1]
        return self._vectors

    def __len__(self) -> int:
        return len(self.paths)


def sidecar_path(out: str | os.PathLike) -> Path:
    """`emb.npy` -> `emb.paths.jsonl`: the row order of a `.npy` output."""
    out = Path(out)
    return out.with_name(out.stem + ".paths.jsonl")


def legacy_sidecar_path(out: str | os.PathLike) -> Path:
    """`emb.npy` -> `emb.paths.txt`: the sidecar of earlier versions (one path per line)."""
    out = Path(out)
    return out.with_name(out.stem + ".paths.txt")


def write_paths(path: Path, paths: Iterable[str]) -> None:
    """One JSON string per line, ASCII only (`\\n`, U+2028 and surrogate escapes stay escaped)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(p, ensure_ascii=True) + "\n" for p in paths), encoding="ascii")


def read_paths(path: Path) -> list[str]:
    """The paths `write_paths` wrote, exactly (non-UTF-8 names come back as surrogate escapes)."""
    text = path.read_text(encoding="ascii")
    try:
        paths = [json.loads(line) for line in text.split("\n") if line]
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not a paths file written by embed ({e})") from None
    if not all(isinstance(p, str) for p in paths):
        raise InputError(f"{path}: not a paths file written by embed (a line is not a JSON string)")
    return paths


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(paths, vectors) from a file written by `embed` (`.npy` + sidecar, or `.parquet`)."""
    path = Path(path)
    if _output_format(path) == "npy":
        vectors = np.load(path)
        if sidecar_path(path).is_file():
            paths = read_paths(sidecar_path(path))
        else:  # written by an earlier version: one path per line, broken by names holding a newline
            paths = legacy_sidecar_path(path).read_text(encoding="utf-8").split("\n")[:len(vectors)]
        if len(paths) != len(vectors):
            raise InputError(f"{path}: {len(vectors)} vectors but {len(paths)} paths in its sidecar; the two files "
                             f"do not belong together")
        return paths, vectors
    pq = require("pyarrow.parquet")
    table = pq.read_table(path)
    dim = table.schema.field("embedding").type.list_size
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("path").to_pylist(), np.asarray(flat, np.float32).reshape(-1, dim)


def embed(inputs: Sequence[str | os.PathLike] | str | os.PathLike,
          model: str | os.PathLike | ZooModel | Runner = DEFAULT_MODEL, *, out: str | os.PathLike | None = None,
          layer: int | str | None = None, normalize: bool = False, chunk_size: int | None = None,
          resume: bool = True, progress: bool = False, wait: bool = False, clips: int | None = None,
          options: InferenceOptions | None = None, **settings: Any) -> Embeddings:
    """Embed images (or, with a video model, videos): files, folders, globs, `@LIST` files or CSV datasets.

    Args:
        model: a name (`arch[.TAG]`, default weights), a bundle, a model instance, an ONNX
            file from `export`/`quantize`, or a `Runner`.
        out: write the result to this `.npy` (+ `<stem>.paths.jsonl`) or `.parquet` file,
            resumably (see the module docstring). None keeps it in memory only.
        layer: a stage (index into `model.feature_info`, negative from the deepest, or its
            module name) whose feature map is global-average pooled; None for the
            pre-logit embedding. Needs the torch backend.
        normalize: L2-normalise each vector.
        chunk_size: images per saved chunk (a multiple of the batch size; default 8 batches).
        resume: reuse the chunks of an interrupted run with the same key; False starts over.
        progress: show a progress bar on stderr.
        wait: when another run is writing `out`, wait for it to finish (default: refuse with an
            `OutputBusyError` naming it). A run owns its output and work folder while it runs.
        clips: video models: a video's vector is the mean of the pooled embeddings of this many
            evenly spaced clips (default: the weights' evaluation count); `batch_size` then counts
            clips, and a batch holds whole videos.
        options: how to decode, batch and run (`InferenceOptions`; its fields may also be
            given as keywords, as for `predict`).

    Returns `Embeddings` (paths, vectors, failures). With `out`, the vectors are read back
    from the file when first accessed.
    """
    opts = InferenceOptions.of(options, **settings)
    if layer is not None and opts.backend is Backend.AUTO:
        opts = replace(opts, backend=Backend.TORCH)  # a stage's feature map is only the torch backend's
    asked_chunk = chunk_size
    chunk_size = _chunk_size(asked_chunk, opts.batch_size)
    out = Path(out).expanduser() if out is not None else None
    fmt = _output_format(out) if out is not None else None
    if fmt == "parquet":
        require("pyarrow.parquet")
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)

    def media(kinds: tuple[str, ...] = ("image",)) -> tuple[list[Path], list[Failure]]:
        files, failures = expand_inputs(items, kinds=kinds)
        if fmt == "parquet":
            files, unnamed = _utf8_named(files)
            failures += unnamed
        return files, failures

    with exclusive(out, wait=wait) if out is not None else contextlib.nullcontext():
        files, failures = media()
        budget = split_cores(workers=opts.num_workers, threads=opts.threads, decoding=len(files) > opts.batch_size)
        with torch_threads(budget.threads):
            runner = replace(opts, threads=budget.threads).open(model)
            log.info("%s; %s", runner.describe(), budget.describe())
            batches: Callable[..., Iterable] = image_batches
            if runner.info.task is Task.VIDEO:  # the inputs again, as videos; a batch holds whole videos
                check_video_runner(runner)
                files, failures = media(VIDEO_KINDS)
                clips = clips or runner.preprocess.clips or 1
                opts = replace(opts, batch_size=videos_per_batch(opts.batch_size, clips))
                chunk_size = _chunk_size(asked_chunk, opts.batch_size)
                batches = functools.partial(video_batches, clips=clips)
            elif clips is not None:
                raise InputError(f"clips is for video models; {runner.arch} embeds images")
            return _embed(files, failures, runner, opts, budget, out, fmt, layer, normalize, chunk_size, resume,
                          progress, batches, clips)


def _chunk_size(asked: int | None, batch_size: int) -> int:
    chunk_size = CHUNK_BATCHES * batch_size if asked is None else asked
    if chunk_size < 1 or chunk_size % batch_size:
        raise InputError(f"chunk_size must be a positive multiple of batch_size ({batch_size}), got {chunk_size}")
    return chunk_size


def _embed(files: list[Path], failures: list[Failure], runner: Runner, opts: InferenceOptions, budget: CoreBudget,
           out: Path | None, fmt: str | None, layer: int | str | None, normalize: bool, chunk_size: int,
           resume: bool, progress: bool, batches: Callable[..., Iterable] = image_batches,
           clips: int | None = None) -> Embeddings:
    encoder = Encoder(runner, layer, normalize)
    key = _run_key(files, runner, encoder, opts, chunk_size, clips) if out is not None else None
    store = _ChunkStore(_work_dir(out) if out is not None else None, key, resume)
    plan = _ChunkPlan(len(files), chunk_size, opts.batch_size)
    if store.done:
        log.warning("resuming: %d of %d chunks already embedded (in %s)", len(store.done), plan.count, store.folder)
    _embed_chunks(files, runner, encoder, store, plan, opts, budget.workers, progress, batches)

    chunks = [store.load(k) for k in range(plan.count)]
    paths = [str(p) for p in files]
    kept = [paths[i] for c in chunks for i in c.indices]
    failures += [Failure(paths[i], reason) for c in chunks for i, reason in c.failures]
    result = Embeddings(kept, encoder.dim, failures, out, runner.arch, encoder.layer)
    if out is None:
        result._vectors = (np.concatenate([v for c in chunks for v in c.vectors])
                           if kept else np.zeros((0, encoder.dim), np.float32))
        return result
    if fmt == "npy":
        _write_npy(out, chunks, kept, encoder.dim)
    else:
        meta = {"model": runner.arch, "layer": encoder.layer, "normalize": normalize, "dim": encoder.dim}
        _write_parquet(out, chunks, paths, encoder.dim, meta)
    store.remove()
    return result


def _utf8_named(files: list[Path]) -> tuple[list[Path], list[Failure]]:
    """The files whose names are valid UTF-8 (Parquet's text is), and a failure for each other."""
    kept, failures = [], []
    for p in files:
        try:
            str(p).encode("utf-8")
            kept.append(p)
        except UnicodeEncodeError:
            failures.append(Failure(str(p), "file name is not valid UTF-8, which a Parquet file cannot hold; "
                                            "write a .npy output to keep it"))
    return kept, failures


@dataclass(frozen=True)
class _ChunkPlan:
    """`count` chunks of `size` images over `n` images; batches never straddle a chunk."""

    n: int
    size: int
    batch_size: int

    @property
    def count(self) -> int:
        return math.ceil(self.n / self.size)

    def images(self, k: int) -> range:
        return range(k * self.size, min((k + 1) * self.size, self.n))

    def batches(self, chunks: Iterable[int]) -> list[list[int]]:
        return [list(self.images(k))[s:s + self.batch_size] for k in chunks for s in range(0, self.size,
                                                                                            self.batch_size)]


def _run_key(files: list[Path], runner: Runner, encoder: Encoder, opts: InferenceOptions, chunk_size: int,
             clips: int | None = None) -> dict:
    """Everything that changes a bit of the result: saved chunks are reused only under the same key."""
    return {"version": _KEY_VERSION, "inputs": _inputs_fingerprint(files), "count": len(files),
            "model": model_fingerprint(runner), "layer": encoder.layer, "normalize": encoder.normalize,
            "preprocess": runner.preprocess.to_dict(), "fast": opts.fast, "limits": opts.limits.describe(),
            "batch_size": opts.batch_size, "chunk_size": chunk_size, "device": opts.torch_device.type,
            "torch": torch.__version__, **({"clips": clips} if clips is not None else {})}


def _embed_chunks(files: list[Path], runner: Runner, encoder: Encoder, store: _ChunkStore, plan: _ChunkPlan,
                  opts: InferenceOptions, workers: int, progress: bool,
                  batches: Callable[..., Iterable] = image_batches) -> None:
    """Embed the chunks `store` does not hold yet, saving each as soon as all its images are done."""
    todo = [k for k in range(plan.count) if k not in store.done]
    done_images = sum(len(plan.images(k)) for k in store.done)
    with progress_bar(progress, "embedding", len(files), completed=done_images) as bar, torch.inference_mode():
        pending: dict[int, _Chunk] = {}
        for batch in batches(files, runner.preprocess, num_workers=workers, fast=opts.fast,
                             limits=opts.limits, index_batches=plan.batches(todo),
                             pin_memory=opts.torch_device.type == "cuda", reuse_buffers=True):
            k = min(batch.indices + [i for i, _ in batch.failures]) // plan.size
            chunk = pending.setdefault(k, _Chunk())
            images = batch.stacked()  # a classifier's preprocessing crops: one size
            if images is not None:
                chunk.indices += batch.indices
                chunk.vectors.append(encoder(images).cpu().numpy())
            chunk.failures += batch.failures
            chunk.seen += len(batch.indices) + len(batch.failures)
            bar.advance(len(batch.indices) + len(batch.failures))
            if chunk.seen == len(plan.images(k)):
                store.save(k, pending.pop(k), encoder.dim)
    missing = [k for k in range(plan.count) if k not in store.done]
    if missing:  # the loader yields every position once; anything else is a bug, not a user error
        raise RuntimeError(f"embedding chunks {missing[:5]} were not completed")


class Encoder:
    """Batch -> (N, dim) vectors: pooled pre-logits, or a pooled stage; optionally L2-normalised."""

    def __init__(self, runner: Runner, layer: int | str | None, normalize: bool):
        self.runner, self.normalize = runner, normalize
        if layer is None:
            if runner.info.embedding_dim is None:  # (the runner's own refusal, before any image is decoded)
                raise InputError(f"{runner.arch} is a {runner.task.value} model: it has no embedding output")
            self.extractor, self.layer, self.dim = None, None, runner.info.embedding_dim
        else:
            if not isinstance(runner, TorchRunner):
                raise InputError(f"embedding a stage (layer={layer!r}) needs the torch backend; the "
                                 f"{runner.backend.value} backend gives the pooled pre-logits only")
            self.torch_runner = runner
            net = runner.net
            if not isinstance(net, ZooModel):  # (what FeatureExtractor would refuse)
                raise InputError(f"embedding a stage (layer={layer!r}) needs a classifier; {runner.arch} is a "
                                 f"{runner.task.value} model")
            index = resolve_stage(net, layer)
            self.extractor = FeatureExtractor(net, (index,))
            self.layer = net.feature_info[index].module
            self.dim = net.feature_info[index].num_chs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 6:  # (videos, clips, C, T, H, W): a video's vector is the mean of its clips'
            n, k = x.shape[:2]
            return self._normalized(self._vectors(x.flatten(0, 1)).view(n, k, -1).mean(dim=1))
        return self._normalized(self._vectors(x))

    def _normalized(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=1) if self.normalize else v

    def _vectors(self, x: torch.Tensor) -> torch.Tensor:
        if self.extractor is None:
            v = self.runner.embeddings(x)
        else:
            with torch.inference_mode():
                stage = self.extractor(self.torch_runner.prepare(x))[0]
                v = stage.mean(dim=tuple(range(2, stage.ndim)))  # over H, W (and T for a clip)
        return v.flatten(1).float()


def model_fingerprint(runner: Runner) -> dict:
    """What the resumable key records of the model: its weights (or file) and how it runs."""
    if isinstance(runner, TorchRunner):
        weights = weights_fingerprint(runner.net)
        kind = type(runner.net).__name__
    elif runner.path is not None:
        weights, kind = sha256_file(runner.path), runner.path.suffix
    else:
        raise InputError(f"this {runner.backend.value} runner has neither a torch model nor a model file to "
                         f"identify it by; embed with a model name, a bundle or a model file")
    return {"arch": runner.arch, "class": kind, "weights": weights, "backend": runner.backend.value,
            "precision": runner.precision.value}


@dataclass
class _Chunk:
    indices: list[int] = field(default_factory=list)  # positions of the embedded images
    vectors: list[np.ndarray] = field(default_factory=list)  # their vectors, in batches
    failures: list[tuple[int, str]] = field(default_factory=list)
    seen: int = 0


class _ChunkStore:
    """Completed chunks, in memory or (with a work folder) one `.npz` file each, saved atomically."""

    def __init__(self, folder: Path | None, key: dict | None, resume: bool):
        self.folder = folder
        self.memory: dict[int, _Chunk] = {}
        self.done: set[int] = set()
        if folder is None:
            return
        digest = json_digest(key)
        key_file = folder / "key.json"
        if folder.is_dir():
            try:
                same = json.loads(key_file.read_text())["digest"] == digest
            except (OSError, ValueError, KeyError):
                same = False
            if not (resume and same):
                log.warning("discarding the partial results in %s (%s)", folder,
                            "asked to start over" if not resume else "inputs, model or options changed")
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            with atomic_path(key_file) as tmp:
                tmp.write_text(json.dumps({"digest": digest, "key": key}, indent=1, sort_keys=True))
        for leftover in folder.glob(".*.part"):  # a chunk being written when the run was killed
            leftover.unlink(missing_ok=True)
        self.done = {int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.npz")}

    def _file(self, k: int) -> Path:
        assert self.folder is not None  # only chunks kept on disk have a file
        return self.folder / f"chunk-{k:06d}.npz"

    def save(self, k: int, chunk: _Chunk, dim: int) -> None:
        vectors = np.concatenate(chunk.vectors) if chunk.vectors else np.zeros((0, dim), np.float32)
        chunk.vectors = [vectors]
        if self.folder is None:
            self.memory[k] = chunk
        else:
            with atomic_path(self._file(k)) as tmp, open(tmp, "wb") as f:
                np.savez(f, indices=np.asarray(chunk.indices, np.int64), vectors=vectors,
                         failed=np.asarray([i for i, _ in chunk.failures], np.int64),
                         reasons=np.asarray([r for _, r in chunk.failures], dtype=str))
        self.done.add(k)

    def load(self, k: int) -> _Chunk:
        if self.folder is None:
            return self.memory[k]
        with np.load(self._file(k)) as z:
            return _Chunk(indices=z["indices"].tolist(), vectors=[z["vectors"]],
                          failures=list(zip(z["failed"].tolist(), z["reasons"].tolist(), strict=True)))

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.embed-work"


def _inputs_fingerprint(files: Iterable[Path]) -> str:
    """A digest of the paths, sizes and modification times: a changed file invalidates saved chunks."""
    h = hashlib.sha256()
    for p in files:
        try:
            st = p.stat()
            h.update(os.fsencode(p) + f"\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(os.fsencode(p) + b"\t-\n")
    return h.hexdigest()


def _output_format(out: Path) -> str:
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"{out}: unknown output format {out.suffix!r}; name the file .npy or .parquet")
    return fmt


def _write_npy(out: Path, chunks: list[_Chunk], kept: list[str], dim: int) -> None:
    # the sidecar first: a finished .npy always has its paths next to it
    remove_leftovers(sidecar_path(out))
    write_paths(sidecar_path(out), kept)
    legacy_sidecar_path(out).unlink(missing_ok=True)  # an earlier run's, which would describe another file
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        # streamed chunk by chunk: the whole array is never in memory
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                  "shape": (len(kept), dim)}
        np.lib.format.write_array_header_1_0(f, header)
        for c in chunks:
            for v in c.vectors:
                f.write(np.ascontiguousarray(v, dtype="<f4").tobytes())


def _write_parquet(out: Path, chunks: list[_Chunk], paths: list[str], dim: int, meta: dict) -> None:
    pa, pq = require("pyarrow"), require("pyarrow.parquet")
    schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
                       metadata={"visionzoo": json.dumps(meta)})
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        empty = True
        for c in chunks:
            vectors = np.concatenate(c.vectors) if c.vectors else np.zeros((0, dim), np.float32)
            if not len(c.indices):
                continue
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
            writer.write_table(pa.table([pa.array([paths[i] for i in c.indices], pa.string()), embedding],
                                        schema=schema))
            empty = False
        if empty:
            writer.write_table(schema.empty_table())
