"""Labelled image datasets: an ImageFolder-style tree or a CSV of `path,label` rows.

    ds = ImageDataset.from_folder("pets/train", transform=model.preprocess.transforms())
    ds.classes            # ['cat', 'dog']: sub-folder names, sorted
    ds.samples[0]         # (Path('pets/train/cat/001.jpg'), 0)
    x, y = ds[0]          # (CHW tensor, 0)

    ds = ImageDataset.from_csv("labels.csv")   # header row with `path` and `label` columns

Both are torch `Dataset`s returning `(transform(image), class index)` (the RGB PIL image
when there is no transform); a bad image raises `ImageError` naming the file. Pass
`classes=` to fix the class order (e.g. a validation split that lacks a class uses the
training split's classes).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from torch.utils.data import Dataset

from ..errors import InputError
from .images import DEFAULT_LIMITS, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, DecodeLimits, load_image
from .inputs import find_images, read_csv_samples


class ImageDataset(Dataset):
    """Image files with class labels.

    Attributes:
        samples: `(path, class index)` pairs, in a stable order.
        classes: class names; `classes[i]` is the name of label `i`.
        class_to_idx: class name -> index.
        transform: PIL image -> model input (None returns the PIL image).
        limits: the decode budget of each image (default: `DecodeLimits(max_pixels=max_pixels)`).
    """

    def __init__(self, samples: Sequence[tuple[str | os.PathLike, int]], classes: Sequence[str],
                 transform: Callable | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 reduce_to: int | None = None, limits: DecodeLimits | None = None):
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        for p, y in self.samples:
            if not 0 <= y < len(self.classes):
                raise InputError(f"{p}: label index {y} is outside the {len(self.classes)} classes")
        self.transform = transform
        if limits is None:
            limits = DEFAULT_LIMITS if max_pixels == DEFAULT_MAX_PIXELS else DecodeLimits(max_pixels=max_pixels)
        self.limits = limits
        self.reduce_to = reduce_to  # see `load_image`: the fast JPEG path for eval transforms

    @property
    def max_pixels(self) -> int | None:
        return self.limits.max_pixels

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.targets)
        return {c: counts.get(i, 0) for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        img = load_image(path, limits=self.limits, reduce_to=self.reduce_to)
        return (self.transform(img) if self.transform is not None else img), label

    def with_transform(self, transform: Callable | None, *, reduce_to: int | None = None) -> ImageDataset:
        """The same samples and classes with another transform (e.g. training vs evaluation)."""
        return ImageDataset(self.samples, self.classes, transform, limits=self.limits, reduce_to=reduce_to)

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images, {len(self.classes)} classes)"

    @classmethod
    def from_folder(cls, root: str | os.PathLike, transform: Callable | None = None, *,
                    classes: Sequence[str] | None = None, **kwargs) -> ImageDataset:
        """`root/<class name>/**/<image>`: one sub-folder per class, images at any depth below it.

        Hidden folders and files (names starting with '.') are skipped; files directly in
        `root` are not part of any class and are ignored.
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InputError(f"dataset folder {root} does not exist; give a folder with one sub-folder per class")
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise InputError(f"dataset folder {root} has no class sub-folders; put each class's images "
                             f"in root/<class>/")
        classes = _check_classes(classes, found, f"sub-folders of {root}")
        samples = []
        for name in found:
            images = sorted(find_images(root / name))
            if not images:
                raise InputError(f"class folder {root / name} holds no image files "
                                 f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove it")
            samples += [(p, classes.index(name)) for p in images]
        return cls(samples, classes, transform, **kwargs)

    @classmethod
    def from_csv(cls, csv_file: str | os.PathLike, transform: Callable | None = None, *,
                 root: str | os.PathLike | None = None, classes: Sequence[str] | None = None,
                 **kwargs) -> ImageDataset:
        """A CSV with a header row naming a `path` and a `label` column (other columns ignored).

        Relative paths are relative to `root` (default: the CSV's folder). Classes are the
        distinct labels, sorted (numerically when every label is an integer).
        """
        # require_label: every row has a label
        rows = cast(list[tuple[Path, str]], read_csv_samples(csv_file, root=root, require_label=True))
        labels = {label for _, label in rows}
        classes = _check_classes(classes, _sorted_labels(labels), f"labels in {csv_file}")
        index = {c: i for i, c in enumerate(classes)}
        return cls([(p, index[label]) for p, label in rows], classes, transform, **kwargs)


def open_dataset(source: str | os.PathLike, transform: Callable | None = None, **kwargs) -> ImageDataset:
    """An `ImageDataset` from a class-per-folder tree or a `.csv` file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return ImageDataset.from_folder(path, transform, **kwargs)
    if path.suffix.lower() == ".csv" and path.is_file():
        return ImageDataset.from_csv(path, transform, **kwargs)
    raise InputError(f"{source}: not a dataset; give a folder with one sub-folder per class or a "
                     f"CSV file with 'path' and 'label' columns")




def _sorted_labels(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def _check_classes(given: Sequence[str] | None, found: list[str], where: str) -> list[str]:
    if given is None:
        return found
    given = list(given)
    unknown = [c for c in found if c not in given]
    if unknown:
        raise InputError(f"{where} include classes not in the given classes: {', '.join(unknown[:5])}"
                         f"{', ...' if len(unknown) > 5 else ''}; add them to classes= or remove them")
    return given
