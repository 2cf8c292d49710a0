"""What an exported or quantized model file says about itself: architecture, classes, preprocessing.

The same record travels in every format: ONNX `metadata_props` (one `visionzoo` entry with
all of it as JSON, plus flat, readable copies of the preprocessing for other tools),
TorchScript and pt2 extra files (`visionzoo.json`). A file that carries it can be given to
`predict`, `embed`, `segment`, `serve` and `benchmark` like a model name: they preprocess with
its recipe and name its classes. Its `task` chooses the graph's inputs and outputs
(`graphs.py`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..data.preprocess import Preprocess
from ..enums import Task
from ..errors import CheckpointError, InputError
from ..models.base import VisionModel
from ..version import __version__
from .graphs import GraphSpec, graph_for

KEY = "visionzoo"  # the ONNX metadata entry / extra-file stem holding the JSON record
EXTRA_FILE = "visionzoo.json"
FORMAT_VERSION = 1
INPUT_NAME = "images"  # the input of every single-input graph
OUTPUTS = ("logits", "embedding")  # a classifier's outputs (see `graphs.py` for every task's)


@dataclass(frozen=True)
class ModelInfo:
    """The self-description embedded in an exported model."""

    arch: str
    preprocess: Preprocess
    input_size: int | None  # the (square) input a classifier's graph was exported for; None: any height and width
    num_classes: int
    embedding_dim: int | None  # width of a classifier's `embedding` output; None for tasks without one
    classes: tuple[str, ...] | None = None
    weights: str | None = None  # the weights record, bundle or file the model came from
    precision: str = "fp32"  # "fp32", or "int8" for a quantized model
    quantization: Mapping[str, Any] = field(default_factory=dict)  # how it was quantized
    visionzoo_version: str = ""
    task: Task = Task.CLASSIFICATION
    # outputs the task's graph has for this model beyond its task's own (a Mask R-CNN's detection graph: masks)
    extra_outputs: tuple[str, ...] = ()

    @property
    def graph(self) -> GraphSpec:
        """The inputs and outputs of the task's graph."""
        return graph_for(self.task)

    def to_dict(self) -> dict[str, Any]:
        inputs = self.graph.names(self.graph.inputs(self))
        return {"format_version": FORMAT_VERSION, "arch": self.arch, "preprocess": self.preprocess.to_dict(),
                "input_size": self.input_size, "num_classes": self.num_classes,
                "embedding_dim": self.embedding_dim, "classes": list(self.classes) if self.classes else None,
                "weights": self.weights, "precision": self.precision, "quantization": dict(self.quantization),
                "visionzoo_version": self.visionzoo_version, "task": self.task.value,
                "inputs": inputs[0] if len(inputs) == 1 else inputs,
                "outputs": self.graph.names(self.graph.outputs(self)),
                **({"extra_outputs": list(self.extra_outputs)} if self.extra_outputs else {})}

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
                       input_size=_int_or_none(d["input_size"]), num_classes=int(d["num_classes"]),
                       embedding_dim=_int_or_none(d["embedding_dim"]),
                       classes=tuple(d["classes"]) if d.get("classes") else None, weights=d.get("weights"),
                       precision=d.get("precision", "fp32"), quantization=d.get("quantization") or {},
                       visionzoo_version=d.get("visionzoo_version", ""),
                       task=Task(d.get("task", Task.CLASSIFICATION.value)),
                       extra_outputs=tuple(str(name) for name in d.get("extra_outputs") or ()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{source}: its visionzoo metadata is unreadable ({e}); export the model again") \
                from None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def model_info(net: VisionModel) -> ModelInfo:
    """The record for a visionzoo model (built by `create_model` or loaded from a bundle)."""
    card = net.card
    if card is None:
        raise InputError("the model has no description (preprocessing, classes); build it with "
                         "visionzoo.create_model")
    return ModelInfo(arch=card.architecture, preprocess=card.preprocess, num_classes=net.num_classes,
                     classes=card.classes, weights=card.weights_name, visionzoo_version=__version__,
                     task=card.task, **graph_for(card.task).describe_model(net))
