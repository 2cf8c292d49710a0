"""Inference backends: one `Runner` interface over PyTorch, ONNX Runtime and OpenVINO.

    runner = open_runner("efficientnet_lite0", "openvino")      # exported once, cached
    runner = open_runner("lite0.int8.onnx", "onnxruntime")       # an exported or quantized file
    logits, embedding = runner(images)                           # (N, 3, S, S) float32 tensors
    logits = runner.logits(images)                               # the main output alone

Every runner takes the batches of the one preprocessing pipeline (`data/loader.py`, with
the recipe in `runner.preprocess`) and returns float32 tensors: the outputs of the model's
task graph (`graphs.py`), in order: a classifier's logits and pooled embeddings, a
segmentation model's per-pixel logits at the input's size, a detector's boxes, scores and
(int64) labels for one image.

- `torch`: the model itself with the cheap wins (`torch_opt.py`: BatchNorm folded into
  convolutions, channels-last), run under `torch.inference_mode`.
- `onnxruntime`: the model's ONNX export (`cache.py`: exported and verified once, cached
  next to the weights) in an ONNX Runtime session with all graph optimisations.
- `openvino`: the same ONNX file compiled by OpenVINO for each batch shape it meets (a
  static shape lets it choose kernels for that shape),
  in float32 unless `precision="bf16"` (OpenVINO would otherwise pick bf16 on CPUs with
  AVX512-BF16 or AMX, which is not the float32 model).
- `auto` (backend, precision or both): the fastest installed backend and precision whose
  top-1 agrees with float32 PyTorch, measured once per model and machine (`autotune.py`);
  `runner.choice` says what was chosen and why.

A quantized (int8) ONNX file from `quantize` runs on both runtimes the same way.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import numpy as np
import torch

from ..enums import Precision, Task, parse_enum
from ..errors import CheckpointError, InputError
from ..models.base import VisionModel, ZooModel
from ..optional import available, require
from .metadata import ModelInfo, model_info

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from .autotune import Backends, Choice

log = logging.getLogger("visionzoo")
DEPLOYED_SUFFIXES = (".onnx",)  # model files the runtimes read directly


class Backend(str, Enum):
    AUTO = "auto"  # the fastest that agrees with float32 PyTorch, measured (autotune.py)
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class Runner:
    """A model ready for inference on one backend. Call it with a batch of the task graph's inputs
    (a classifier's: (N, 3, S, S) float32); it returns the graph's outputs."""

    backend: Backend
    precision: Precision = Precision.FP32
    info: ModelInfo
    source: str  # the model or file it runs
    path: Path | None = None  # the model file, for the runtimes
    choice: Choice | None = None  # what `auto` chose and why, when it chose this runner

    @property
    def preprocess(self):
        return self.info.preprocess

    @property
    def categories(self) -> tuple[str, ...] | None:
        return self.info.classes

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def arch(self) -> str:
        return self.info.arch

    @property
    def size_bytes(self) -> int:
        """The model's size: its file for the runtimes, its parameters and buffers for torch."""
        return self.path.stat().st_size if self.path is not None else 0

    @property
    def task(self) -> Task:
        return self.info.task

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)[0]

    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        if self.info.embedding_dim is None:
            raise InputError(f"{self.arch} is a {self.task.value} model: it has no embedding output")
        return self(images)[1]

    def describe(self) -> str:
        return f"{self.arch} on {self.backend.value} ({self.precision.value}, {self.source})"

    @property
    def torch_net(self) -> torch.nn.Module | None:
        """The PyTorch model this runner runs (what Grad-CAM needs), or None (a runtime's file)."""
        return None

    def _check(self, images: torch.Tensor) -> None:
        self.info.graph.check(self.info, (images,), self.describe())

    def _names(self) -> tuple[list[str], list[str]]:
        graph = self.info.graph
        return graph.names(graph.inputs(self.info)), graph.names(graph.outputs(self.info))


