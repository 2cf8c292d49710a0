"""Batches of preprocessed images from a list of files: the pipeline behind predict and embed.

Files are decoded and preprocessed in worker processes (in parallel, and overlapping with
inference in the main process), each bad file turning into a reason instead of an
exception, and batches come back in input order. Memory stays bounded: only the batches
the workers prefetch are held, whatever the number of files.

For recipes with a fixed input size (a crop: every classifier) the workers write straight
into a ring of batch buffers in shared memory (`_SharedPipeline`): no tensor is pickled or
copied between processes, and the main process, which runs the model, decodes images
itself whenever the next batch is not ready, so that `workers` processes plus the model's
threads can add up to the cores without any of them idling (`runtime/machine.py:
split_cores`). Other recipes (no crop: image sizes vary) go through a torch DataLoader.

The fast path (`fast=True`) decodes large JPEGs at a reduced scale before the exact
resize (see `images.load_image`); `fast=False` is the exact path, identical to
torchvision's preprocessing of a full decode.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import signal
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageError, check_at_least
from .images import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_PIXELS,
    DecodeLimits,
    decode_image,
    draft_info,
    image_from_array,
    load_image,
)

MAX_AUTO_WORKERS = 8
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@dataclass
class ImageBatch:
    indices: list[int]  # positions (in the input list) of the images in `images`, ascending
    # (len(indices), C, H, W); a list of (C, H, W) tensors when their sizes differ (no crop: segmentation);
    # None when every file of the batch failed
    images: torch.Tensor | list[torch.Tensor] | None
    failures: list[tuple[int, str]]  # (position, reason) of the files of the batch that failed
    reduced: list[int] = field(default_factory=list)  # positions of the images decoded at a reduced scale
    extras: list[Any] = field(default_factory=list)  # with `extra=`: what it returned for each image of `images`

    def stacked(self) -> torch.Tensor | None:
        """`images` as one (N, C, H, W) tensor (None when every file failed), for the callers whose
        preprocessing crops, so that every image has the same size."""
        if isinstance(self.images, list):
            raise RuntimeError("a batch of images of different sizes cannot be stacked: this path needs a "
                               "preprocessing with a crop")
        return self.images


ImageSource = str | os.PathLike | bytes | np.ndarray  # a file, its encoded bytes, or decoded pixels


def prepare_image(source: ImageSource, transform, *, name: str | os.PathLike | None = None,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, limits: DecodeLimits | None = None,
                  reduce_to: int | None = None,
                  resize_to: int | None = None) -> tuple[torch.Tensor | None, str | None, bool]:
    """Decode and preprocess one image: (tensor, None, reduced), or (None, reason, False) for a bad
    one. The one per-image step of predict, embed and the distributed predictor.

    `source` is a path, the file's encoded bytes (decoded as the file would be) or decoded
    pixels (`image_from_array`); `name` stands for it in error messages. `limits` is the decode
    budget (default: `DecodeLimits(max_pixels=max_pixels)`), `resize_to` the shorter side the
    transform resizes to (for its resize limit; default `reduce_to`). `reduced`: the image
    was decoded at a reduced scale (the fast path, `reduce_to`)."""
    label = name if name is not None else "<bytes>" if isinstance(source, bytes) else "<array>"
    resize_to = resize_to if resize_to is not None else reduce_to
    try:
        if isinstance(source, bytes):
            img = decode_image(source, label, limits=limits, max_pixels=max_pixels, reduce_to=reduce_to,
                               resize_to=resize_to)
        elif isinstance(source, np.ndarray):
            img = image_from_array(source, label, limits=limits, resize_to=resize_to)
        else:
            img = load_image(source, limits=limits, max_pixels=max_pixels, reduce_to=reduce_to, resize_to=resize_to)
        return transform(img), None, draft_info(img) is not None
    except ImageError as e:
        return None, e.reason, False
    except MemoryError:  # the budget should have refused it; one image must never end the run
        return None, "not enough memory to preprocess it; lower the decode limits (--decode-limits)", False


class ImageFiles(Dataset):
    """Position i -> (i, preprocessed tensor, None, reduced, extra), or (i, None, reason, False, None) for a
    bad file; `reduced`: the image was decoded at a reduced scale (the fast path); `extra`: what the
    `extra` callable made of the decoded image (None without one)."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform, *, limits: DecodeLimits = DEFAULT_LIMITS,
                 reduce_to: int | None = None, resize_to: int | None = None,
                 extra: Callable[[Any], Any] | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.limits = limits
        self.reduce_to = reduce_to
        self.resize_to = resize_to
        self.extra = extra

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        extras: list[Any] = []

        def transform(img):  # the extra is made from the decoded image, which only the transform is given
            if self.extra is not None:
                extras.append(self.extra(img))
            return self.transform(img)

        x, reason, reduced = prepare_image(self.paths[i], transform, limits=self.limits, reduce_to=self.reduce_to,
                                           resize_to=self.resize_to)
        return i, x, reason, reduced, extras[0] if extras and x is not None else None


