"""Batches of preprocessed images from a list of files: the pipeline behind predict and embed.

Files are decoded and preprocessed in DataLoader worker processes (in parallel, and
overlapping with inference in the main process), each bad file turning into a reason
instead of an exception, and batches come back in input order. Memory stays bounded:
only the batches the workers prefetch are held, whatever the number of files.

The fast path (`fast=True`) decodes large JPEGs at a reduced scale before the exact
resize (see `images.load_image`); `fast=False` is the exact path, identical to
torchvision's preprocessing of a full decode.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

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
    images: torch.Tensor | None  # (len(indices), C, H, W); None when every file of the batch failed
    failures: list[tuple[int, str]]  # (position, reason) of the files of the batch that failed
    reduced: list[int] = field(default_factory=list)  # positions of the images decoded at a reduced scale


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
    """Position i -> (i, preprocessed tensor, None, reduced), or (i, None, reason, False) for a bad file;
    `reduced`: the image was decoded at a reduced scale (the fast path)."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform, *, limits: DecodeLimits = DEFAULT_LIMITS,
                 reduce_to: int | None = None, resize_to: int | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.limits = limits
        self.reduce_to = reduce_to
        self.resize_to = resize_to

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return (i, *prepare_image(self.paths[i], self.transform, limits=self.limits, reduce_to=self.reduce_to,
                                  resize_to=self.resize_to))


def _collate(items) -> ImageBatch:
    good = [(i, x) for i, x, _, _ in items if x is not None]
    return ImageBatch(indices=[i for i, _ in good],
                      images=torch.stack([x for _, x in good]) if good else None,
                      failures=[(i, reason) for i, _, reason, _ in items if reason is not None],
                      reduced=[i for i, _, _, reduced in items if reduced])


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
    """Decoding workers when none are asked for: one core is left to inference, and a single
    batch is decoded in-process (starting a worker would cost more than it saves)."""
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
                  pin_memory: bool = False) -> Iterator[ImageBatch]:
    """Yield the files of `paths` decoded and preprocessed with `preprocess` (a `Preprocess`).

    Args:
        batch_size: images per batch (when `index_batches` is not given).
        num_workers: decoding processes; None picks `default_num_workers`; 0 decodes in
            the calling process.
        fast: decode large JPEGs at a reduced scale (see `load_image(reduce_to=)`).
        limits: the decode budget of each image (`DecodeLimits`); a file over it is a failure.
        max_pixels: without `limits`, refuse images with more pixels (decompression bombs);
            None: no limit.
        index_batches: the positions of each batch, when the caller needs a given grouping
            (embed aligns batches with its resumable chunks).
        pin_memory: page-lock batches for a faster copy to a GPU.
    """
    check_at_least("batch_size", batch_size, 1)
    check_at_least("num_workers", num_workers, 0, optional=True)
    if limits is None:
        check_at_least("max_pixels", max_pixels, 1, optional=True, note=" (or None for no limit)")
        limits = DEFAULT_LIMITS if max_pixels == DEFAULT_MAX_PIXELS else DecodeLimits(max_pixels=max_pixels)
    if index_batches is None:
        index_batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    index_lists = [list(b) for b in index_batches if len(b)]
    if not index_lists:
        return
    if num_workers is None:
        num_workers = default_num_workers(len(index_lists))
    dataset = ImageFiles(paths, preprocess.transforms(), limits=limits, reduce_to=reduce_target(preprocess, fast),
                         resize_to=preprocess.resize_size)
    loader = DataLoader(dataset, batch_sampler=index_lists, num_workers=num_workers,
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
        batches = iter(loader)  # starts the workers
    finally:
        gc.unfreeze()
    yield from batches