class TorchRunner(Runner):
    backend = Backend.TORCH

    def __init__(self, net: VisionModel, *, device: str | torch.device = "cpu", optimize: bool = True,
                 precision: Precision | str = Precision.FP32, copy: bool = True):
        from .torch_opt import optimize_for_inference

        self.precision = Precision(precision)
        if self.precision is Precision.INT8:
            raise InputError("the torch backend runs float models; run an int8 file from `visionzoo quantize` "
                             "with --backend onnxruntime or openvino")
        self.device = torch.device(device)
        channels = _input_channels(net)
        if channels not in (None, 3):
            raise InputError(f"{net.arch} takes {channels}-channel inputs, but images are decoded to RGB; run a "
                             f"3-channel model (in_chans=3)")
        self.info = model_info(net)
        self.source = net.weights_source or net.arch or type(net).__name__
        self.optimized = optimize
        # folding changes weights: the caller's model is copied first, so it stays as it was
        self.net = (optimize_for_inference(net, inplace=not copy) if optimize else net.eval()).to(self.device)
        self._size = sum(t.numel() * t.element_size() for t in (*self.net.parameters(), *self.net.buffers()))

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def torch_net(self) -> torch.nn.Module | None:
        return self.net

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The batch on the model's device, in the memory format the model runs fastest with."""
        x = images.to(self.device)
        if self.optimized and x.ndim in (4, 5):
            return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        return x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision is Precision.BF16)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode(), self._autocast():
            outputs = self.info.graph.run(self.net, self.prepare(images))
        return tuple((t.float() if t.is_floating_point() else t).cpu() for t in outputs)  # (labels stay int64)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            return self.info.graph.first(self.net, self.prepare(images)).float().cpu()

    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        if self.info.embedding_dim is None:
            return super().embeddings(images)  # refused with the reason
        net = self.net
        if not isinstance(net, ZooModel):  # a graph with an embedding is a classifier's (graphs.py)
            raise RuntimeError(f"{self.arch}: an embedding output without a classifier to compute it")
        with torch.inference_mode(), self._autocast():
            features = net.forward_features(self.prepare(images))
            return net.forward_head(features, pre_logits=True).flatten(1).float().cpu()


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime, in two modes chosen per batch. A small batch runs on one session using
    every thread. A batch of at least `STREAM_MIN` images per thread is split into one part
    per thread, each run by a single-threaded session at the same time (data parallelism):
    small and depthwise convolutions split poorly across threads, whole images split
    perfectly (benchmarks/deploy_speed.py, batch 32 on 2 cores: 1.01x plain ONNX Runtime on
    ResNet-50, 1.10x on EfficientNet-B0, 1.12x on MobileNetV3-Large). The second session holds its own copy of the
    weights; `split_batches=False` saves that memory."""

    backend = Backend.ONNXRUNTIME
    STREAM_MIN = 4  # images per thread from which a batch is split

    def __init__(self, path: str | os.PathLike, info: ModelInfo, *, threads: int | None = None,
                 split_batches: bool = True):
        self._ort = require("onnxruntime")
        from ..data.loader import available_cpus

        self.path, self.info, self.source = Path(path), info, str(path)
        self.precision = Precision(info.precision)
        self.threads = threads or available_cpus()
        self.split_batches = split_batches and self.threads > 1
        self.session = self._session(self.threads)
        self._single: Any = None  # the single-threaded session and its thread pool, made on first use
        self._pool: ThreadPoolExecutor | None = None

    def _session(self, threads: int):
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        try:
            return self._ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types for any file it refuses
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load it ({_one_line(e)})") from None

    def _run_split(self, x: np.ndarray) -> list[np.ndarray]:
        if self._pool is None:  # made together with the single-threaded session
            from concurrent.futures import ThreadPoolExecutor

            self._single = self._session(1)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="visionzoo-ort")
        (name,), outputs = self._names()
        parts = np.array_split(x, self.threads)
        results = list(self._pool.map(lambda part: self._single.run(outputs, {name: part}), parts))
        return [np.concatenate([r[i] for r in results]) for i in range(len(outputs))]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check(images)
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        if self.split_batches and len(x) >= self.STREAM_MIN * self.threads:
            results = self._run_split(x)
        else:
            (name,), outputs = self._names()
            results = self.session.run(outputs, {name: x})
        return tuple(torch.from_numpy(r) for r in results)

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)


class OpenVINORunner(Runner):
    backend = Backend.OPENVINO
    MAX_SHAPES = 4  # compiled input shapes kept (the full batch and a last, partial one, mostly)

    def __init__(self, path: str | os.PathLike, info: ModelInfo, *, threads: int | None = None,
                 precision: Precision | str = Precision.FP32):
        ov = require("openvino")
        self.path, self.info, self.source = Path(path), info, str(path)
        requested = Precision(precision)
        self.precision = Precision.INT8 if info.precision == Precision.INT8.value else requested
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own types for any file it refuses
            raise CheckpointError(f"{path}: OpenVINO cannot load it ({_one_line(e)})") from None
        self.config = {"NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "bf16" if requested is Precision.BF16 else "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.compiled: OrderedDict[tuple[int, ...], tuple] = OrderedDict()

    def _request(self, shape: tuple[int, ...]):
        if not self.info.graph.static_shapes:
            shape = ()  # one compilation for every input size (detection: see GraphSpec.static_shapes)
        if shape in self.compiled:
            self.compiled.move_to_end(shape)
            return self.compiled[shape]
        model = self.model.clone()
        (name,), outputs = self._names()
        if shape:
            model.reshape({name: list(shape)})
        compiled = self.core.compile_model(model, "CPU", self.config)
        entry = (compiled.create_infer_request(), [compiled.output(o) for o in outputs])
        self.compiled[shape] = entry
        if len(self.compiled) > self.MAX_SHAPES:
            self.compiled.popitem(last=False)
        return entry

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check(images)
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        request, outputs = self._request(tuple(x.shape))
        (name,), _ = self._names()
        result = request.infer({name: x})
        return tuple(torch.from_numpy(_float32_or_int64(result[o])) for o in outputs)


# bfloat16 with float32 near ties: rows whose two leading class probabilities are closer than this run again
RECHECK_MARGIN = 0.05


def leading_gap(probs: torch.Tensor) -> torch.Tensor:
    """How far apart the two most probable classes of each row of `probs` (N, classes) are."""
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    return top2[:, 0] - top2[:, -1]


class RecheckRunner(Runner):
    """A classifier run fast in bfloat16, its near ties run again in float32: float32's answers at
    close to bfloat16's speed.

    bfloat16 keeps 8 bits of mantissa, so it moves class probabilities by up to a few hundredths
    (EfficientNet-Lite0 on `auto`'s check set: at most 0.045 between the two leading classes).
    Where the two leading classes are within `RECHECK_MARGIN` the top-1 may be float32's or not, so those
    images (a minority: most answers are clear) are classified again by `exact`, the same model in
    float32, and their logits replaced. The others keep bfloat16's logits (the top-1 is float32's;
    the probabilities differ by bfloat16's rounding). Embeddings are the fast runner's.

    The rows run again go through `exact` in chunks of `CHUNK` (the last one padded), so that a
    runtime that compiles per input shape (OpenVINO) compiles one more shape, not one per count.
    """

    CHUNK = 4

    def __init__(self, fast: Runner, exact: Runner, margin: float = RECHECK_MARGIN):
        self.fast, self.exact, self.margin = fast, exact, margin
        self.backend, self.precision, self.info = fast.backend, fast.precision, fast.info
        self.source, self.path = fast.source, fast.path
        self.rows_seen = self.rows_rechecked = 0  # how many rows came, and how many were near ties

    @property
    def size_bytes(self) -> int:
        return self.fast.size_bytes

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.fast(images)
        return (self._rechecked(images, outputs[0]), *outputs[1:])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._rechecked(images, self.fast.logits(images))

    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return self.fast.embeddings(images)

    @property
    def torch_net(self) -> torch.nn.Module | None:
        return self.exact.torch_net

    def _rechecked(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        rows = (leading_gap(torch.softmax(logits.float(), dim=1)) < self.margin).nonzero().flatten()
        self.rows_seen += len(logits)
        self.rows_rechecked += len(rows)
        if len(rows):
            logits = logits.clone()
            for start in range(0, len(rows), self.CHUNK):
                chunk = rows[start:start + self.CHUNK]
                padded = torch.cat([chunk, chunk[:1].expand(self.CHUNK - len(chunk))])
                logits[chunk] = self.exact.logits(images[padded])[:len(chunk)].to(logits.dtype)
        return logits

    def describe(self) -> str:
        return (f"{self.arch} on {self.backend.value} ({self.precision.value}, near ties again in "
                f"{self.exact.precision.value}, {self.source})")


def _float32_or_int64(array: np.ndarray) -> np.ndarray:
    """An output as the runners return it: float32, or int64 for integer outputs (a detector's labels)."""
    return np.array(array, dtype=np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32)


def _input_channels(net: VisionModel) -> int | None:
    """The channels the model's first convolution takes (None when it has none to look at)."""
    if not isinstance(net, ZooModel):  # only a classifier names its first convolution (`first_conv`)
        return None
    try:
        conv = net.get_submodule(net.first_conv)
    except AttributeError:
        return None
    return conv.in_channels if isinstance(conv, torch.nn.Conv2d) else None


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def is_model_file(model: object) -> TypeGuard[str | os.PathLike]:
    """Whether `model` names an exported model file (rather than a model name or bundle)."""
    return (isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() in DEPLOYED_SUFFIXES
            and Path(model).expanduser().is_file())


def open_runner(model, backend: Backend | str = Backend.AUTO, *, threads: int | None = None,
                device: str | torch.device = "cpu", precision: Precision | str = Precision.AUTO,
                optimize: bool = True, batch_size: int = 32) -> Runner:
    """A runner for `model`: a name (`arch[.TAG]`, default weights), a bundle, a visionzoo model,
    an ONNX file written by `export`/`quantize` (with its metadata), or a runner (returned as is).

    Args:
        backend: `torch`, `onnxruntime`, `openvino`, or `auto`: the fastest installed one whose
            top-1 agrees with float32 PyTorch, measured once per model and machine (`autotune.py`).
        threads: compute threads for the runtimes (default: theirs, one per core). The torch
            backend uses torch's global setting (`torch.set_num_threads`).
        device: torch backend only.
        precision: `fp32`, `bf16` (torch autocast, OpenVINO inference precision), or `auto`
            (bf16 is measured where the hardware runs it natively).
        optimize: torch backend: fold BatchNorms and use channels-last (False: the model as is).
        batch_size: the batch size `auto` measures the speed at.
    """
    if isinstance(model, Runner):
        return model
    if not isinstance(model, (str, os.PathLike, VisionModel)):
        raise InputError(f"model must be a name, a bundle, a model file or a visionzoo model, got "
                         f"{type(model).__name__}")
    backend = parse_enum(Backend, backend, "backend")
    precision = parse_enum(Precision, precision, "precision")
    if backend not in (Backend.TORCH, Backend.AUTO) and torch.device(device).type != "cpu":
        raise InputError(f"the {backend.value} backend runs on the CPU; use --backend torch for device {device}")
    if (isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() in DEPLOYED_SUFFIXES
            and not is_model_file(model)):
        raise InputError(f"{model}: no such model file")
    if backend is Backend.AUTO or precision is Precision.AUTO:
        from .autotune import open_auto

        return open_auto(model, backend.value, precision, auto_support(), threads=threads, device=device,
                         optimize=optimize, batch_size=batch_size)
    if is_model_file(model):
        path = Path(model).expanduser()
        if backend is Backend.TORCH:
            raise InputError(f"{path} is an ONNX file: run it with --backend onnxruntime or openvino "
                             f"(the torch backend takes a model name or bundle)")
        from .export import read_onnx_info

        info = read_onnx_info(path)
        if info is None:
            raise InputError(f"{path} has no visionzoo metadata (preprocessing, classes); export it with "
                             f"`visionzoo export` or `visionzoo quantize`")
        return _file_runner(path, info, backend, threads, precision)

    from ..factory import resolve_model

    # the runners are written against the classifier interface (ZooModel); nothing else reaches them today
    net = cast(ZooModel, resolve_model(model))
    if backend is Backend.TORCH:
        # a model built here from a name is ours to optimise in place; the caller's is copied
        return TorchRunner(net, device=device, optimize=optimize, precision=precision,
                           copy=isinstance(model, VisionModel))
    if backend is Backend.OPENVINO:
        require("openvino")  # fail before exporting
    else:
        require("onnxruntime")
    from .cache import exported_onnx

    path = exported_onnx(net)
    return _file_runner(path, model_info(net), backend, threads, precision)


def _file_runner(path: Path, info: ModelInfo, backend: Backend, threads: int | None, precision: Precision) -> Runner:
    if backend is Backend.OPENVINO:
        return OpenVINORunner(path, info, threads=threads, precision=precision)
    if precision is Precision.BF16:
        raise InputError("bf16 runs on the torch and openvino backends; ONNX Runtime's CPU kernels are float32")
    return OnnxRuntimeRunner(path, info, threads=threads)


def auto_support() -> Backends:
    """What `auto` (`autotune.py`, which cannot import this module) needs from it."""
    from .autotune import Backends

    return Backends(open_runner, tuple(b.value for b in installed_backends()), is_model_file, RecheckRunner)


def installed_backends() -> list[Backend]:
    """The backends that can run here (torch always; the runtimes when their packages are installed)."""
    found = [Backend.TORCH]
    if available("onnxruntime") and available("onnx"):
        found.append(Backend.ONNXRUNTIME)
    if available("openvino") and available("onnx"):
        found.append(Backend.OPENVINO)
    return found
