"""`predict` and `embed` on a Ray cluster (or a local Ray instance): images in, a folder of Parquet files out.

    visionzoo embed photos/ --engine ray --out photos.parquet                 # a local Ray instance
    visionzoo embed s3://bucket/photos/ --engine ray --address auto --out s3://bucket/emb.parquet

The job is a Ray Data pipeline: the inputs (local files, folders, globs, lists and CSVs
expanded here as the local commands do, or any URI Ray's readers take, read by
`read_binary_files`), a decoding stage (`BatchDecoder`, CPU tasks), the model in an actor pool
(`BatchPredictor`, loaded once per actor), and `write_parquet` into the output folder: one row
per image (path, the outputs, error; see `distributed.py`), in no particular order.

Resumable: the output folder is the record of what is done. A rerun reads the `path` column of
the files already there and runs only the images without a row (a file cut short by a crash is
deleted first, and its images run again). The folder's `_visionzoo.json` names the model and the
options that shape the rows; a rerun with others is refused rather than mixing results. Ray
itself retries the tasks of a worker that dies mid-run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.images import IMAGE_EXTENSIONS
from ..data.inputs import Failure, expand_inputs
from ..errors import InputError
from ..fileutil import json_digest
from ..optional import require
from ..registry import DEFAULT_MODEL
from ..runtime.options import InferenceOptions
from .distributed import ERROR, PATH, BatchPredictor
from .embed import model_fingerprint

log = logging.getLogger("visionzoo")
MANIFEST = "_visionzoo.json"
FORMAT = "visionzoo.ray-output"
_FORMAT_VERSION = 1
MAX_BLOCK_ROWS = 2048  # images per block (a unit of retry and, mostly, one output file)
DECODING_WORKER_BYTES = 384 * 2**20  # Ray advises 1.3x the 260-340 MB measured
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class RayRun:
    """What a run did: the output folder, its rows, and what failed."""

    out: str
    rows: int  # rows in the output folder now (images done, this run or before)
    added: int  # rows this run wrote
    resumed: int  # images skipped because they already had a row
    errors: list[Failure] = field(default_factory=list)  # the error rows this run wrote
    failures: list[Failure] = field(default_factory=list)  # inputs that matched no file (no row)


def is_uri(text: str) -> bool:
    """`s3://...`, `gs://...`, `file://...`: a location for Ray's readers rather than a local path."""
    return bool(_URI.match(text))


