"""Export a model to ONNX, TorchScript or a PT2 archive, verified against PyTorch.

    result = export_model("efficientnet_lite0", "onnx", "lite0.onnx")
    result.max_rel_diff        # {'logits': 3.1e-07, 'embedding': 2.4e-07}

What an exported graph takes and returns is its task's (`graphs.py`): a classifier takes
`images` (N, 3, S, S) float32, normalised by the model's own preprocessing, with a free batch
size N and the square size S of the preprocessing's crop, and returns `logits` (N, classes)
and `embedding` (N, D), the pooled pre-logits that `embed` writes; a segmentation model takes
`images` of any height and width and returns `logits` (N, classes, H, W) at the input's size.
The model's description (architecture, task, classes, preprocessing: see `metadata.py`) is
embedded in the file. After writing, the file is loaded back, run on inputs of other sizes
than the ones it was traced with (another batch size; for free heights and widths, two other
sizes), and compared with PyTorch: the largest difference relative to the output's range must
stay within `tolerance` (1e-4 in float32), else `ExportError` and no file. The file is
written under a temporary name and renamed only once verified, by one run at a time
(`fileutil.exclusive`; the temporary files of a killed run are removed by the next).

ONNX goes through torch's TorchScript-based exporter, which handles every family of the
zoo (the dynamo exporter of torch 2.13 fails on Swin and MaxViT) in a fraction of the
time; the dynamo exporter is the fallback where the other is missing or fails.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from ..enums import parse_enum
from ..errors import CheckpointError, ExportError, InputError
from ..fileutil import atomic_path, exclusive
from ..models.base import VisionModel, ZooModel
from ..optional import require
from .graphs import GraphSpec, relative_difference  # noqa: F401  (re-exported: its home was here)
from .metadata import EXTRA_FILE, ModelInfo, model_info

log = logging.getLogger("visionzoo")
TOLERANCE = 1e-4  # float32 export check: max |exported - torch| / max |torch|, per output
OPSET = 17


class ExportFormat(str, Enum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    PT2 = "pt2"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: ExportFormat
    info: ModelInfo  # what the file says about itself
    max_rel_diff: dict[str, float]  # per output: max |exported - torch| / max |torch| (empty if not verified)
    exporter: str  # which exporter wrote the graph

    @property
    def worst(self) -> float:
        return max(self.max_rel_diff.values(), default=0.0)


def export_model(model, fmt: ExportFormat | str, out: str | os.PathLike, *, input_size: int | None = None,
                 verify: bool = True, tolerance: float = TOLERANCE, wait: bool = False) -> ExportResult:
    """Export `model` (a name, bundle folder or visionzoo model) to `out` in format `fmt`.

    Args:
        input_size: a classifier's square input size (default: the preprocessing's crop, or the
            size a ViT was built for). The recipe in the file is scaled to it. Graphs with a free
            height and width (segmentation) take none.
        verify: load the written file back and compare its outputs with PyTorch's.
        tolerance: the largest accepted relative difference.
        wait: when another run is writing `out`, wait for it to finish (default: refuse with an
            `OutputBusyError` naming it).

    Raises `ExportError` when the exporter fails or the check exceeds `tolerance` (no file is
    left at `out` then), `MissingDependencyError` when the format needs a package that is not
    installed.
    """
    from ..factory import resolve_model

    fmt = parse_enum(ExportFormat, fmt, "export format")
    # the export graph is written against the classifier interface (ZooModel)
    net = cast(ZooModel, resolve_model(model).eval())
    info = _info_for(net, input_size)
    out = Path(out).expanduser()
    writer = {ExportFormat.ONNX: _write_onnx, ExportFormat.TORCHSCRIPT: _write_torchscript,
              ExportFormat.PT2: _write_pt2}[fmt]
    graph = info.graph.module(net).eval()
    sample = info.graph.trace_inputs(info)
    with exclusive(out, wait=wait), atomic_path(out) as tmp:
        exporter = writer(graph, sample, tmp, info)
        diffs = check_export(graph, tmp, fmt, info, tolerance) if verify else {}
    log.info("exported %s to %s (%s, %s)", info.arch, out, fmt.value, exporter)
    return ExportResult(out, fmt, info, diffs, exporter)


def _info_for(net: VisionModel, input_size: int | None) -> ModelInfo:
    info = model_info(net)
    if input_size is None or input_size == info.input_size:
        return info
    if not isinstance(net, ZooModel) or info.input_size is None:
        raise InputError(f"the {info.task.value} graph of {info.arch} takes inputs of any height and width; "
                         f"export it without input_size")
    if net.image_size is not None and input_size != net.image_size:
        raise InputError(f"{info.arch} is built for {net.image_size}x{net.image_size} inputs; build it with "
                         f"image_size={input_size} to export another size")
    if input_size < 8:
        raise InputError(f"input_size must be >= 8, got {input_size}")
    p = info.preprocess
    scaled = dataclasses.replace(p, crop_size=input_size,
                                 resize_size=max(input_size, round((p.resize_size or p.crop) * input_size / p.crop)))
    return dataclasses.replace(info, preprocess=scaled, input_size=input_size)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# -- ONNX ----------------------------------------------------------------------------------------

def _write_onnx(graph: nn.Module, sample: tuple[torch.Tensor, ...], path: Path, info: ModelInfo) -> str:
    onnx = require("onnx")
    try:
        proto, exporter = _onnx_torchscript(graph, sample, info), "torch.onnx (TorchScript)"
    except Exception as first:  # noqa: BLE001  (any exporter failure: try the other exporter)
        log.info("%s: the TorchScript-based ONNX exporter failed (%s); trying the dynamo exporter",
                 info.arch, _first_line(first))
        try:
            proto, exporter = _onnx_dynamo(graph, sample, info), "torch.onnx (dynamo)"
        except Exception as second:  # noqa: BLE001
            raise ExportError(f"{info.arch} cannot be exported to ONNX: {_first_line(second)} (TorchScript "
                              f"exporter: {_first_line(first)}); try --format pt2 or torchscript") from None
    set_onnx_metadata(proto, info)
    onnx.save(proto, str(path))
    return exporter


def _onnx_torchscript(graph: nn.Module, sample: tuple[torch.Tensor, ...], info: ModelInfo):
    onnx = require("onnx")
    spec = info.graph
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about sizes read from tensors (padding, window partitions): whatever it
        # bakes into the graph shows when the file is checked on other sizes than the traced ones
        warnings.simplefilter("ignore")
        # the TorchScript exporter (dynamo=False) writes to a file object too; torch's annotation lists paths only
        torch.onnx.export(graph, sample, buf, dynamo=False, opset_version=OPSET,  # type: ignore[arg-type]
                          input_names=spec.names(spec.inputs(info)), output_names=spec.names(spec.outputs(info)),
                          dynamic_axes=spec.dynamic_axes(info), do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _dynamic_shapes(spec: GraphSpec, info: ModelInfo) -> tuple[dict[int, object], ...]:
    """torch.export's description of the free axes of each input (one `Dim` per axis name)."""
    dims: dict[str, object] = {}
    shapes = []
    for tensor in spec.inputs(info):
        shapes.append({i: dims.setdefault(name, torch.export.Dim(name, min=1, max=4096) if name == "batch"
                                          else torch.export.Dim(name, min=32, max=8192))
                       for i, name in tensor.dynamic_axes.items()})
    return tuple(shapes)


