"""What the exported graph of each task takes and returns: one small spec per task.

Export, verification, the runtime backends and `benchmark` are written against `GraphSpec`;
each task describes its graph once, here, instead of `if task == ...` branches in each of them:

| task           | inputs                              | outputs                                          |
|----------------|-------------------------------------|--------------------------------------------------|
| classification | images (N, 3, S, S), S fixed        | logits (N, classes), embedding (N, D)            |
| segmentation   | images (N, 3, H, W), H and W free   | logits (N, classes, H, W): at the input's size   |
| detection      | images (1, 3, H, W), H and W free   | boxes (K, 4), scores (K,), labels (K,) after NMS |
|                |                                     | (Mask R-CNN: and masks (K, 1, 28, 28) in boxes)  |
| video          | clips (N, 3, T, S, S), T and S fixed | logits (N, classes), embedding (N, D)           |
| optical flow   | image1, image2 (N, 3, H, W), fixed  | flow (N, 2, H, W): RAFT's last estimate          |

A dimension is a fixed size or the name of a free axis (`"batch"`, `"height"`, ...), which
becomes a dynamic axis of the ONNX graph and is checked by running the written file on other
sizes than the ones it was traced with. `graph_for(task)` gives a task's spec.

A flow graph is exported for one frame size (RAFT's coordinate grids and correlation lookups are
built from the frame size, which the tracer bakes in: exported with a free height and width, the
graph gives wrong flows on other sizes) and a fixed number of refinement iterations
(`FLOW_UPDATES`); its recipe says the size (`resize_hw`: frames of another size are resized to it).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch
from torch import nn

from ..data.transforms import resized_size
from ..enums import Task
from ..errors import InputError
from ..models.base import VisionModel, ZooModel
from ..models.raft import RAFT

if TYPE_CHECKING:
    from .metadata import ModelInfo

Dim = int | str  # a fixed size, or the name of a free axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[Dim, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def describe(self, sep: str = " x ") -> str:
        """The shape as text, free axes by name (the batch as N): `N x 3 x height x width`."""
        return sep.join("N" if d == "batch" else str(d) for d in self.dims)


def random_inputs(shapes: tuple[tuple[int, ...], ...], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for shape in shapes)


class GraphSpec(ABC):
    """The graph of one task: its named inputs and outputs, the module that computes them from a
    model of the task, and the inputs to trace, check and time it with."""

    task: ClassVar[Task]

    @abstractmethod
    def describe_model(self, net: VisionModel) -> dict[str, Any]:
        """The task's fields of the model's `ModelInfo`: `input_size`, `embedding_dim`."""

    @abstractmethod
    def inputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]: ...

    @abstractmethod
    def outputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]: ...

    @abstractmethod
    def module(self, net: VisionModel) -> nn.Module:
        """`net` as the graph: the inputs as positional arguments, a tuple of the outputs."""

    @abstractmethod
    def input_shapes(self, info: ModelInfo, batch: int, variant: int = 0) -> tuple[tuple[int, ...], ...]:
        """Concrete input shapes for `batch` items; `variant` 0 is the one traced, 1, 2, ... the
        other sizes the written file is checked on (a size baked into the graph shows)."""

    check_variants: ClassVar[tuple[tuple[int, int], ...]] = ((3, 1),)  # (batch, variant) pairs checked
    trace_batch: ClassVar[int] = 2
    default_batches: ClassVar[tuple[int, ...]] = (1, 32)  # what `benchmark` times by default
    # whether a runtime should compile the graph for each input shape it meets (OpenVINO): a graph whose
    # output sizes depend on the data gains little from it and would be recompiled for every image size
    static_shapes: ClassVar[bool] = True

    def names(self, which: tuple[TensorSpec, ...]) -> list[str]:
        return [t.name for t in which]

    def dynamic_axes(self, info: ModelInfo) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs(info), *self.outputs(info))}

    def trace_inputs(self, info: ModelInfo) -> tuple[torch.Tensor, ...]:
        return random_inputs(self.input_shapes(info, self.trace_batch), seed=0)

    def check_inputs(self, info: ModelInfo) -> list[tuple[torch.Tensor, ...]]:
        return [random_inputs(self.input_shapes(info, batch, variant), seed=1 + k)
                for k, (batch, variant) in enumerate(self.check_variants)]

    def example_inputs(self, info: ModelInfo, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs of a typical size, for timing."""
        return random_inputs(self.input_shapes(info, batch), seed)

    def check(self, info: ModelInfo, inputs: tuple[torch.Tensor, ...], who: str) -> None:
        """Refuse inputs whose count or fixed dimensions do not fit the graph."""
        specs = self.inputs(info)
        ok = len(inputs) == len(specs) and all(
            x.ndim == len(s.dims) and all(isinstance(d, str) or d == n for d, n in zip(s.dims, x.shape, strict=True))
            for s, x in zip(specs, inputs, strict=True))
        if not ok:
            wanted = ", ".join(f"({s.describe(', ')})" for s in specs)
            got = ", ".join(str(tuple(x.shape)) for x in inputs)
            raise InputError(f"{who} takes {wanted} batches, got {got}; preprocess with runner.preprocess")

    def differences(self, got: list[np.ndarray], expected: list[np.ndarray]) -> list[float]:
        """Per output, the largest difference between a runtime's outputs and PyTorch's, relative to the
        output's range (the export check)."""
        return [relative_difference(g, e) for g, e in zip(got, expected, strict=True)]

    def run(self, net: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every output, eagerly (what the torch backend returns)."""
        return tuple(self.module(cast(VisionModel, net))(*inputs))  # the torch runner holds a task model

    def first(self, net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """The main output only (logits): what predict and segment need, often cheaper than all."""
        return self.run(net, *inputs)[0]

    def sized(self, info: ModelInfo, net: VisionModel, input_size: int | None) -> ModelInfo | None:
        """The record of an export at `input_size` (None: the default size), where the task decides it
        itself; None: the exporter's own rule (a classifier's square input)."""
        return None


class ClassificationGraph(GraphSpec):
    """Images of the model's one square size in; logits and the pooled pre-logits out."""

    task = Task.CLASSIFICATION

    class Module(nn.Module):
        def __init__(self, model: ZooModel):
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.model.forward_features(images)
            embedding = self.model.forward_head(features, pre_logits=True).flatten(1)
            return self.model.forward_head(features), embedding

    def describe_model(self, net: VisionModel) -> dict[str, Any]:
        if not isinstance(net, ZooModel):
            raise InputError(f"a {net.task.value} model has no classification graph")
        return {"input_size": net.image_size or net.require_card().preprocess.crop,
                "embedding_dim": net.head_hidden_size}

    def inputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        side = cast(int, info.input_size)  # a classifier always has one (describe_model)
        return (TensorSpec("images", ("batch", 3, side, side)),)

    def outputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", ("batch", info.num_classes)),
                TensorSpec("embedding", ("batch", cast(int, info.embedding_dim))))

    def module(self, net: VisionModel) -> nn.Module:
        if not isinstance(net, ZooModel):
            raise InputError(f"a {net.task.value} model has no classification graph")
        return self.Module(net)

    def input_shapes(self, info: ModelInfo, batch: int, variant: int = 0) -> tuple[tuple[int, ...], ...]:
        side = cast(int, info.input_size)
        return ((batch, 3, side, side),)

    def first(self, net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return net(*inputs)


class SegmentationGraph(GraphSpec):
    """Images of any size in; per-pixel class scores at the input's size out (no auxiliary head)."""

    task = Task.SEGMENTATION
    # traced at 128x160; checked on a batch of 3 at 160x208 and a single odd-sized portrait image
    _SIZES = ((128, 160), (160, 208), (131, 97))
    check_variants = ((3, 1), (1, 2))
    default_batches = (1, 4)

    class Module(nn.Module):
        def __init__(self, model: VisionModel):
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.model(images)["out"],)

    def describe_model(self, net: VisionModel) -> dict[str, Any]:
        return {"input_size": None, "embedding_dim": None}

    def inputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        return (TensorSpec("images", ("batch", 3, "height", "width")),)

    def outputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", ("batch", info.num_classes, "height", "width")),)

    def module(self, net: VisionModel) -> nn.Module:
        return self.Module(net)

    def input_shapes(self, info: ModelInfo, batch: int, variant: int = 0) -> tuple[tuple[int, ...], ...]:
        height, width = self._SIZES[variant]
        return ((batch, 3, height, width),)

    def example_inputs(self, info: ModelInfo, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        # a 4:3 photo after the recipe's resize (520 x 693 for torchvision's weights)
        width, height = resized_size(4000, 3000, info.preprocess.resize_size or 520)
        return random_inputs(((batch, 3, height, width),), seed)

    def first(self, net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return net(*inputs)["out"]


class DetectionGraph(GraphSpec):
    """One image of any size in ([0, 1], not normalised); the detections after NMS out, in its pixels
    (`detection_graph.py`). One image per run: the number of detections differs from image to image."""

    task = Task.DETECTION
    # traced at 240x320; checked on a portrait image and a small odd-sized one
    _SIZES = ((240, 320), (300, 200), (131, 97))
    check_variants = ((1, 1), (1, 2))
    trace_batch = 1
    default_batches = (1,)
    static_shapes = False

    def describe_model(self, net: VisionModel) -> dict[str, Any]:
        from ..models.detection.rcnn import RCNN

        masks = isinstance(net, RCNN) and net.roi_heads.has_mask
        return {"input_size": None, "embedding_dim": None, "extra_outputs": ("masks",) if masks else ()}

    def inputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        return (TensorSpec("images", (1, 3, "height", "width")),)

    def outputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        # a Mask R-CNN's masks: each detection's mask probabilities in its box (28x28), pasted after the graph
        masks = (TensorSpec("masks", ("detections", 1, "mask_height", "mask_width")),) \
            if "masks" in info.extra_outputs else ()
        return (TensorSpec("boxes", ("detections", 4)), TensorSpec("scores", ("detections",)),
                TensorSpec("labels", ("detections",)), *masks)

    def module(self, net: VisionModel) -> nn.Module:
        from ..models.detection import DetectionModel
        from ..models.detection.rcnn import RCNN
        from .detection_graph import DetectorGraph, register_onnx_nms
        from .rcnn_graph import RCNNGraph, register_onnx_roi_align

        if not isinstance(net, DetectionModel):
            raise InputError(f"a {net.task.value} model has no detection graph")
        register_onnx_nms()
        if isinstance(net, RCNN):
            register_onnx_roi_align()
            return RCNNGraph(net)
        return DetectorGraph(net)

    def input_shapes(self, info: ModelInfo, batch: int, variant: int = 0) -> tuple[tuple[int, ...], ...]:
        height, width = self._SIZES[variant]
        return ((batch, 3, height, width),)

    def trace_inputs(self, info: ModelInfo) -> tuple[torch.Tensor, ...]:
        return (self._photo_like(self.input_shapes(info, 1)[0], 0),)

    def check_inputs(self, info: ModelInfo) -> list[tuple[torch.Tensor, ...]]:
        return [(self._photo_like(self.input_shapes(info, 1, variant)[0], 1 + k),)
                for k, (_, variant) in enumerate(self.check_variants)]

    def example_inputs(self, info: ModelInfo, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return (self._photo_like((batch, 3, 480, 640), seed),)  # a VGA photo, as the detection benchmarks use

    @staticmethod
    def _photo_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Pixels in [0, 1], as decoded images are (the graph normalises them itself)."""
        return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))

    def differences(self, got: list[np.ndarray], expected: list[np.ndarray]) -> list[float]:
        from .detection_graph import compare_detections

        return list(compare_detections(tuple(got), tuple(expected)))

    def first(self, net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(net, *inputs)[0]


class VideoGraph(GraphSpec):
    """Clips of the recipe's length and square crop in; logits and the pooled pre-logits out."""

    task = Task.VIDEO
    default_batches = (1, 8)

    class Module(ClassificationGraph.Module):
        """The classifier's graph: a video classifier's features and head take clips the same way."""

    def describe_model(self, net: VisionModel) -> dict[str, Any]:
        p = net.require_card().preprocess
        if not isinstance(net, ZooModel) or p.clip_len is None or p.crop_size is None:
            raise InputError(f"{net.arch}: a video graph needs a video classifier whose recipe has a clip length "
                             f"and a crop")
        return {"input_size": p.crop_size, "embedding_dim": net.head_hidden_size}

    def inputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        return (TensorSpec("clips", ("batch", *self._clip(info))),)

    def outputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        return (TensorSpec("logits", ("batch", info.num_classes)),
                TensorSpec("embedding", ("batch", cast(int, info.embedding_dim))))

    def module(self, net: VisionModel) -> nn.Module:
        if not isinstance(net, ZooModel):
            raise InputError(f"a {net.task.value} model has no video graph")
        return self.Module(net)

    def input_shapes(self, info: ModelInfo, batch: int, variant: int = 0) -> tuple[tuple[int, ...], ...]:
        return ((batch, *self._clip(info)),)

    def first(self, net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return net(*inputs)

    def sized(self, info: ModelInfo, net: VisionModel, input_size: int | None) -> ModelInfo | None:
        if input_size is None or input_size == info.input_size:
            return None
        raise InputError(f"{info.arch} is exported for its recipe's clip (frames and crop); fine-tune it with "
                         f"--image-size / --clip-len for another size")

    @staticmethod
    def _clip(info: ModelInfo) -> tuple[int, int, int, int]:
        frames, side = info.preprocess.clip_len, info.input_size
        if frames is None or side is None:
            raise InputError(f"{info.arch}: its recipe has no clip length or crop; a video graph needs both")
        return (3, frames, side, side)


FLOW_SIZE = (360, 640)  # (height, width) of a flow graph's frames unless exported for another size
FLOW_UPDATES = 12  # RAFT's refinement iterations in an exported graph (the model's default)


class FlowGraph(GraphSpec):
    """Two frames of the export's size in (scaled to [-1, 1] by the weights' recipe); RAFT's last flow
    estimate out."""

    task = Task.OPTICAL_FLOW
    default_batches = (1, 2)

    class Module(nn.Module):
        def __init__(self, model: nn.Module, updates: int):
            super().__init__()
            self.model, self.updates = model, updates

        def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.model(image1, image2, num_flow_updates=self.updates, all_estimates=False)[-1],)

    def describe_model(self, net: VisionModel) -> dict[str, Any]:
        return {"input_size": None, "embedding_dim": None}

    def inputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        shape = ("batch", 3, *self.frame_size(info))
        return (TensorSpec("image1", shape), TensorSpec("image2", shape))

    def outputs(self, info: ModelInfo) -> tuple[TensorSpec, ...]:
        return (TensorSpec("flow", ("batch", 2, *self.frame_size(info))),)

    def module(self, net: VisionModel) -> nn.Module:
        if not isinstance(net, RAFT):
            raise InputError(f"a {net.task.value} model has no flow graph")
        return self.Module(net, FLOW_UPDATES)

    def input_shapes(self, info: ModelInfo, batch: int, variant: int = 0) -> tuple[tuple[int, ...], ...]:
        return ((batch, 3, *self.frame_size(info)),) * 2

    # frames in the recipe's [-1, 1], not a normal distribution: RAFT's lookups see realistic correlations
    def trace_inputs(self, info: ModelInfo) -> tuple[torch.Tensor, ...]:
        return _uniform(self.input_shapes(info, self.trace_batch), seed=0)

    def check_inputs(self, info: ModelInfo) -> list[tuple[torch.Tensor, ...]]:
        return [_uniform(self.input_shapes(info, batch, variant), seed=1 + k)
                for k, (batch, variant) in enumerate(self.check_variants)]

    def example_inputs(self, info: ModelInfo, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return _uniform(self.input_shapes(info, batch), seed)

    def first(self, net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return net(*inputs)[-1]  # RAFT's estimates, the last one only by default

    def sized(self, info: ModelInfo, net: VisionModel, input_size: int | None) -> ModelInfo | None:
        size = FLOW_SIZE if input_size is None else (input_size, input_size)
        return self.with_frame_size(info, net, size)

    @staticmethod
    def with_frame_size(info: ModelInfo, net: VisionModel, size: tuple[int, int]) -> ModelInfo:
        """`info` for a graph of frames of `size` (height, width): multiples of 8, at least RAFT's minimum."""
        least = net.min_size if isinstance(net, RAFT) else 8
        height, width = size
        if height % 8 or width % 8 or min(height, width) < least:
            raise InputError(f"flow graphs take frames whose sides are multiples of 8 and at least {least}; got "
                             f"{height}x{width} (HxW)")
        return replace(info, preprocess=replace(info.preprocess, resize_hw=(height, width)))

    @staticmethod
    def frame_size(info: ModelInfo) -> tuple[int, int]:
        return info.preprocess.resize_hw or FLOW_SIZE


def _uniform(shapes: tuple[tuple[int, ...], ...], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(*shape, generator=g) * 2 - 1 for shape in shapes)


GRAPHS: dict[Task, GraphSpec] = {spec.task: spec for spec in (ClassificationGraph(), SegmentationGraph(),
                                                             DetectionGraph(), VideoGraph(), FlowGraph())}


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected|: the error relative to the output's range."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        return float("inf")
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    err = float(np.abs(got - expected).max()) if expected.size else 0.0
    return err / scale if scale > 0 else err


def graph_for(task: Task) -> GraphSpec:
    """The graph spec of `task`; an `InputError` for tasks that cannot be exported yet."""
    try:
        return GRAPHS[task]
    except KeyError:
        raise InputError(f"{task.value} models cannot be exported or run on the runtimes yet; use the torch "
                         f"backend") from None
