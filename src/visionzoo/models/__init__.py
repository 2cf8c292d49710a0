"""The model families, one module each, and torchvision-style builders.

`visionzoo.models.resnet50(weights="IMAGENET1K_V2")` is `create_model("resnet50",
weights="IMAGENET1K_V2")`; a builder exists for every architecture in the registry.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import FeatureInfo, VisionModel, ZooModel

if TYPE_CHECKING:
    from .features import FeatureExtractor


def __getattr__(name: str):
    from ..registry import REGISTRY

    if name.startswith("_") or name not in REGISTRY.list_models():
        raise AttributeError(f"module 'visionzoo.models' has no attribute {name!r}")
    return _builder(name)


def __dir__() -> list[str]:
    from ..registry import REGISTRY

    return sorted(set(globals()) | set(REGISTRY.list_models()))


def _builder(arch: str):
    def build(weights: Any = None, progress: bool = True, **kwargs: Any) -> VisionModel | FeatureExtractor:
        from ..factory import create_model

        return create_model(arch, weights=weights, progress=progress, **kwargs)

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = (f"Build {arch}. `weights`: None, 'DEFAULT', a tag of "
                     f"`visionzoo.list_weights('{arch}')`, a Weights record or a file path; "
                     f"other arguments as for `visionzoo.create_model`.")
    return build


__all__ = ["FeatureInfo", "ZooModel"]
