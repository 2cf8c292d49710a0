"""int8 post-training quantization with ONNX Runtime's quantizer, calibrated on the user's images.

    result = quantize("efficientnet_lite0", "my_photos/", "lite0.int8.onnx")
    visionzoo predict photos/ --model lite0.int8.onnx --backend openvino

Static (convolutional networks): the model's ONNX export is calibrated on a few hundred of
the user's own images, decoded and preprocessed exactly as `predict` will feed them;
activations get one uint8 scale per tensor from their observed min/max range, weights one
int8 scale per output channel (symmetric). The result is a QDQ ONNX graph (explicit
QuantizeLinear/DequantizeLinear pairs), which ONNX Runtime runs with its int8 kernels
and OpenVINO compiles to int8 kernels (VNNI/AMX where the CPU has them), so one file
serves both backends; `backend` only chooses the runtime that checks the result here.

Dynamic (networks whose work is mostly in linear layers: ViT, Swin): weights are stored in
int8 per channel and activations quantized on the fly per batch, so no calibration
images are needed. `mode="auto"` picks dynamic when linear layers hold most of the
multiply-adds (measured on one forward pass, not by family).

The file carries the model's metadata (preprocessing, classes) plus how it was quantized,
and is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.images import DEFAULT_LIMITS, DecodeLimits
from ..data.inputs import Failure, expand_inputs
from ..data.loader import image_batches
from ..enums import Precision, parse_enum
from ..errors import InputError
from ..fileutil import atomic_path, exclusive
from ..metrics import agreement
from ..models.base import ZooModel
from ..optional import available, require
from ..runtime.backends import Backend, open_runner
from ..runtime.export import set_onnx_metadata
from ..runtime.machine import int8_saturates
from ..runtime.metadata import INPUT_NAME, ModelInfo, model_info
from ..version import __version__

log = logging.getLogger("visionzoo")
DEFAULT_IMAGES = 300  # calibration images used (a random subset of larger folders)
MIN_IMAGES = 16
CALIBRATION_BATCH = 16
LINEAR_SHARE = 0.5  # auto: dynamic quantization when linear layers do more than this share of the work


class QuantMode(str, Enum):
    AUTO = "auto"
    STATIC = "static"  # calibrated activation ranges: convolutional networks
    DYNAMIC = "dynamic"  # activation ranges per batch at run time: linear-heavy networks (ViT)


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    info: ModelInfo
    mode: QuantMode
    reason: str  # why this mode
    calibration_images: int
    failures: list[Failure] = field(default_factory=list)  # calibration images that could not be read
    check_backend: str | None = None
    top1_agreement: float | None = None  # with the float32 model, on (up to 64 of) the calibration images
    size_fp32: int = 0  # bytes of the float32 ONNX file
    size_int8: int = 0

    def describe(self) -> str:
        parts = [f"{self.path} (int8 {self.mode.value}: {self.reason})",
                 f"{self.size_fp32 / 2**20:.1f} -> {self.size_int8 / 2**20:.1f} MiB"]
        if self.calibration_images:
            parts.append(f"calibrated on {self.calibration_images} images")
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement with float32 on {self.check_backend}: {self.top1_agreement:.1%}")
        return "; ".join(parts)


def quantize(model, calibration: str | os.PathLike | Sequence[str | os.PathLike] | None, out: str | os.PathLike,
             *, backend: Backend | str = Backend.AUTO, mode: QuantMode | str = QuantMode.AUTO,
             num_images: int = DEFAULT_IMAGES, seed: int = 0, check: bool = True,
             num_workers: int | None = None, limits: DecodeLimits | str | None = None,
             wait: bool = False) -> QuantizeResult:
    """Quantize `model` (a name, bundle or visionzoo model) to an int8 ONNX file at `out`.

    Args:
        calibration: images to calibrate on (files, folders, globs, lists, as `predict` takes);
            needed for static quantization, ignored for dynamic.
        backend: the runtime that checks the result (`onnxruntime` or `openvino`; `auto`:
            OpenVINO when installed). The file runs on both.
        mode: `static`, `dynamic` or `auto` (see the module docstring).
        num_images: calibration images to use; a larger set is sampled (with `seed`).
        check: compare the int8 model's top-1 with the float32 model's on up to 64 calibration images.
        limits: the decode budget of each calibration image (`DecodeLimits`, or text such as
            "pixels=200M,bytes=1G"); images that break it are left out and listed in `failures`.
        wait: when another run is writing `out`, wait for it to finish (default: refuse with an
            `OutputBusyError` naming it).
    """
    limits = DecodeLimits.parse(limits) if isinstance(limits, str) else limits or DEFAULT_LIMITS
    ort_quant = require("onnxruntime.quantization")
    require("onnx")
    backend = parse_enum(Backend, backend, "backend")
    if backend is Backend.TORCH:
        raise InputError("int8 models run on the onnxruntime and openvino backends; choose one of them")
    if backend is Backend.AUTO:
        backend = Backend.OPENVINO if available("openvino") else Backend.ONNXRUNTIME
    mode = parse_enum(QuantMode, mode, "quantization mode")
    if num_images < 1:
        raise InputError(f"num_images must be >= 1, got {num_images}")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".onnx":
        raise InputError(f"{out}: the quantized model is an ONNX file; name it .onnx")

    with exclusive(out, wait=wait):
        return _quantize(model, calibration, out, backend, mode, num_images, seed, check, num_workers, limits,
                         ort_quant)


def _quantize(model, calibration, out: Path, backend: Backend, mode: QuantMode, num_images: int, seed: int,
              check: bool, num_workers: int | None, limits: DecodeLimits, ort_quant) -> QuantizeResult:
    from ..factory import resolve_model
    from ..runtime.cache import exported_onnx

    net = resolve_model(model).eval()
    if not isinstance(net, ZooModel):
        raise InputError(f"quantize makes int8 classifiers; {net.arch or model} is a {net.task.value} model (export "
                         f"it in float32 with `visionzoo export`)")
    info = model_info(net)
    mode, reason = _choose_mode(net, info, mode)
    files: list[Path] = []
    failures: list[Failure] = []
    if mode is QuantMode.STATIC or check:
        if calibration is None:
            if mode is QuantMode.STATIC:
                raise InputError("static quantization calibrates on your images: give a folder of a few hundred "
                                 "of them (--calibration DIR)")
        else:
            files, failures = _calibration_files(calibration, num_images, seed)
    fp32 = exported_onnx(net)
    out.parent.mkdir(parents=True, exist_ok=True)
    # named as a leftover of `out`: if this run is killed, the next one on `out` removes it
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.quantize-", suffix=".part", dir=out.parent) as tmp:
        source = _preprocessed(fp32, Path(tmp) / "prepared.onnx", ort_quant)
        raw = Path(tmp) / "int8.onnx"
        if mode is QuantMode.STATIC:
            used, details, unread = _quantize_static(ort_quant, source, raw, files, info, num_workers, limits)
            failures += unread
        else:
            used, details = 0, _quantize_dynamic(ort_quant, source, raw)
        qinfo = _write_quantized(raw, out, info, details, reason)
    result = QuantizeResult(out, qinfo, mode, reason, used, failures, size_fp32=fp32.stat().st_size,
                            size_int8=out.stat().st_size)
    if check and files:
        score = top1_agreement(open_runner(net, Backend.TORCH, precision=Precision.FP32),
                               open_runner(out, backend, precision=Precision.INT8), files[:64], limits=limits)
        result = dataclasses.replace(result, check_backend=backend.value, top1_agreement=score)
        if score < 0.9:
            log.warning("%s: the int8 model agrees with float32 on only %.0f%% of the calibration images; check "
                        "its accuracy before shipping it", out, 100 * score)
    return result


def _quantize_static(ort_quant, source: Path, raw: Path, files: list[Path], info: ModelInfo,
                     num_workers: int | None, limits: DecodeLimits) -> tuple[int, dict, list[Failure]]:
    """Static QDQ quantization calibrated on `files`: (images used, details, unreadable images)."""
    reader = _CalibrationReader(files, info, num_workers, limits)
    saturates = int8_saturates()
    ort_quant.quantize_static(
        str(source), str(raw), reader, quant_format=ort_quant.QuantFormat.QDQ, per_channel=True,
        activation_type=ort_quant.QuantType.QUInt8,
        weight_type=ort_quant.QuantType.QUInt8 if saturates else ort_quant.QuantType.QInt8,
        # MinMax keeps only each tensor's min and max per batch, so memory stays small without
        # CalibMaxIntermediateOutputs, which ONNX Runtime 1.32 breaks: it drops every full group of
        # batches uncomputed (only the remainder calibrates; none left: "No data is collected")
        calibrate_method=ort_quant.CalibrationMethod.MinMax)
    if reader.used == 0:
        raise InputError(f"none of the {len(files)} calibration images could be read "
                         f"({reader.failures[0].reason if reader.failures else 'no images'})")
    details = {"mode": "static", "calibration_images": reader.used, "calibration": "minmax",
               "activations": "uint8, per tensor", "weights": _weights_note(saturates, "per channel")}
    return reader.used, details, reader.failures


def _quantize_dynamic(ort_quant, source: Path, raw: Path) -> dict:
    """Dynamic quantization of the linear layers (activation ranges per batch at run time): its details."""
    saturates = int8_saturates()
    ort_quant.quantize_dynamic(str(source), str(raw), per_channel=True,
                               weight_type=ort_quant.QuantType.QUInt8 if saturates else ort_quant.QuantType.QInt8,
                               op_types_to_quantize=["MatMul", "Gemm"])
    return {"mode": "dynamic", "activations": "uint8, per batch at run time",
            "weights": _weights_note(saturates, "per channel"), "ops": "MatMul, Gemm"}


def _weights_note(saturates: bool, granularity: str) -> str:
    """How the weights are stored. Where uint8 x int8 products saturate (x86 without VNNI, see
    `int8_saturates`) they are uint8 with a zero point: uint8 x uint8 kernels accumulate without
    overflow (measured on an AVX2 CPU, EfficientNet-Lite0: the float32 top-1 kept on 71% of 112
    photos with int8 weights, 84% with 7-bit ones, 98% with uint8)."""
    return f"uint8 asymmetric, {granularity} (this CPU has no VNNI)" if saturates else f"int8 symmetric, {granularity}"


def _write_quantized(raw: Path, out: Path, info: ModelInfo, details: dict, reason: str) -> ModelInfo:
    """The quantized graph at `out` (atomically) with the model's description and how it was quantized."""
    details.update(toolkit=f"onnxruntime {require('onnxruntime').__version__}", format="QDQ", reason=reason,
                   visionzoo_version=__version__)
    qinfo = info.with_quantization("int8", **details)
    proto = require("onnx").load(str(raw))
    set_onnx_metadata(proto, qinfo)
    with atomic_path(out) as part:
        require("onnx").save(proto, str(part))
    return qinfo


