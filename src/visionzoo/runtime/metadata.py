"""What an exported or quantized model file says about itself: architecture, classes, preprocessing.

The same record travels in every format: ONNX `metadata_props` (one `visionzoo` entry with
all of it as JSON, plus flat, readable copies of the preprocessing for other tools),
TorchScript and pt2 extra files (`visionzoo.json`). A file that carries it can be given to
`predict`, `embed`, `serve` and `benchmark` like a model name: they preprocess with its
recipe and name its classes.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..data.preprocess import Preprocess
from ..enums import Task
from ..errors import CheckpointError, InputError
from ..models.base import ZooModel
from ..version import __version__

KEY = "visionzoo"  # the ONNX metadata entry / extra-file stem holding the JSON record
EXTRA_FILE = "visionzoo.json"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUTS = ("logits", "embedding")


@dataclass(frozen=True)
class ModelInfo:
    """The self-description embedded in an exported model."""

    arch: str
    preprocess: Preprocess
    input_size: int  # the (square) input the graph was exported for; the batch size is free
    num_classes: int
    embedding_dim: int
    classes: tuple[str, ...] | None = None
    weights: str | None = None  # the weights record, bundle or file the model came from
    precision: str = "fp32"  # "fp32", or "int8" for a quantized model
    quantization: Mapping[str, Any] = field(default_factory=dict)  # how it was quantized
    visionzoo_version: str = ""
    task: Task = Task.CLASSIFICATION

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "arch": self.arch, "preprocess": self.preprocess.to_dict(),
                "input_size": self.input_size, "num_classes": self.num_classes,
                "embedding_dim": self.embedding_dim, "classes": list(self.classes) if self.classes else None,
                "weights": self.weights, "precision": self.precision, "quantization": dict(self.quantization),
                "visionzoo_version": self.visionzoo_version, "task": self.task.value, "inputs": INPUT_NAME,
                "outputs": list(OUTPUTS)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def onnx_props(self) -> dict[str, str]:
        """ONNX metadata: the record, and flat copies of what another runtime needs to feed the graph."""
        p = self.preprocess
        return {KEY: self.to_json(), "arch": self.arch, "mean": json.dumps(list(p.mean)),
                "std": json.dumps(list(p.std)), "resize_size": str(p.resize_size), "crop_size": str(p.crop_size),
                "interpolation": p.interpolation, "input_size": str(self.input_size),
                "classes": json.dumps(list(self.classes) if self.classes else None), "precision": self.precision}

    def with_quantization(self, precision: str, **details: Any) -> ModelInfo:
        return replace(self, precision=precision, quantization=details)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> ModelInfo:
        try:
            d = json.loads(text)
            if int(d.get("format_version", 1)) > FORMAT_VERSION:
                raise CheckpointError(f"{source} was written by a newer visionzoo; upgrade visionzoo to read it")
            return cls(arch=d["arch"], preprocess=Preprocess.from_dict(d["preprocess"]),
                       input_size=int(d["input_size"]), num_classes=int(d["num_classes"]),
                       embedding_dim=int(d["embedding_dim"]),
                       classes=tuple(d["classes"]) if d.get("classes") else None, weights=d.get("weights"),
                       precision=d.get("precision", "fp32"), quantization=d.get("quantization") or {},
                       visionzoo_version=d.get("visionzoo_version", ""),
                       task=Task(d.get("task", Task.CLASSIFICATION.value)))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{source}: its visionzoo metadata is unreadable ({e}); export the model again") \
                from None


def model_info(net: ZooModel) -> ModelInfo:
    """The record for a visionzoo model (built by `create_model` or loaded from a bundle)."""
    card = net.card
    if card is None:
        raise InputError("the model has no description (preprocessing, classes); build it with "
                         "visionzoo.create_model")
    size = net.image_size or card.preprocess.crop
    return ModelInfo(arch=card.architecture, preprocess=card.preprocess, input_size=size,
                     num_classes=net.num_classes, embedding_dim=net.head_hidden_size,
                     classes=card.classes, weights=card.weights_name, visionzoo_version=__version__,
                     task=card.task)
