"""Small enumerations shared across layers, and the one parser that turns user input into them."""
from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

from .errors import InputError

E = TypeVar("E", bound=Enum)


class Task(str, Enum):
    """What a model computes; every architecture declares one."""

    CLASSIFICATION = "classification"  # image -> class scores
    SEGMENTATION = "segmentation"  # image -> class scores per pixel
    DETECTION = "detection"  # image -> boxes, labels, scores (and masks or keypoints)
    VIDEO = "video"  # clip of frames -> class scores
    OPTICAL_FLOW = "optical_flow"  # two frames -> motion per pixel


class Precision(str, Enum):
    """Numeric precision: of inference (runtime backends) and of training (autocast)."""

    AUTO = "auto"  # chosen for the machine: see where it is used
    FP32 = "fp32"
    BF16 = "bf16"  # bfloat16 compute; weights (and training's optimizer state) stay float32
    INT8 = "int8"  # a quantized model file (inference only)


def parse_enum(kind: type[E], value: Any, what: str) -> E:
    """`value` (a member, or its value or name in any case) as a member of `kind`; otherwise an
    `InputError` naming `what` and the accepted values."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        for member in kind:
            if text in (str(member.value).lower(), member.name.lower()):
                return member
    accepted = ", ".join(str(m.value) for m in kind)
    raise InputError(f"unknown {what} {value!r}; use one of: {accepted}")
