"""ONNX export of video classifiers and optical-flow models, verified through ONNX Runtime.

| task         | inputs                                         | outputs                                  |
|--------------|------------------------------------------------|------------------------------------------|
| video        | clips (N, 3, T, S, S): T frames, S the crop    | logits (N, classes), embedding (N, D)    |
| optical flow | image1, image2 (N, 3, H, W), multiples of 8    | flow (N, 2, H, W): RAFT's last estimate  |

The batch size N is free; the clip length, the crop and the flow frames' size are fixed in the
graph (RAFT's coordinate grids and correlation lookups are built from the frame size, which the
tracer bakes in: exported with free height and width, the graph gives wrong flows on other sizes),
so a flow graph is exported for one frame size (`size`, default 360 x 640) and for a fixed number of
refinement iterations (`updates`, default 12). Frames of another size are padded or resized to it.

Each spec below has the shape of the classification graph's (`describe`, `inputs`, `outputs`,
`module`, `input_shapes`), so it can join the per-task graph specs of `runtime/` as they come.
The written file is loaded back and run on a batch of another size than the traced one; the largest
difference relative to the output's range must stay within `tolerance`, else `ExportError` and no file.
"""
from __future__ import annotations

import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..enums import Task
from ..errors import ExportError, InputError
from ..fileutil import atomic_path
from ..models.base import VisionModel, ZooModel
from ..models.raft import RAFT
from ..optional import require
from .export import (
    OPSET,
    TOLERANCE,
    ExportFormat,
    ExportResult,
    describe,
    read_onnx_info,
    relative_difference,
    set_onnx_metadata,
)
from .export import export_model as export_image_model
from .metadata import ModelInfo, model_info

log = logging.getLogger("visionzoo")
DEFAULT_FLOW_SIZE = (360, 640)
TRACE_BATCH, CHECK_BATCH = 2, 3


@dataclass(frozen=True)
class TaskExport:
    path: Path
    task: Task
    inputs: dict[str, tuple[int | str, ...]]  # name -> shape ("batch" where free)
    outputs: tuple[str, ...]
    max_rel_diff: dict[str, float]


class VideoGraph:
    """Clips of the recipe's length and crop in; logits and the pooled pre-logits out."""

    task = Task.VIDEO
    outputs = ("logits", "embedding")

    class Module(nn.Module):
        def __init__(self, model: ZooModel):
            super().__init__()
            self.model = model

        def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.model.forward_features(clips)
            return self.model.forward_head(features), self.model.forward_head(features, pre_logits=True).flatten(1)

    def __init__(self, net: ZooModel):
        p = net.card_required.preprocess
        if p.clip_len is None or p.crop_size is None:
            raise InputError(f"{net.arch}: its preprocessing has no clip length and crop; export a video model")
        self.frames, self.size = p.clip_len, p.crop_size

    def inputs(self) -> dict[str, tuple[int | str, ...]]:
        return {"clips": ("batch", 3, self.frames, self.size, self.size)}

    def module(self, net: VisionModel) -> nn.Module:
        if not isinstance(net, ZooModel):
            raise InputError(f"a {net.task.value} model has no video graph")
        return self.Module(net)

    def input_shapes(self, batch: int) -> tuple[tuple[int, ...], ...]:
        return ((batch, 3, self.frames, self.size, self.size),)


class FlowGraph:
    """Two frames of the export's size in ([-1, 1], the weights' recipe); RAFT's last flow estimate out."""

    task = Task.OPTICAL_FLOW
    outputs = ("flow",)

    class Module(nn.Module):
        def __init__(self, model: RAFT, updates: int):
            super().__init__()
            self.model, self.updates = model, updates

        def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.model(image1, image2, num_flow_updates=self.updates, all_estimates=False)[-1],)

    def __init__(self, net: RAFT, size: tuple[int, int] = DEFAULT_FLOW_SIZE, updates: int = 12):
        height, width = size
        if height % 8 or width % 8 or min(height, width) < net.min_size:
            raise InputError(f"flow graphs take frames whose sides are multiples of 8 and at least {net.min_size}; "
                             f"got {height}x{width} (HxW)")
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 1:
            raise InputError(f"updates must be an integer >= 1, got {updates!r}")
        self.height, self.width, self.updates = height, width, updates

    def inputs(self) -> dict[str, tuple[int | str, ...]]:
        shape = ("batch", 3, self.height, self.width)
        return {"image1": shape, "image2": shape}

    def module(self, net: VisionModel) -> nn.Module:
        if not isinstance(net, RAFT):
            raise InputError(f"a {net.task.value} model has no flow graph")
        return self.Module(net, self.updates)

    def input_shapes(self, batch: int) -> tuple[tuple[int, ...], ...]:
        return ((batch, 3, self.height, self.width),) * 2


def _random_inputs(shapes: tuple[tuple[int, ...], ...], seed: int, low: float = -1.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(*shape, generator=g) * (1 - low) + low for shape in shapes)


