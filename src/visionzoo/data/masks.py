"""Segmentation datasets: a folder of images and a folder of class-index masks with the same names.

    shapes/
        images/cat_001.jpg     any image format; sub-folders allowed (masks/ mirrors them)
        masks/cat_001.png      one PNG per image, the image's size: each pixel holds its class index
                               (0, 1, ...; a greyscale or palette PNG), 255 for pixels to ignore
        classes.txt            the class names, one per line, in index order (or give `classes=`)

`open_mask_folder` checks every pair before anything trains: an image without a mask, a mask
of another size than its image, a mask holding an index beyond the classes or a mask that is
not a class-index image each raise an `InputError` naming the file. Reading the masks then also
counts the pixels of each class (for class weights and for classes that never occur).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BoundedFile
from .inputs import find_images

IMAGES, MASKS, CLASSES_FILE = "images", "masks", "classes.txt"
IGNORE_INDEX = 255  # a mask's "not labelled" value (VOC's object borders)
MAX_CLASSES = 255  # indices 0..254: 255 means "ignore"
_MASK_MODES = ("L", "P", "I;16", "I")  # greyscale or palette: one class index per pixel
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class MaskSample:
    image: Path
    mask: Path


@dataclass(frozen=True)
class MaskFolder:
    """The checked image/mask pairs of a segmentation dataset."""

    root: Path
    samples: tuple[MaskSample, ...]  # in a stable order (sorted by image path)
    classes: tuple[str, ...]
    pixel_counts: np.ndarray  # (samples, classes) int64: the labelled pixels of each class in each mask

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def class_pixels(self) -> np.ndarray:
        """Labelled pixels of each class over all masks."""
        return self.pixel_counts.sum(0)

    def subset(self, indices: Sequence[int]) -> MaskFolder:
        indices = list(indices)
        return MaskFolder(self.root, tuple(self.samples[i] for i in indices), self.classes,
                          self.pixel_counts[indices])


def is_mask_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is laid out as a segmentation dataset (`images/` and `masks/` folders)."""
    p = Path(path).expanduser()
    return (p / IMAGES).is_dir() and (p / MASKS).is_dir()


def read_classes(root: str | os.PathLike, classes: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The class names: `classes` (a list, or one comma-separated string) or `root/classes.txt`."""
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",")]
    if classes is None:
        path = Path(root).expanduser() / CLASSES_FILE
        if not path.is_file():
            raise InputError(f"{root}: no {CLASSES_FILE}; list the class names in it (one per line, in index "
                             f"order) or give them with --classes")
        try:
            classes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read the class names ({e})") from None
        classes = [c for c in classes if c and not c.startswith("#")]
    names = tuple(str(c) for c in classes)
    if len(names) < 2 or any(not c for c in names):
        raise InputError(f"{root}: a segmentation dataset needs at least two non-empty class names (background "
                         f"and one more), got {list(names)}")
    if len(set(names)) != len(names):
        raise InputError(f"{root}: class names must be distinct, got {list(names)}")
    if len(names) > MAX_CLASSES:
        raise InputError(f"{root}: at most {MAX_CLASSES} classes (index 255 marks ignored pixels), got {len(names)}")
    return names


def open_mask_folder(root: str | os.PathLike, classes: Sequence[str] | str | None = None) -> MaskFolder:
    """Pair every image of `root/images` with its mask in `root/masks`, check the pairs and count the
    pixels of each class. Raises `InputError` naming the first file that does not fit."""
    root = Path(root).expanduser()
    if not is_mask_folder(root):
        raise InputError(f"{root}: not a segmentation dataset; give a folder with {IMAGES}/ and {MASKS}/ "
                         f"sub-folders (masks named like their images, .png)")
    names = read_classes(root, classes)
    images = sorted(find_images(root / IMAGES))
    if not images:
        raise InputError(f"{root / IMAGES} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    counts = []
    samples = []
    for image in images:
        mask = mask_path(root, image)
        labels = read_mask(mask, len(names))
        size = upright_size(image)
        if (labels.shape[1], labels.shape[0]) != size:
            raise InputError(f"{mask}: the mask is {labels.shape[1]}x{labels.shape[0]} but its image {image.name} "
                             f"is {size[0]}x{size[1]}; a mask must match its image pixel for pixel")
        counts.append(np.bincount(labels.reshape(-1), minlength=256)[:len(names)])
        samples.append(MaskSample(image, mask))
    return MaskFolder(root, tuple(samples), names, np.stack(counts).astype(np.int64))


def mask_path(root: Path, image: Path) -> Path:
    """The mask of `image`: the same path below `masks/`, with the extension `.png`."""
    relative = image.relative_to(root / IMAGES).with_suffix(".png")
    mask = root / MASKS / relative
    if not mask.is_file():
        raise InputError(f"{image}: no mask ({mask} is missing); every image needs a class-index mask of the "
                         f"same name")
    return mask


def read_mask(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """A mask's class indices as a (H, W) uint8 array, checked against `num_classes` (255 = ignore)."""
    path = Path(path)
    try:
        with BoundedFile(path) as f, Image.open(f) as img:
            if img.mode not in _MASK_MODES:
                raise InputError(f"{path}: a {img.mode} image is not a class-index mask; save one class index per "
                                 f"pixel as a greyscale or palette PNG")
            if img.width * img.height > DEFAULT_MAX_PIXELS:
                raise InputError(f"{path}: a {img.width}x{img.height} mask is over {DEFAULT_MAX_PIXELS:,} pixels; "
                                 f"resize the image and its mask")
            labels = np.asarray(img)
    except InputError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: cannot read the mask ({e})") from None
    found = np.unique(labels)
    beyond = found[(found >= num_classes) & (found != IGNORE_INDEX)]
    if beyond.size:
        raise InputError(f"{path}: class index {int(beyond[0])} is beyond the {num_classes} classes; use 0.."
                         f"{num_classes - 1}, or {IGNORE_INDEX} for pixels to ignore")
    return labels.astype(np.uint8)


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as `load_image` will decode it (EXIF orientation applied), read
    from its header only."""
    try:
        with BoundedFile(path) as f, Image.open(f) as img:
            size = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - an unreadable EXIF block leaves the pixels as stored
                orientation = 1
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: cannot read the image ({e})") from None
    return size[::-1] if orientation in _TRANSPOSED else size
