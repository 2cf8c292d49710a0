"""visionzoo: pre-trained vision models made practical.

    import visionzoo
    visionzoo.list_models("resnet*")
    model = visionzoo.create_model("efficientnet_lite0", pretrained=True)
    preds = visionzoo.predict(["photo.jpg"])
    emb = visionzoo.embed(["photos/"], out="photos.npy")
    masks = visionzoo.segment(["photos/"], out="masks/")

The workflows (`predict`, `embed`, `finetune`, ...) are imported on first use, so that
`import visionzoo` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from .bundle import read_bundle, save_bundle
from .card import ModelCard
from .enums import Task
from .errors import (
    CheckpointError,
    ImageError,
    InputError,
    UnknownModelError,
    UnknownWeightsError,
    VisionZooError,
    WeightsUnavailableError,
)
from .factory import create_model, load_bundle, resolve_model
from .registry import DEFAULT_MODEL, REGISTRY
from .version import __version__
from .weights.adapt import LoadReport, load_weights
from .weights.records import Preprocess, Weights

list_models = REGISTRY.list_models
list_weights = REGISTRY.list_weights
get_weights = REGISTRY.get_weights

# name -> module that defines it, imported on first access
_LAZY = {
    "predict": "visionzoo.tasks.predict",
    "embed": "visionzoo.tasks.embed",
    "detect": "visionzoo.tasks.detect",
    "segment": "visionzoo.tasks.segment",
    "finetune": "visionzoo.tasks.finetune",
    "evaluate": "visionzoo.tasks.evaluate",
    "export_model": "visionzoo.runtime.export",
    "open_runner": "visionzoo.runtime.backends",
    "InferenceOptions": "visionzoo.runtime.options",
    "quantize": "visionzoo.tasks.quantize",
    "prune": "visionzoo.tasks.prune",
    "benchmark": "visionzoo.tasks.benchmark",
    "inspect_checkpoint": "visionzoo.tasks.inspect",
    "CheckpointReport": "visionzoo.tasks.inspect",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'visionzoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DEFAULT_MODEL", "REGISTRY", "CheckpointError", "CheckpointReport", "ImageError", "InferenceOptions", "InputError",
    "LoadReport", "ModelCard", "Preprocess", "Task", "UnknownModelError", "UnknownWeightsError", "VisionZooError",
    "Weights", "WeightsUnavailableError", "__version__", "benchmark", "create_model", "detect", "embed", "evaluate",
    "export_model", "finetune", "get_weights", "inspect_checkpoint", "list_models", "list_weights", "load_bundle",
    "load_weights", "open_runner", "predict", "prune", "quantize", "read_bundle", "resolve_model", "save_bundle",
    "segment",
]
