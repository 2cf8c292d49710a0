"""Evaluation preprocessing without torchvision.

Reproduces torchvision's presets on PIL images exactly: `ImageClassification` (resize the
shorter side with Pillow's antialiased filter, centre crop, zero-padding an image smaller than
the crop, scale to [0, 1], normalise) and, without the crop, `SemanticSegmentation`,
`ObjectDetection` and `OpticalFlow` (see `preprocess.py`).
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .images import draft_info

if TYPE_CHECKING:
    from .preprocess import Preprocess


class Interpolation(str, Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"

    @property
    def pil(self) -> Image.Resampling:
        return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}[self.value]


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `shorter`, as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shorter, int(shorter * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


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
            size = resized_size(*full, p.resize_size)
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