def _onnx_dynamo(graph: nn.Module, sample: tuple[torch.Tensor, ...], info: ModelInfo):
    require("onnxscript")
    spec = info.graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, sample, dynamo=True, input_names=spec.names(spec.inputs(info)),
                                    output_names=spec.names(spec.outputs(info)),
                                    dynamic_shapes=_dynamic_shapes(spec, info), verbose=False)
    if program is None:  # only the TorchScript exporter returns None
        raise ExportError("the dynamo ONNX exporter returned no program")
    return program.model_proto


def set_onnx_metadata(proto, info: ModelInfo) -> None:
    """Replace the model's metadata_props with `info` (other producers' entries are kept)."""
    keep = [p for p in proto.metadata_props if p.key not in info.onnx_props()]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in info.onnx_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "visionzoo"


def read_onnx_info(path: str | os.PathLike) -> ModelInfo | None:
    """The visionzoo record in an ONNX file's metadata, or None if it has none. The file must
    parse, and every tensor stored outside it must lie in a file of its own folder (`check_external_data`)."""
    onnx = require("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's decode errors and OSErrors alike mean "not this file"
        raise CheckpointError(f"{path} is not a readable ONNX file ({_first_line(e)}); export it again") from None
    check_external_data(proto, Path(path))
    for p in proto.metadata_props:
        if p.key == "visionzoo":
            return ModelInfo.from_json(p.value, str(path))
    return None


def check_external_data(proto, path: Path) -> None:
    """Refuse an ONNX model whose tensors point outside its folder (`../../etc/shadow`, an absolute
    path, a link out) or at data its files do not hold, with one line naming the tensor."""
    onnx = require("onnx")
    folder = Path(os.path.realpath(path.parent))
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = Path(os.path.realpath(folder / location)) if location else folder
        if not location or os.path.isabs(location) or (target != folder and folder not in target.parents):
            raise CheckpointError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, outside the "
                                  f"model's folder; refused (re-export the model with its data beside it)")
        if not target.is_file():
            raise CheckpointError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which does not "
                                  f"exist; copy it next to the model")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            offset = length = -1
        if offset < 0 or length < 0 or offset + length > target.stat().st_size:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} points at bytes its data file {location!r} "
                                  f"does not hold; the model is corrupt")


