"""visionzoo: pre-trained image models made practical.

    import visionzoo
    visionzoo.list_models("resnet*")
    model = visionzoo.create_model("efficientnet_lite0", pretrained=True)
    preds = visionzoo.predict(["photo.jpg"])
    emb = visionzoo.embed(["photos/"], out="photos.npy")
"""
from __future__ import annotations

from .bundle import load_bundle, read_bundle, save_bundle
from .errors import (
    CheckpointError,
    ImageError,
    InputError,
    UnknownModelError,
    UnknownWeightsError,
    VisionZooError,
    WeightsUnavailableError,
)
from .factory import create_model
from .registry import REGISTRY
from .weights.adapt import LoadReport, load_weights
from .weights.inspect import CheckpointReport, inspect_checkpoint
from .weights.records import Preprocess, Weights

__version__ = "0.1.0"
DEFAULT_MODEL = "efficientnet_lite0"

list_models = REGISTRY.list_models
list_weights = REGISTRY.list_weights
get_weights = REGISTRY.get_weights


def predict(*args, **kwargs):
    """Classify images; see `visionzoo.tasks.predict.predict`."""
    from .tasks.predict import predict as _predict

    return _predict(*args, **kwargs)


def embed(*args, **kwargs):
    """Embed images (pooled pre-logits or a pooled stage), resumably to a file; see
    `visionzoo.tasks.embed.embed`."""
    from .tasks.embed import embed as _embed

    return _embed(*args, **kwargs)


def finetune(*args, **kwargs):
    """Fine-tune a model on labelled images and write a bundle; see `visionzoo.tasks.finetune.finetune`."""
    from .tasks.finetune import finetune as _finetune

    return _finetune(*args, **kwargs)


def evaluate(*args, **kwargs):
    """Score a bundle on labelled images; see `visionzoo.tasks.evaluate.evaluate`."""
    from .tasks.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = [
    "DEFAULT_MODEL", "REGISTRY", "CheckpointError", "ImageError", "InputError", "Preprocess",
    "UnknownModelError", "UnknownWeightsError", "VisionZooError", "Weights", "WeightsUnavailableError",
    "CheckpointReport", "LoadReport", "create_model", "embed", "evaluate", "finetune", "get_weights",
    "inspect_checkpoint", "list_models", "list_weights", "load_bundle", "load_weights", "predict", "read_bundle",
    "save_bundle",
]
