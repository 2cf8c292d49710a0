"""The evaluation preprocessing a set of weights expects: a recipe (data), built into a transform on demand."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """The evaluation preprocessing a set of weights expects."""

    resize_size: int  # the shorter side is resized to this
    crop_size: int  # then a centre crop of crop_size x crop_size
    interpolation: str = "bilinear"  # "nearest" | "bilinear" | "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        def one(v):
            return int(v[0]) if isinstance(v, (list, tuple)) else int(v)
        return cls(one(d["resize_size"]), one(d["crop_size"]), d.get("interpolation", "bilinear"),
                   tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD)))

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


DEFAULT_PREPROCESS = Preprocess(256, 224)