def _collate(items) -> ImageBatch:
    good = [(i, x, extra) for i, x, _, _, extra in items if x is not None]
    tensors = [x for _, x, _ in good]
    if tensors and any(x.shape != tensors[0].shape for x in tensors):
        images: torch.Tensor | list[torch.Tensor] | None = tensors
    else:
        images = torch.stack(tensors) if tensors else None
    return ImageBatch(indices=[i for i, _, _ in good], images=images,
                      failures=[(i, reason) for i, _, reason, _, _ in items if reason is not None],
                      reduced=[i for i, _, _, reduced, _ in items if reduced],
                      extras=[extra for _, _, extra in good])


class _SharedPipeline:
    """Batches of fixed-shape images decoded by `workers` processes and the main process into a
    ring of `RING` shared batch buffers; iterate it for the `ImageBatch`es, in order.

    The work is a list of tasks (a few consecutive images of one batch). Whoever is free takes
    the next task (a shared counter under a lock) and fills those rows of the batch's buffer;
    a task may start only when its batch's buffer is free, so at most `RING` batches are in
    memory. The main process takes tasks too while it waits for the batch it needs: with one
    worker on two cores, the main process runs the model and decodes in the gaps."""

    RING = 3  # batch buffers: the one being used, and two being filled
    TASK_IMAGES = 4  # images per task: small enough that the main process soon returns to the model
    WAIT_S = 5.0  # how often a waiting main process checks that the workers are alive

    def __init__(self, dataset: ImageFiles, batches: list[list[int]], shape: tuple[int, int, int], workers: int):
        self.dataset, self.batches = dataset, batches
        width = max(len(b) for b in batches)
        step = max(1, min(self.TASK_IMAGES, -(-width // (2 * (workers + 1)))))
        self.tasks = [(b, start, min(start + step, len(rows))) for b, rows in enumerate(batches)
                      for start in range(0, len(rows), step)]
        self.ring_size = min(self.RING if workers else 1, len(batches))
        ctx = mp.get_context("fork")
        self.ring = torch.empty((self.ring_size, width, *shape)).share_memory_()
        self.status = torch.zeros((self.ring_size, width), dtype=torch.int8).share_memory_()
        self.cond = ctx.Condition()
        self.next_task = ctx.Value("q", 0, lock=False)  # guarded by `cond`
        self.released = ctx.Value("q", 0, lock=False)  # batches handed out and done with
        self.workers = min(workers, len(self.tasks))
        self.ctx = ctx
        self.parent = os.getpid()
        self.procs: list = []
        self.readers: list = []

    # status codes of a row of the ring
    OK, REDUCED, FAILED = 1, 2, 3

    def take(self, wait: bool) -> int | None:
        """The next task whose batch buffer is free, or None: none left (or, without `wait`, none free now)."""
        with self.cond:
            while True:
                k = self.next_task.value
                if k >= len(self.tasks):
                    return None
                if self.tasks[k][0] < self.released.value + self.ring_size:
                    self.next_task.value = k + 1
                    return k
                if not wait:
                    return None
                self.cond.wait(1.0)
                if os.getppid() != self.parent:  # the main process is gone (killed): stop too
                    return None

    def fill(self, k: int) -> list[tuple[int, str]]:
        """Decode task `k` into its rows of the ring; returns (row, reason) of the files that failed."""
        b, start, stop = self.tasks[k]
        slot, failures = b % self.ring_size, []
        for row in range(start, stop):
            _, x, reason, reduced, _ = self.dataset[self.batches[b][row]]
            if x is None:
                self.status[slot, row] = self.FAILED
                failures.append((row, reason))
            else:
                self.ring[slot, row].copy_(x)
                self.status[slot, row] = self.REDUCED if reduced else self.OK
        return failures

    def _work(self, writer) -> None:
        """A worker process: take tasks until none is left; report each one (or the error that stopped it)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
        torch.set_num_threads(1)
        fix_mmap_threshold(0)
        try:
            while (k := self.take(wait=True)) is not None:
                writer.send((k, self.fill(k), None))
        except BaseException:  # noqa: BLE001  (any failure: the main process raises it)
            writer.send((-1, [], traceback.format_exc()))
            raise

    def _start(self) -> None:
        # Forked workers share the parent's memory copy-on-write; the garbage collector walking the
        # parent's objects in a worker would touch, and so copy, their pages one by one. Frozen
        # objects are never walked, so the workers stay small; the parent unfreezes right after forking.
        gc.freeze()
        try:
            for _ in range(self.workers):
                reader, writer = self.ctx.Pipe(duplex=False)
                proc = self.ctx.Process(target=self._work, args=(writer,), daemon=True)
                proc.start()
                writer.close()
                self.procs.append(proc)
                self.readers.append(reader)
        finally:
            gc.unfreeze()

    def _stop(self) -> None:
        with self.cond:
            self.next_task.value = len(self.tasks)  # nothing more to take
            self.released.value = len(self.batches)
            self.cond.notify_all()
        for proc in self.procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for reader in self.readers:
            reader.close()

    def __iter__(self) -> Iterator[ImageBatch]:
        remaining = Counter(b for b, _, _ in self.tasks)
        failures: dict[int, list[tuple[int, str]]] = {b: [] for b in range(len(self.batches))}

        def done(k: int, failed: list[tuple[int, str]]) -> None:
            b = self.tasks[k][0]
            remaining[b] -= 1
            failures[b] += failed

        self._start()
        try:
            for b in range(len(self.batches)):
                while remaining[b] > 0:
                    ready: list[Any] = wait(self.readers, timeout=0)
                    if not ready:
                        k = self.take(wait=False)
                        if k is not None:  # nothing to collect: decode something here
                            with one_torch_thread():
                                done(k, self.fill(k))
                            continue
                        ready = self._wait_for_workers()
                    for reader in ready:
                        try:
                            k, failed, error = reader.recv()
                        except EOFError:  # the worker has finished: no task left for it
                            self.readers.remove(reader)
                            continue
                        if error is not None:
                            raise RuntimeError(f"a decoding worker failed:\n{error}")
                        done(k, failed)
                yield self._batch(b, failures.pop(b))
                with self.cond:
                    self.released.value = b + 1
                    self.cond.notify_all()
        finally:
            self._stop()

    def _wait_for_workers(self) -> list[Any]:
        while True:
            ready = wait(self.readers, timeout=self.WAIT_S)
            if ready:
                return ready
            dead = [p.exitcode for p in self.procs if p.exitcode not in (None, 0)]
            if dead or not any(p.is_alive() for p in self.procs):
                raise RuntimeError(f"a decoding worker exited unexpectedly (exit code {dead[0] if dead else 0}); "
                                   f"if it was killed for memory, use fewer workers (--workers) or a smaller batch")

    def _batch(self, b: int, failed: list[tuple[int, str]]) -> ImageBatch:
        rows = self.batches[b]
        slot = b % self.ring_size
        status = self.status[slot, :len(rows)].tolist()
        good = [r for r, st in enumerate(status) if st in (self.OK, self.REDUCED)]
        if len(good) == len(rows):
            images: torch.Tensor | None = self.ring[slot, :len(rows)]
        else:
            images = self.ring[slot, good] if good else None  # a copy without the failed rows
        return ImageBatch(indices=[rows[r] for r in good], images=images,
                          failures=[(rows[r], reason) for r, reason in sorted(failed)],
                          reduced=[rows[r] for r in good if status[r] == self.REDUCED])


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's operations in the calling thread only, for a while. The preprocessing's tensor
    operations are small: split across the model's threads they gain nothing, and those threads
    then spin, waiting for more work, on the cores the decoding workers need."""
    saved = torch.get_num_threads()
    if saved == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def fix_mmap_threshold(worker_id: int) -> None:
    """DataLoader worker start: large buffers (decoded images, preprocessed tensors, batches)
    always get their own memory mapping, returned to the system when freed.

    glibc raises its mmap threshold each time such a buffer is freed, after which the
    buffers come from the heap, where the mix of sizes fragments it: a decoding worker's
    peak memory then grew by about 18 KB per image, without bound (measured over 4,000
    JPEGs, 253 -> 281 MB); with the threshold fixed it stays flat (215 MB). No-op elsewhere."""
    del worker_id
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_num_workers(num_batches: int) -> int:
    """Decoding workers when none are asked for: one core is left to the calling process (which
    decodes too while it waits), and a single batch is decoded in-process (starting a worker
    would cost more than it saves)."""
    if num_batches <= 1:
        return 0
    return max(1, min(available_cpus() - 1, MAX_AUTO_WORKERS, num_batches))


def reduce_target(preprocess, fast: bool) -> int | None:
    """The `reduce_to` of the fast path for a recipe: its resize size (None: the exact path)."""
    return preprocess.resize_size if fast else None


def image_batches(paths: Sequence[str | os.PathLike], preprocess, *, batch_size: int = 32,
                  num_workers: int | None = None, fast: bool = True,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, limits: DecodeLimits | None = None,
                  index_batches: Sequence[Sequence[int]] | None = None,
                  pin_memory: bool = False, reuse_buffers: bool = False,
                  extra: Callable[[Any], Any] | None = None) -> Iterator[ImageBatch]:
    """Yield the files of `paths` decoded and preprocessed with `preprocess` (a `Preprocess`).

    Args:
        batch_size: images per batch (when `index_batches` is not given).
        num_workers: decoding processes (the calling process decodes too, while it waits);
            None picks `default_num_workers`; 0 decodes in the calling process only.
        fast: decode large JPEGs at a reduced scale (see `load_image(reduce_to=)`).
        limits: the decode budget of each image (`DecodeLimits`); a file over it is a failure.
        max_pixels: without `limits`, refuse images with more pixels (decompression bombs);
            None: no limit.
        index_batches: the positions of each batch, when the caller needs a given grouping
            (embed aligns batches with its resumable chunks).
        pin_memory: page-lock batches for a faster copy to a GPU.
        reuse_buffers: a batch's `images` may be a view of a shared buffer that is refilled once
            the next batch is asked for (no copy per batch); for callers that are done with a
            batch by then. False: every batch owns its tensor.
        extra: called (in the worker) on each decoded PIL image; its results come back in
            `ImageBatch.extras` (what a task needs besides the model's input: the image's size,
            a thumbnail to draw on).
    """
    check_at_least("batch_size", batch_size, 1)
    check_at_least("num_workers", num_workers, 0, optional=True)
    if limits is None:
        check_at_least("max_pixels", max_pixels, 1, optional=True, note=" (or None for no limit)")
        limits = DEFAULT_LIMITS if max_pixels == DEFAULT_MAX_PIXELS else DecodeLimits(max_pixels=max_pixels)
    if index_batches is None:
        index_batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    batches = [list(b) for b in index_batches if len(b)]
    if not batches:
        return
    if num_workers is None:
        num_workers = default_num_workers(len(batches))
    dataset = ImageFiles(paths, preprocess.transforms(), limits=limits, reduce_to=reduce_target(preprocess, fast),
                         resize_to=preprocess.resize_size, extra=extra)
    if preprocess.crop_size is not None and extra is None and "fork" in mp.get_all_start_methods():
        pipeline = _SharedPipeline(dataset, batches, (3, preprocess.crop_size, preprocess.crop_size),
                                   num_workers)
        for batch in pipeline:
            images = batch.stacked()  # the shared buffer holds one size: (C, crop, crop)
            if pin_memory and images is not None:
                batch.images = images.pin_memory()
            elif not reuse_buffers and images is not None:
                batch.images = images.clone()
            yield batch
        return
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=pin_memory,
                        worker_init_fn=fix_mmap_threshold if num_workers else None)
    if num_workers == 0:
        yield from loader
        return
    # Forked workers share the parent's memory copy-on-write; the garbage collector walking the
    # parent's objects in a worker would touch, and so copy, their pages one by one. Frozen
    # objects are never walked, so the workers stay small; the parent unfreezes right after forking.
    gc.freeze()
    try:
        started = iter(loader)  # starts the workers
    finally:
        gc.unfreeze()
    yield from started