def export_task_onnx(net: VisionModel, out: str | os.PathLike, *, flow_size: tuple[int, int] = DEFAULT_FLOW_SIZE,
                     updates: int = 12, tolerance: float = TOLERANCE, verify: bool = True) -> TaskExport:
    """Export a video classifier or an optical-flow model to ONNX and check it with ONNX Runtime."""
    onnx = require("onnx")
    net = net.eval()
    spec: VideoGraph | FlowGraph
    if net.task is Task.VIDEO and isinstance(net, ZooModel):
        spec, info = VideoGraph(net), model_info(net)
    elif net.task is Task.OPTICAL_FLOW and isinstance(net, RAFT):
        spec = FlowGraph(net, flow_size, updates)
        card = net.card_required
        info = ModelInfo(arch=card.architecture, preprocess=card.preprocess, input_size=0, num_classes=0,
                         embedding_dim=0, weights=card.weights_name, task=card.task)
    else:
        raise InputError(f"export_task_onnx exports video and optical-flow models, not {net.task.value} ones")
    graph = spec.module(net).eval()
    names = list(spec.inputs())
    axes = {name: {0: "batch"} for name in (*names, *spec.outputs)}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on sizes read from tensors: fixed here, checked below
            torch.onnx.export(graph, _random_inputs(spec.input_shapes(TRACE_BATCH), seed=0), buf,  # type: ignore[arg-type]
                              dynamo=False,
                              opset_version=OPSET, input_names=names, output_names=list(spec.outputs),
                              dynamic_axes=axes, do_constant_folding=True)
    except Exception as e:  # noqa: BLE001  (any exporter failure is reported as one)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{info.arch} cannot be exported to ONNX: {first}") from None
    proto = onnx.load_from_string(buf.getvalue())
    set_onnx_metadata(proto, info)
    extra: dict[str, Any] = {"inputs": {k: list(v) for k, v in spec.inputs().items()}, "outputs": list(spec.outputs)}
    if isinstance(spec, FlowGraph):
        extra["flow_updates"] = spec.updates
    entry = proto.metadata_props.add()
    entry.key, entry.value = "visionzoo_graph", json.dumps(extra)
    out = Path(out).expanduser()
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
        diffs = _check(graph, tmp, spec, tolerance) if verify else {}
    log.info("exported %s to %s (%s graph)", info.arch, out, spec.task.value)
    return TaskExport(out, spec.task, spec.inputs(), spec.outputs, diffs)


def _check(graph: nn.Module, path: Path, spec: VideoGraph | FlowGraph, tolerance: float) -> dict[str, float]:
    ort = require("onnxruntime")
    inputs = _random_inputs(spec.input_shapes(CHECK_BATCH), seed=1)
    with torch.inference_mode():
        expected = [t.float().numpy() for t in graph(*inputs)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(spec.outputs), {name: x.numpy() for name, x in zip(spec.inputs(), inputs, strict=True)})
    diffs = {name: relative_difference(np.asarray(g), e) for name, g, e in zip(spec.outputs, got, expected,
                                                                                 strict=True)}
    worst = max(diffs, key=lambda k: diffs[k])
    if not diffs[worst] <= tolerance:  # also catches NaN
        raise ExportError(f"the ONNX export of this {spec.task.value} model does not reproduce PyTorch: max relative "
                          f"difference {diffs[worst]:.2e} on '{worst}' exceeds {tolerance:g}")
    return diffs


def export_model(model, fmt: ExportFormat | str, out: str | os.PathLike, *, input_size: int | None = None,
                 verify: bool = True, tolerance: float = TOLERANCE) -> ExportResult:
    """`runtime.export.export_model` for every task: video classifiers and optical-flow models go to
    `export_task_onnx` (ONNX only; `input_size` N exports a flow graph for N x N frames), the others to
    the image exporter."""
    from ..enums import parse_enum
    from ..factory import resolve_model

    net = resolve_model(model).eval()
    if net.task not in (Task.VIDEO, Task.OPTICAL_FLOW):
        return export_image_model(net, fmt, out, input_size=input_size, verify=verify, tolerance=tolerance)
    if parse_enum(ExportFormat, fmt, "export format") is not ExportFormat.ONNX:
        raise InputError(f"{net.arch} is a {net.task.value} model: it exports to ONNX (--format onnx)")
    if net.task is Task.VIDEO and input_size is not None:
        raise InputError(f"{net.arch} is exported for its recipe's clip (frames and crop); fine-tune it with "
                         f"--image-size / --clip-len for another size")
    size = (input_size, input_size) if input_size is not None else DEFAULT_FLOW_SIZE
    done = export_task_onnx(net, out, flow_size=size, verify=verify, tolerance=tolerance)
    info = read_onnx_info(done.path)
    if info is None:
        raise ExportError(f"{done.path}: the export wrote no metadata")
    return ExportResult(done.path, ExportFormat.ONNX, info, done.max_rel_diff, "torch.onnx (TorchScript)")


def describe_export(result: ExportResult) -> str:
    """`runtime.export.describe` with the inputs of video and flow graphs (clips, frame pairs)."""
    if result.info.task not in (Task.VIDEO, Task.OPTICAL_FLOW):
        return describe(result)
    onnx = require("onnx")
    props = {p.key: p.value for p in onnx.load(str(result.path), load_external_data=False).metadata_props}
    graph = json.loads(props.get("visionzoo_graph", "{}"))
    inputs = ", ".join(f"{name} {' x '.join('N' if d == 'batch' else str(d) for d in shape)}"
                       for name, shape in graph.get("inputs", {}).items())
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in result.max_rel_diff.items())
    check = f"verified with ONNX Runtime (max relative difference: {diffs})" if diffs else "not verified"
    size = result.path.stat().st_size / 2**20
    return f"{result.path} (onnx, {size:.1f} MiB, {result.info.task.value} graph, input {inputs}): {check}"
