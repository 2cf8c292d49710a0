"""Evaluation preprocessing without torchvision.

Reproduces torchvision's presets on PIL images exactly: `ImageClassification` (resize the
shorter side with Pillow's antialiased filter, centre crop, zero-padding an image smaller than
the crop, scale to [0, 1], normalise) and, without the crop, `SemanticSegmentation`,
`ObjectDetection` and `OpticalFlow` (see `preprocess.py`). When a recipe resizes the shorter
side and then crops, an image whose resized copy would exceed `MATERIALIZE_LIMIT` pixels (an
extreme aspect ratio) is resized over the crop's area only, which gives the same pixels up to
rounding without the huge copy.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .images import DEFAULT_MAX_RESIZED_PIXELS, draft_info, resized_size

if TYPE_CHECKING:
    from .preprocess import Preprocess


# a resized copy larger than this is never made: only the crop's area is resized
MATERIALIZE_LIMIT = DEFAULT_MAX_RESIZED_PIXELS


class Interpolation(str, Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"

    @property
    def pil(self) -> Image.Resampling:
        return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}[self.value]

    @property
    def support(self) -> float:
        """The filter's radius in pixels at scale 1 (Pillow's)."""
        return {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0}[self.value]


def resize_shorter(img: Image.Image, shorter: int, interpolation: Interpolation) -> Image.Image:
    size = resized_size(img.width, img.height, shorter)
    if size == img.size:
        return img
    return img.resize(size, interpolation.pil)


def resize_and_crop(img: Image.Image, shorter: int, crop: int, interpolation: Interpolation,
                    region: tuple[float, float, float, float] | None = None,
                    full_size: tuple[int, int] | None = None) -> Image.Image:
    """`center_crop(resize_shorter(img, shorter), crop)`; `region` (a box of `img`) stands for an
    image of `full_size` (a reduced-scale decode). When the resized image would be larger than
    `MATERIALIZE_LIMIT` pixels, only the area of the crop is resized."""
    box = region if region is not None else (0.0, 0.0, float(img.width), float(img.height))
    width, height = resized_size(*(full_size or img.size), shorter)
    if width * height <= MATERIALIZE_LIMIT:
        resized = img.resize((width, height), interpolation.pil, box=region) if region is not None \
            else resize_shorter(img, shorter, interpolation)
        return center_crop(resized, crop)
    (x0, x1, dx), (y0, y1, dy) = _crop_span(width, crop), _crop_span(height, crop)
    sx, sy = (box[2] - box[0]) / width, (box[3] - box[1]) / height
    area = _resize_area(img, (x1 - x0, y1 - y0), interpolation,
                        (box[0] + x0 * sx, box[1] + y0 * sy, box[0] + x1 * sx, box[1] + y1 * sy))
    if (x1 - x0, y1 - y0) == (crop, crop):
        return area
    out = Image.new(img.mode, (crop, crop))  # the zero padding of an image smaller than the crop
    out.paste(area, (dx, dy))
    return out


def _resize_area(img: Image.Image, size: tuple[int, int], interpolation: Interpolation,
                 box: tuple[float, float, float, float]) -> Image.Image:
    """`img.resize(size, box=box)` in the order Pillow resizes a whole image (rows first, then
    columns). Given a box that crops rows, Pillow filters the columns first, which rounds
    differently (by up to 20 levels in bicubic) from the whole-image resize being reproduced."""
    if interpolation is Interpolation.NEAREST:  # no filtering, no order
        return img.resize(size, interpolation.pil, box=box)
    left, top, right, bottom = box
    reach = interpolation.support * max((bottom - top) / size[1], 1.0) + 1  # rows the filter reads
    first, end = max(0, math.floor(top - reach)), min(img.height, math.ceil(bottom + reach))
    rows = img.crop((0, first, img.width, end))
    wide = rows.resize((size[0], end - first), interpolation.pil, box=(left, 0, right, end - first))
    return wide.resize(size, interpolation.pil, box=(0, top - first, size[0], bottom - first))


def _crop_span(length: int, crop: int) -> tuple[int, int, int]:
    """(first, end, offset): the part of a resized side that `center_crop` keeps, and where it lands."""
    if length >= crop:
        first = int(round((length - crop) / 2.0))
        return first, first + crop, 0
    return 0, length, (crop - length) // 2


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to `size` x `size`; an image smaller than that is zero-padded first."""
    w, h = img.size
    if w < size or h < size:
        padded = Image.new(img.mode, (max(w, size), max(h, size)))
        padded.paste(img, ((size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0))
        img, (w, h) = padded, padded.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """An RGB PIL image as a float32 CHW tensor, scaled to [0, 1] and normalised."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


class ImageTransform:
    """Callable PIL image -> normalised CHW float32 tensor for one recipe: resize (the shorter side, or to
    height x width), centre crop where the recipe has one, scale to [0, 1], normalise. Every preset of
    `preprocess.py` is such a recipe (a video's frames too)."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess
        self.interpolation = Interpolation(preprocess.interpolation)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        p = self.preprocess
        draft = draft_info(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if p.resize_size is not None and p.resize_hw is None and p.crop_size is not None:
            # a reduced-scale decode (the fast path) stands for the full image: its area that covers
            # the full image is resized to the size the full image would get (the exact path's geometry)
            img = resize_and_crop(img, p.resize_size, p.crop_size, self.interpolation,
                                  draft.region if draft is not None else None,
                                  draft.full_size if draft is not None else None)
        else:
            img = self._resized(img, draft)
            if p.crop_size is not None:
                img = center_crop(img, p.crop_size)
        return to_normalized_tensor(img, p.mean, p.std)

    def _resized(self, img: Image.Image, draft) -> Image.Image:
        """The image at the recipe's size. A reduced-scale decode (the fast path) resizes the area that
        covers the full image to the size the full image would get, so the geometry is the exact path's."""
        p = self.preprocess
        full = draft.full_size if draft is not None else img.size
        if p.resize_hw is not None:
            size = (p.resize_hw[1], p.resize_hw[0])
        elif p.resize_size is not None:
            size = resized_size(full[0], full[1], p.resize_size)
        else:
            size = full  # no resize: a reduced decode goes back to the full image's size
        if draft is None and size == img.size:
            return img
        return img.resize(size, self.interpolation.pil, box=draft.region if draft is not None else None)

    def __repr__(self) -> str:
        p = self.preprocess
        resize = list(p.resize_hw) if p.resize_hw is not None else p.resize_size
        return (f"{type(self).__name__}(resize={resize}, crop={p.crop_size}, "
                f"interpolation={p.interpolation}, mean={p.mean}, std={p.std})")


ClassificationTransform = ImageTransform  # the name it had when classification was the only task