def run_on_ray(inputs: Sequence[str | os.PathLike] | str | os.PathLike, model: str | os.PathLike | Any = DEFAULT_MODEL,
               *, out: str | os.PathLike, embed: bool = False, topk: int = 5, layer: int | str | None = None,
               normalize: bool = False, address: str | None = None, workers: int | None = None,
               restart: bool = False, progress: bool = False, block_rows: int | None = None,
               options: InferenceOptions | None = None, **settings: Any) -> RayRun:
    """Predict (or, with `embed`, embed) images on Ray, writing Parquet files into the folder `out`.

    Args:
        inputs: files, folders, globs, `@LIST` files, CSV datasets, or URIs (`s3://bucket/photos/`).
        model: as for `predict`; on a cluster, a name or a path every worker sees.
        out: the output folder (`DIR.parquet`, local or a URI); a rerun fills in the missing rows.
        address: the cluster (`auto`, `ray://host:10001`, ...); None: Ray's default, which starts
            a local instance (or joins the one `RAY_ADDRESS` names). An instance already
            initialised in this process is used as it is.
        workers: model actors (each loads the model once); None: from 1 up to half the cluster's
            CPUs (or one per GPU), as the load asks.
        restart: delete the rows already in `out` and start over.
        progress: show Ray's progress bars.
        block_rows: images per block (default: a few blocks per CPU, at most `MAX_BLOCK_ROWS`).
        options: `InferenceOptions` (or its fields as keywords): `batch_size` per model call,
            `threads` per actor (its CPUs), `device` (`cuda`: one GPU per actor), `backend`,
            `precision`, `fast`, `max_pixels`.
    """
    ray = require("ray")
    require("ray.data")
    pa = require("pyarrow")
    opts = InferenceOptions.of(options, **settings)
    if workers is not None and workers < 1:
        raise InputError(f"workers (model actors on Ray) must be >= 1, got {workers}")
    if block_rows is not None and block_rows < 1:
        raise InputError(f"block_rows must be >= 1, got {block_rows}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    model = _absolute(model)
    folder = OutputFolder(os.fspath(out))
    # the model is opened here too: a bad name or option fails now, in one line, not in every actor
    predictor = BatchPredictor(model, embed=embed, topk=topk, layer=layer, normalize=normalize, options=opts)
    manifest = _manifest(predictor)
    done = folder.prepare(manifest, restart)

    texts = [os.fspath(i) for i in inputs]
    uris = [t for t in texts if is_uri(t)]
    files, failures = expand_inputs([t for t in texts if not is_uri(t)]) if len(uris) < len(texts) else ([], [])
    paths = [os.path.abspath(f) for f in files]
    todo = [p for p in paths if p not in done]
    resumed = len(paths) - len(todo)
    if resumed:
        log.warning("resuming: %d of %d images already have a row in %s", resumed, len(paths), folder.uri)
    if not todo and not uris:
        return RayRun(folder.uri, len(done), 0, resumed, failures=failures)

    if address is not None and not is_uri(folder.uri):
        log.warning("%s is a local folder: on a cluster each worker writes its rows to its own machine's disk "
                    "unless the folder is a shared mount (or give --out s3://...)", folder.uri)
    started = not ray.is_initialized()
    if started:
        _init(ray, address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.print_on_execution_start = progress
        if not progress:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        parts = []
        if todo:
            rows = block_rows or _block_rows(len(todo), opts.batch_size, cpus)
            parts.append(ray.data.from_arrow([pa.table({PATH: pa.array(todo[s:s + rows], pa.string())})
                                              for s in range(0, len(todo), rows)]))
        if uris:
            remote = ray.data.read_binary_files(uris, include_paths=True,
                                                file_extensions=sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
            parts.append(remote.map_batches(DropDone(frozenset(done))) if done else remote)
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ds = ds.map_batches(predictor.decoder(), batch_size=opts.batch_size, num_cpus=1,
                            memory=_decoding_memory(predictor, opts.batch_size))
        ds = ds.map_batches(BatchPredictor, fn_constructor_kwargs=predictor.kwargs, batch_size=opts.batch_size,
                            **_actor_args(ray, opts, workers, cpus))
        ds.write_parquet(folder.uri, filesystem=folder.fs)
    finally:
        if started:
            ray.shutdown()
    rows_now = folder.read_rows()
    errors = [Failure(p, e) for p, e in rows_now if e is not None and p not in done]
    return RayRun(folder.uri, len(rows_now), len(rows_now) - len(done), resumed, errors, failures)


def _init(ray: Any, address: str | None) -> None:
    """Join `address` or start a local instance; a local one runs this visionzoo (its source folder
    on the workers' path, so a checkout that is not installed works too)."""
    env = {}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": env} if env else None)


def _decoding_memory(predictor: BatchPredictor, batch_size: int) -> int:
    """Bytes a decoding task holds: its worker process (torch imported: 260 to 340 MB measured) and a
    batch of preprocessed images, about three times over (the decoded image, its tensor, the
    batch). Reserving them also gives decoding other resources than the model's actors, which
    keeps Ray from fusing the two stages into the actors, where each would wait for the other."""
    side = predictor.runner.preprocess.crop_size or predictor.runner.info.input_size
    if side is None:  # the predictor takes classifiers only (task_columns), which crop
        raise RuntimeError(f"{predictor.runner.arch}: a classifier without a crop or input size")
    return DECODING_WORKER_BYTES + 3 * batch_size * 3 * side * side * 4


def _actor_args(ray: Any, opts: InferenceOptions, workers: int | None, cpus: int) -> dict[str, Any]:
    """The actor pool: `threads` CPUs (or a GPU) per actor; `workers` actors, or autoscaled. (Ray
    restarts an actor pool's dead actors and retries their batches without end, by default.)"""
    actor_cpus = opts.threads or 1
    args: dict[str, Any] = {"num_cpus": actor_cpus}
    if opts.torch_device.type == "cuda":
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:
            raise InputError(f"device {opts.device} asks for GPUs but the Ray cluster has none; use --device cpu")
        args["num_gpus"], most = 1, gpus
    else:
        most = max(1, cpus // actor_cpus // 2)
    pool = ray.data.ActorPoolStrategy(size=workers) if workers else ray.data.ActorPoolStrategy(min_size=1,
                                                                                              max_size=most)
    return {"compute": pool, **args}


def _block_rows(n: int, batch_size: int, cpus: int) -> int:
    """A few blocks per CPU for parallelism, whole batches, at most `MAX_BLOCK_ROWS` per block."""
    rows = math.ceil(n / (4 * cpus) / batch_size) * batch_size
    return max(batch_size, min(rows, MAX_BLOCK_ROWS))


def _absolute(model: Any) -> Any:
    """A local model path as an absolute one: workers need not share this process's folder."""
    if isinstance(model, (str, os.PathLike)) and not is_uri(os.fspath(model)):
        path = Path(model).expanduser()
        if path.exists():
            return str(path.resolve())
    return model


def _manifest(predictor: BatchPredictor) -> dict[str, Any]:
    """Everything that shapes a row: rows are only ever added under the same manifest."""
    kw, opts = predictor.kwargs, predictor.options
    shape = {"layer": kw["layer"], "normalize": kw["normalize"]} if kw["embed"] else {"topk": kw["topk"]}
    return {"format": FORMAT, "version": _FORMAT_VERSION, "embed": kw["embed"], **shape,
            "schema": str(predictor.schema), "model": model_fingerprint(predictor.runner),
            "preprocess": predictor.runner.preprocess.to_dict(), "fast": opts.fast, "max_pixels": opts.max_pixels}


@dataclass(frozen=True)
class DropDone:
    """Batch -> the rows whose `path` is not in `done` (a resumed read of URIs)."""

    done: frozenset[str]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        keep = np.asarray([str(p) not in self.done for p in batch[PATH]], dtype=bool)
        return {name: column[keep] for name, column in batch.items()}


class OutputFolder:
    """The output folder (local or a URI): its Parquet files, its manifest, the rows it holds."""

    def __init__(self, out: str):
        pafs = require("pyarrow.fs")
        if is_uri(out):
            self.fs, self.path = pafs.FileSystem.from_uri(out)
            self.uri = out
        else:
            self.fs, self.path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(out))
            self.uri = self.path
        self._pafs = pafs
        if self.fs.get_file_info(self.path).type == pafs.FileType.File:
            raise InputError(f"{out} is a file; --engine ray writes a folder of Parquet files: name a folder "
                             f"(such as {Path(self.path).stem}-ray.parquet)")

    def files(self) -> list[str]:
        selector = self._pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return sorted(i.path for i in self.fs.get_file_info(selector)
                      if i.type == self._pafs.FileType.File and i.path.endswith(".parquet"))

    def prepare(self, manifest: dict[str, Any], restart: bool) -> set[str]:
        """Make the folder ready for `manifest`'s rows; the paths that already have one."""
        files = self.files()
        if restart:
            for f in files:
                self.fs.delete_file(f)
            files = []
        found = self._read_manifest()
        digest = json_digest(manifest)
        if files and (found is None or found.get("digest") != digest):
            what = "no visionzoo manifest" if found is None else "rows of another model or options"
            raise InputError(f"{self.uri} holds {what} ({MANIFEST}); choose another output folder, or restart "
                             f"(--restart) to replace them")
        if found is None or found.get("digest") != digest:
            self.fs.create_dir(self.path, recursive=True)
            tmp = f"{self.path}/.{MANIFEST}.part"
            with self.fs.open_output_stream(tmp) as f:
                f.write(json.dumps({"digest": digest, "manifest": manifest}, indent=1, sort_keys=True).encode())
            self.fs.move(tmp, f"{self.path}/{MANIFEST}")
        return {p for p, _ in self.read_rows()}

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(f"{self.path}/{MANIFEST}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def read_rows(self) -> list[tuple[str, str | None]]:
        """(path, error) of every row; a file that cannot be read (a write cut short) is deleted,
        so that its images run again. A path written twice (a task retried) counts once."""
        pq = require("pyarrow.parquet")
        rows: dict[str, str | None] = {}
        for f in self.files():
            try:
                table = pq.read_table(f, columns=[PATH, ERROR], filesystem=self.fs)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                log.warning("%s: unreadable (%s); deleting it, its images will run again", f, e)
                self.fs.delete_file(f)
                continue
            for path, error in zip(table.column(PATH).to_pylist(), table.column(ERROR).to_pylist(), strict=True):
                rows.setdefault(path, error)
        return list(rows.items())