def _tensors(graph):
    """Every tensor of an ONNX graph: initializers, constants in node attributes, and those of subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


# -- TorchScript and PT2 -------------------------------------------------------------------------

def _write_torchscript(graph: nn.Module, sample: tuple[torch.Tensor, ...], path: Path, info: ModelInfo) -> str:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(graph, sample, check_trace=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{info.arch} cannot be traced to TorchScript: {_first_line(e)}; try --format onnx "
                          f"or pt2") from None
    torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: info.to_json()})
    return "torch.jit.trace"


def _write_pt2(graph: nn.Module, sample: tuple[torch.Tensor, ...], path: Path, info: ModelInfo) -> str:
    free = sorted({a for t in info.graph.inputs(info) for a in t.dynamic_axes.values()} - {"batch"})
    if free:
        # measured on LR-ASPP on EfficientNet-Lite0: torch.export guards on relations between the sizes of
        # successive strides that it cannot prove for every height and width, and fails after minutes
        raise ExportError(f"{info.arch} takes a free {' and '.join(free)}, which pt2 export does not support; "
                          f"use --format onnx or torchscript")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(graph, sample, dynamic_shapes=_dynamic_shapes(info.graph, info),
                                          strict=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{info.arch} cannot be exported with torch.export: {_first_line(e)}; try --format "
                          f"onnx or torchscript") from None
    # a file object: torch.export wants a `.pt2` name, and the temporary file has another
    with open(path, "wb") as f:
        torch.export.save(program, f, extra_files={EXTRA_FILE: info.to_json()})
    return "torch.export"


def load_torch_export(path: str | os.PathLike, fmt: ExportFormat | str) -> tuple[nn.Module, ModelInfo]:
    """(callable module, record) of a TorchScript or PT2 file written by `export_model`."""
    fmt = parse_enum(ExportFormat, fmt, "export format")
    from . import detection_graph  # noqa: F401  (registers the NMS operator that a detector's graph calls)

    extra = {EXTRA_FILE: ""}
    if fmt is ExportFormat.TORCHSCRIPT:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    elif fmt is ExportFormat.PT2:
        with open(path, "rb") as f:
            module = torch.export.load(f, extra_files=extra).module()
    else:
        raise InputError(f"load_torch_export reads torchscript or pt2 files, not {fmt.value}")
    if not extra[EXTRA_FILE]:
        raise ExportError(f"{path} has no visionzoo metadata ({EXTRA_FILE}); export it with visionzoo")
    return module, ModelInfo.from_json(extra[EXTRA_FILE], str(path))


# -- verification --------------------------------------------------------------------------------

def check_export(graph: nn.Module, path: Path, fmt: ExportFormat, info: ModelInfo,
                 tolerance: float = TOLERANCE) -> dict[str, float]:
    """Run the file at `path` and PyTorch on the same inputs (each of the task's check sizes); raise
    `ExportError` above `tolerance`. Returns the largest difference of each output over the sizes."""
    spec = info.graph
    inputs, outputs = spec.names(spec.inputs(info)), spec.names(spec.outputs(info))
    if fmt is ExportFormat.ONNX:
        ort = require("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda *xs: session.run(outputs, {n: x.numpy() for n, x in zip(inputs, xs, strict=True)})  # noqa: E731
    else:
        module, _ = load_torch_export(path, fmt)
        run = lambda *xs: [t.float().numpy() for t in module(*xs)]  # noqa: E731
    found: dict[str, list[float]] = {name: [] for name in outputs}
    for xs in spec.check_inputs(info):
        with torch.inference_mode():
            expected = [t.float().numpy() for t in graph(*xs)]
            got = run(*xs)
        for name, diff in zip(outputs, spec.differences(list(got), expected), strict=True):
            found[name].append(diff)
    diffs = {name: float(np.max(values)) for name, values in found.items()}  # NaN if any is
    worst = max(diffs, key=lambda k: (np.isnan(diffs[k]), diffs[k]))
    if not diffs[worst] <= tolerance:  # also catches NaN
        raise ExportError(f"the {fmt.value} export of {info.arch} does not reproduce PyTorch: max relative "
                          f"difference {diffs[worst]:.2e} on '{worst}' exceeds {tolerance:g}; try another --format "
                          f"(or a larger --tolerance if the difference is acceptable)")
    return diffs




def describe(result: ExportResult) -> str:
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in result.max_rel_diff.items())
    size = result.path.stat().st_size / 2**20
    check = f"verified (max relative difference: {diffs})" if diffs else "not verified"
    inputs = ", ".join(t.describe() for t in result.info.graph.inputs(result.info))
    return f"{result.path} ({result.format.value}, {size:.1f} MiB, {result.exporter}, input {inputs}): {check}"


def info_json(info: ModelInfo) -> str:
    return json.dumps(info.to_dict(), indent=2)
