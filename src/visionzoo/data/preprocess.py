"""The evaluation preprocessing a set of weights expects: a recipe (data), built into a transform on demand.

A recipe is checked when it is made, wherever it comes from (the weights catalog, a bundle, an
exported file's metadata): sizes from 1 to `MAX_SIZE`, a known interpolation, three finite
means and three finite standard deviations > 0. A hostile file cannot ask for a 60000-pixel
resize (17.6 GB per image) or divide by zero (NaN probabilities).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
MAX_SIZE = 4096  # the largest resize or crop: 4096 x 4096 is 16.8 M pixels, 200 MB as a float tensor


@dataclass(frozen=True)
class Preprocess:
    """The evaluation preprocessing a set of weights expects."""

    resize_size: int  # the shorter side is resized to this
    crop_size: int  # then a centre crop of crop_size x crop_size
    interpolation: str = "bilinear"  # "nearest" | "bilinear" | "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("resize_size", "crop_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
                raise InputError(f"preprocessing {name} must be an integer from 1 to {MAX_SIZE}, got {value!r}")
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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """The recipe `to_dict` wrote (sizes may also be one-element lists, as torchvision writes them)."""
        if not isinstance(d, Mapping):
            raise InputError(f"preprocessing must be an object with resize_size and crop_size, got {type(d).__name__}")
        missing = [k for k in ("resize_size", "crop_size") if k not in d]
        if missing:
            raise InputError(f"preprocessing lacks {' and '.join(missing)}")

        def one(v):
            return v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v
        return cls(one(d["resize_size"]), one(d["crop_size"]), d.get("interpolation", "bilinear"),
                   d.get("mean", IMAGENET_MEAN), d.get("std", IMAGENET_STD))

    def to_dict(self) -> dict[str, Any]:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> str:
        return (f"resize {self.resize_size}, crop {self.crop_size}, {self.interpolation}, "
                f"mean {self.mean}, std {self.std}")

    def transforms(self):
        """The callable that turns a PIL image into the model's input tensor."""
        from .transforms import ClassificationTransform

        return ClassificationTransform(self)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


DEFAULT_PREPROCESS = Preprocess(256, 224)
