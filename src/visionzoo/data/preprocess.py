"""The evaluation preprocessing a set of weights expects: a recipe (data), built into a transform on demand.

One record for every task, as torchvision's presets (`kind` names the preset it reproduces):

| kind                  | what it does to an image (or to each frame of a clip)                    |
|-----------------------|---------------------------------------------------------------------------|
| ImageClassification   | resize the shorter side, centre crop a square, scale to [0, 1], normalise |
| SemanticSegmentation  | resize the shorter side, scale, normalise (no crop: masks cover it all)   |
| ObjectDetection       | scale to [0, 1] (the detector normalises and resizes itself)              |
| VideoClassification   | per frame: resize (shorter side, or to height x width), crop, normalise   |
| OpticalFlow           | scale to [-1, 1] (mean = std = 0.5)                                       |

A recipe is checked when it is made, wherever it comes from (the weights catalog, a bundle, an
exported file's metadata): sizes from 1 to `MAX_SIZE` (a classifier's crop required), a known
kind and interpolation, three finite means and three finite standard deviations > 0, clip
lengths, clip counts and frame rates up to `MAX_CLIP`. A hostile file cannot ask for a 60000-pixel
resize (17.6 GB per image) or divide by zero (NaN probabilities).

A video recipe also says how clips are sampled from a video, as the weights were evaluated:
`clip_len` frames taken at `frame_rate` frames per second (the video is resampled to that rate, so
the temporal stride is the source's rate over it), `clips` of them per video, scores averaged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("ImageClassification", "SemanticSegmentation", "ObjectDetection", "VideoClassification", "OpticalFlow")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
MAX_SIZE = 4096  # the largest resize or crop: 4096 x 4096 is 16.8 M pixels, 200 MB as a float tensor
MAX_CLIP = 512  # the most frames per clip or clips per video (and frames per second) a video recipe may ask for


@dataclass(frozen=True)
class Preprocess:
    """The evaluation preprocessing a set of weights expects."""

    resize_size: int | None  # the shorter side is resized to this; None: no resize (or `resize_hw`)
    crop_size: int | None  # then a centre crop of crop_size x crop_size; None: no crop
    interpolation: str = "bilinear"  # "nearest" | "bilinear" | "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    kind: str = "ImageClassification"  # the torchvision preset it reproduces (see the module docstring)
    resize_hw: tuple[int, int] | None = None  # resized to exactly (height, width) instead (R3D's 128x171)
    clip_len: int | None = None  # video: frames per clip
    frame_rate: float | None = None  # video: frames per second clips are sampled at (None: every frame)
    clips: int | None = None  # video: clips per video whose scores the weights' evaluation averaged

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise InputError(f"unknown preprocessing kind {self.kind!r}; one of {', '.join(KINDS)}")
        for name in ("resize_size", "crop_size"):
            value = getattr(self, name)
            if value is not None and not _is_size(value):
                raise InputError(f"preprocessing {name} must be an integer from 1 to {MAX_SIZE}, got {value!r}")
        if self.kind == "ImageClassification" and self.crop_size is None:
            raise InputError("preprocessing crop_size is missing: a classifier's recipe crops to its input size")
        if self.resize_hw is not None:
            hw = tuple(self.resize_hw) if isinstance(self.resize_hw, (list, tuple)) else ()
            if len(hw) != 2 or not all(_is_size(v) for v in hw):
                raise InputError(f"preprocessing resize_size [height, width] must be two integers from 1 to "
                                 f"{MAX_SIZE}, got {self.resize_hw!r}")
            object.__setattr__(self, "resize_hw", hw)
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"preprocessing interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                             f"{self.interpolation!r}")
        for name, positive in (("mean", False), ("std", True)):
            value = getattr(self, name)
            numbers = tuple(value) if isinstance(value, (list, tuple)) else ()
            if len(numbers) != 3 or not all(_finite(v) and (v > 0 or not positive) for v in numbers):
                need = "three finite numbers > 0" if positive else "three finite numbers"
                raise InputError(f"preprocessing {name} must be {need} (one per RGB channel), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in numbers))
        for name in ("clip_len", "clips"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= MAX_CLIP):
                raise InputError(f"preprocessing {name} must be an integer from 1 to {MAX_CLIP}, got {value!r}")
        if self.frame_rate is not None and not (_finite(self.frame_rate) and 0 < self.frame_rate <= MAX_CLIP):
            raise InputError(f"preprocessing frame_rate must be a number of frames per second in (0, {MAX_CLIP}], "
                             f"got {self.frame_rate!r}")

    @property
    def crop(self) -> int:
        """The square size the recipe crops to: the input size of a classifier."""
        if self.crop_size is None:
            raise InputError(f"the {self.kind} preprocessing has no fixed input size (no crop)")
        return self.crop_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """From the catalog's, a bundle's or an exported file's JSON. Sizes may be lists as torchvision
        writes them: `[520]` is a shorter side, `[128, 171]` a height and width, `[112, 112]` a square."""
        if not isinstance(d, Mapping):
            raise InputError(f"preprocessing must be an object with resize_size and crop_size, got {type(d).__name__}")
        resize, resize_hw = _size(d.get("resize_size"))
        crop, crop_hw = _size(d.get("crop_size"))
        if crop_hw is not None:
            if crop_hw[0] != crop_hw[1]:
                raise InputError(f"crop_size {list(crop_hw)}: only square crops are supported")
            crop = crop_hw[0]
        kind = d.get("kind") or d.get("transform") or "ImageClassification"
        return cls(resize, crop, d.get("interpolation", "bilinear"), d.get("mean", IMAGENET_MEAN),
                   d.get("std", IMAGENET_STD), kind, resize_hw, d.get("clip_len"), d.get("frame_rate"),
                   d.get("clips"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"resize_size": self.resize_size, "crop_size": self.crop_size,
                             "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}
        if self.kind != "ImageClassification":
            d["kind"] = self.kind
        if self.resize_hw is not None:
            d["resize_size"] = list(self.resize_hw)
        for name in ("clip_len", "frame_rate", "clips"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    def describe(self) -> str:
        parts = []
        if self.resize_hw is not None:
            parts.append(f"resize to {self.resize_hw[0]}x{self.resize_hw[1]}")
        elif self.resize_size is not None:
            parts.append(f"resize {self.resize_size}")
        if self.crop_size is not None:
            parts.append(f"crop {self.crop_size}")
        if parts:
            parts.append(self.interpolation)
        parts += [f"mean {self.mean}", f"std {self.std}"]
        if self.clip_len is not None:
            rate = f" at {self.frame_rate:g} fps" if self.frame_rate else ""
            parts.append(f"clips of {self.clip_len} frames{rate}" + (f", {self.clips} per video" if self.clips else ""))
        return ", ".join(parts) if self.kind == "ImageClassification" else f"{self.kind}: {', '.join(parts)}"

    def transforms(self):
        """The callable that turns a PIL image into the model's input tensor (a frame's, for video)."""
        from .transforms import ImageTransform

        return ImageTransform(self)


def _size(value: Any) -> tuple[Any, Any]:
    """(shorter side, None) or (None, (height, width)) from an int, a one- or two-item list, or None
    (the values are checked by `Preprocess`)."""
    if value is None:
        return None, None
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return value[0], None
        if len(value) == 2:
            return None, (value[0], value[1])
        raise InputError(f"a size is a number or [height, width], got {list(value)[:4]}")
    return value, None


def _is_size(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


DEFAULT_PREPROCESS = Preprocess(256, 224)