def _choose_mode(net: ZooModel, info: ModelInfo, mode: QuantMode) -> tuple[QuantMode, str]:
    if mode is not QuantMode.AUTO:
        return mode, "chosen with --mode"
    if info.input_size is None:  # only classifiers are quantized, and a classifier's graph has a size
        raise RuntimeError(f"{info.arch}: a classifier's graph without an input size")
    share = linear_share(net, info.input_size)
    if share > LINEAR_SHARE:
        return QuantMode.DYNAMIC, f"linear layers do {share:.0%} of the multiply-adds"
    return QuantMode.STATIC, f"convolutions do {1 - share:.0%} of the multiply-adds"


def linear_share(net: nn.Module, size: int) -> float:
    """The share of multiply-adds done by `nn.Linear` layers, against convolutions, on one image."""
    macs = {"linear": 0, "conv": 0}

    def hook(module, inputs, output):
        if isinstance(module, nn.Linear):
            macs["linear"] += output.numel() * module.in_features
        else:
            macs["conv"] += output.numel() * module.in_channels // module.groups * module.weight[0, 0].numel()

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    total = macs["linear"] + macs["conv"]
    return macs["linear"] / total if total else 0.0


def _calibration_files(calibration, num_images: int, seed: int) -> tuple[list[Path], list]:
    inputs = [calibration] if isinstance(calibration, (str, os.PathLike)) else list(calibration)
    files, failures = expand_inputs(inputs)
    if not files:
        raise InputError(f"no images found in {', '.join(map(str, inputs))}; give a folder of a few hundred of "
                         f"your own images to calibrate on")
    if len(files) > num_images:
        files = sorted(random.Random(seed).sample(files, num_images))
    if len(files) < MIN_IMAGES:
        log.warning("calibrating on only %d images; a few hundred typical images give better int8 ranges",
                    len(files))
    return files, failures


