"""Training data: the stratified split, augmentation, and batches whose order and randomness
are a function of (seed, epoch) alone.

That last property is what makes `--resume` exact: a run restarted at epoch e draws the
same permutation and the same crops as the uninterrupted run, whatever happened before,
however many DataLoader workers decode the images and whichever worker gets which image.
The sampler yields `(index, seed)` keys, and the dataset draws each image's crop from a
generator seeded with that key's seed (`sample_seed(seed, epoch, index)`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data.images import DEFAULT_LIMITS, DecodeLimits, load_image
from ..data.loader import available_cpus, fix_mmap_threshold
from ..data.transforms import Interpolation, to_normalized_tensor
from ..errors import InputError
from ..weights.records import Preprocess
from .distributed import Dist


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, epoch, pass, index, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): `val_fraction` of each class held out, chosen by `seed`.

    Every class with at least two images keeps at least one in each part.
    """
    labels = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def training_preprocess(base: Preprocess, image_size: int | None) -> Preprocess:
    """The weights' evaluation recipe, scaled to another crop size (same resize/crop ratio)."""
    if image_size is None or image_size == base.crop:
        return base
    resize = int(round(image_size * (base.resize_size or base.crop) / base.crop))
    return Preprocess(resize, image_size, base.interpolation, base.mean, base.std)


@dataclass(frozen=True)
class Augment:
    """Random resized crop (and optional horizontal flip) drawn from an explicit generator."""

    preprocess: Preprocess  # output size, interpolation and normalisation
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False

    def __call__(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        p = self.preprocess
        w, h = img.size
        box = self._box(w, h, g)
        size = p.crop
        img = img.resize((size, size), Interpolation(p.interpolation).pil, box=box)
        if self.hflip and torch.rand((), generator=g).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img, p.mean, p.std)

    def _box(self, w: int, h: int, g: torch.Generator) -> tuple[float, float, float, float]:
        area = w * h
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
            cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
            if cw <= w and ch <= h:
                v = torch.rand(2, generator=g, dtype=torch.float64).tolist()
                left, top = v[0] * (w - cw), v[1] * (h - ch)
                return left, top, left + cw, top + ch
        # no crop of the wanted shape fits: the largest centred square-ish crop
        side = min(w, h)
        return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


class KeyedSamples(Dataset):
    """A run's samples read by key `(index, seed)` (see `EpochSampler`): the list, the decode limits
    its files were checked against, and its length. The task's datasets add how a sample is read."""

    def __init__(self, samples: Sequence[tuple], limits: DecodeLimits = DEFAULT_LIMITS):
        self.samples = list(samples)
        self.limits = limits

    def __len__(self) -> int:
        return len(self.samples)


class KeyedImages(KeyedSamples):
    """`(index, seed)` -> (image tensor, label): the augmented view for that seed, or the
    evaluation view when the seed is None. Images are decoded within `limits`."""

    def __init__(self, samples: Sequence[tuple], preprocess: Preprocess, augment: Augment | None,
                 limits: DecodeLimits = DEFAULT_LIMITS):
        # the limits' max_resized_pixels does not apply: only the crop's area is ever resized
        super().__init__(samples, limits)
        self.eval_transform = preprocess.transforms()
        self.augment = augment

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, label = self.samples[index]
        img = load_image(path, limits=self.limits)
        if seed is None or self.augment is None:
            return self.eval_transform(img), label
        return self.augment(img, torch.Generator().manual_seed(seed)), label


class EpochSampler(Sampler):
    """This process's share of one epoch as `(index, seed)` keys.

    The order is `DistributedSampler`'s (a permutation seeded with seed + epoch, padded to a
    multiple of the number of processes and dealt out), so every process runs the same
    number of steps; each key's augmentation seed depends on (seed, epoch, index).
    """

    def __init__(self, n: int, dist: Dist, seed: int, shuffle: bool = True, augment: bool = True):
        # torch's stubs want a Dataset; the sampler only takes its len(), which a range of the indices has
        self.inner: DistributedSampler[int] = DistributedSampler(
            range(n), num_replicas=dist.world, rank=dist.rank,  # type: ignore[arg-type]
            shuffle=shuffle, seed=seed, drop_last=False)
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        for i in self.inner:
            yield i, (sample_seed(self.seed, self.epoch, i) if self.augment else None)


class ShardKeys(Sampler):
    """Indices `rank::world` (no padding) with a fixed seed per index, or None: the keys for
    computing features or validation outputs once, shared out between processes."""

    def __init__(self, n: int, dist: Dist, seed_parts: tuple[int, ...] | None):
        self.indices = list(range(dist.rank, n, dist.world))
        self.seed_parts = seed_parts

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        for i in self.indices:
            yield i, (None if self.seed_parts is None else sample_seed(*self.seed_parts, i))


def default_workers(requested: int | None) -> int:
    """Decoding processes: as asked, else one per core beyond the one that trains (at most 4)."""
    if requested is not None:
        return requested
    return max(0, min(available_cpus() - 1, 4))


def loader(dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int, device: torch.device
           ) -> DataLoader:
    # Persistent workers keep their copy of the dataset between epochs; that is safe here
    # because everything random arrives with the keys, not from the workers' state. The
    # loader's own generator keeps it from drawing its workers' base seed from the global
    # one: a resumed run creates its iterator an epoch later, which would shift dropout's draws.
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=device.type == "cuda",
                      generator=torch.Generator(), worker_init_fn=fix_mmap_threshold if num_workers else None)


def check_classes(train_targets: Sequence[int], num_classes: int, classes: Sequence[str]) -> None:
    counts = np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=num_classes)
    empty = [classes[int(i)] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise InputError(f"no training images for class{'es' if len(empty) > 1 else ''} "
                         f"{', '.join(empty[:5])}; add images or remove the class folder")
    if num_classes < 2:
        raise InputError("fine-tuning needs at least two classes; add class folders")