def _preprocessed(fp32: Path, dest: Path, ort_quant) -> Path:
    """The graph with shapes inferred and constants folded, as ONNX Runtime recommends before
    quantizing; the export itself when that step fails (it is an optimisation, not a need)."""
    try:
        ort_quant.quant_pre_process(str(fp32), str(dest), skip_symbolic_shape=True)
        return dest
    except Exception as e:  # noqa: BLE001
        log.info("quantization pre-processing skipped (%s)", e)
        return fp32


class _CalibrationReader:
    """ONNX Runtime's calibration data reader: batches of the user's images, preprocessed as predict does."""

    def __init__(self, files: list[Path], info: ModelInfo, num_workers: int | None, limits: DecodeLimits):
        self.batches = iter(image_batches(files, info.preprocess, batch_size=CALIBRATION_BATCH,
                                          num_workers=num_workers, limits=limits))
        self._pending: list[np.ndarray] = []
        self.used = 0
        self.failures: list[Failure] = []
        self.files = files

    def get_next(self):
        # one image at a time: histogram calibrators need equally shaped outputs, and a last,
        # partial batch (or a batch with a failed image) would have another shape
        while not self._pending:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.failures += [Failure(str(self.files[i]), reason) for i, reason in batch.failures]
            if batch.images is not None:
                self._pending += list(batch.images.numpy()[:, None])
        self.used += 1
        return {INPUT_NAME: self._pending.pop(0)}

    def rewind(self):  # part of the reader interface; calibration reads the data once
        pass

    # ONNX Runtime >= 1.17 iterates readers
    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def top1_agreement(reference, candidate, files: Sequence[Path], batch_size: int = 16,
                   limits: DecodeLimits = DEFAULT_LIMITS) -> float:
    """The share of `files` on which two runners give the same top-1 class (unreadable files left out)."""
    a = predictions(reference, files, batch_size, limits=limits)
    b = predictions(candidate, files, batch_size, limits=limits)
    readable = (a >= 0) & (b >= 0)
    return agreement(a[readable], b[readable])


def predictions(runner, files: Sequence[Path], batch_size: int = 32, num_workers: int | None = 0,
                limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Top-1 class of each file (-1 for an unreadable one)."""
    out = np.full(len(files), -1, dtype=np.int64)
    for batch in image_batches(list(files), runner.preprocess, batch_size=batch_size, num_workers=num_workers,
                               limits=limits):
        if batch.images is not None:
            out[np.asarray(batch.indices)] = runner.logits(batch.images).argmax(1).numpy()
    return out
