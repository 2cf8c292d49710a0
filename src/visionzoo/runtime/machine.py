"""The machine inference runs on: what its processor computes natively, and how its cores are shared.

    capabilities().native_bf16      # does this CPU run bfloat16 in hardware (AVX512-BF16, AMX)?
    split_cores(decoding=True)      # CoreBudget(workers=1, threads=1, cores=2) on two cores

Native bfloat16 is the one place the rest of the runtime asks: `auto` measures bfloat16
candidates only where it is native, since emulated bfloat16 is slower than float32 and
rounds more. It is read from the libraries that would run it: torch's CPU capability
(`torch.backends.cpu.get_cpu_capability()` and its AVX512-BF16 / AMX probes) and OpenVINO's
`OPTIMIZATION_CAPABILITIES` (which lists `BF16` where its CPU plugin runs bfloat16 natively).
`VISIONZOO_NATIVE_BF16=0` (or `1`) overrides both: a way to see what `auto` does on a CPU
without (or with) it.

Cores: a pipeline that decodes images in worker processes while a runtime computes with
its own threads must not ask for more than the cores it has: oversubscribed threads wait
for each other (OpenMP and oneDNN threads spin at barriers) and every stage slows down.
`split_cores` divides the available cores between decoding processes and compute threads
so that workers + threads <= cores; the main process, which runs the model, decodes too
whenever it would otherwise wait (`data/loader.py`), so no core idles.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..data.loader import available_cpus
from ..errors import InputError
from ..optional import available

FORCE_BF16_ENV = "VISIONZOO_NATIVE_BF16"


@dataclass(frozen=True)
class Capabilities:
    """What this machine's CPU (and GPU, when there is one) runs natively."""

    torch_isa: str  # torch's CPU kernel level: DEFAULT, AVX2, AVX512, AVX512_BF16, AMX, ...
    torch_bf16: bool  # torch's CPU kernels have native bfloat16 (AVX512-BF16 or AMX)
    openvino: tuple[str, ...] | None  # OpenVINO's CPU OPTIMIZATION_CAPABILITIES; None when not installed
    forced: bool | None = None  # VISIONZOO_NATIVE_BF16, when set

    @property
    def openvino_bf16(self) -> bool:
        if self.forced is not None:
            return self.forced and self.openvino is not None
        return self.openvino is not None and "BF16" in self.openvino

    @property
    def native_bf16(self) -> bool:
        """Whether bfloat16 is worth measuring on the CPU (torch's or OpenVINO's kernels)."""
        if self.forced is not None:
            return self.forced
        return self.torch_bf16 or self.openvino_bf16

    def bf16_for(self, backend: str) -> bool:
        """Native bfloat16 for one backend (`torch` or `openvino`; ONNX Runtime's CPU kernels are float32)."""
        if backend == "openvino":
            return self.openvino_bf16
        if backend == "torch":
            return self.forced if self.forced is not None else self.torch_bf16
        return False

    def describe(self) -> str:
        """One line: what decides bfloat16 here, e.g. `no native bfloat16 (torch: AVX2; OpenVINO: FP32, INT8)`."""
        ov = ", ".join(self.openvino) if self.openvino is not None else "not installed"
        found = f"torch: {self.torch_isa}; OpenVINO: {ov}"
        if self.forced is not None:
            return (f"native bfloat16 forced {'on' if self.forced else 'off'} by {FORCE_BF16_ENV}="
                    f"{int(self.forced)} (the CPU: {found})")
        return f"{'native' if self.native_bf16 else 'no native'} bfloat16 ({found})"

    def fingerprint(self) -> dict[str, object]:
        """What a cached measurement depends on."""
        return {"torch_isa": self.torch_isa, "torch_bf16": self.torch_bf16, "openvino": self.openvino,
                "forced": self.forced}


def capabilities() -> Capabilities:
    """This machine's capabilities (probed once; `VISIONZOO_NATIVE_BF16` read on every call)."""
    isa, torch_bf16, openvino = _probe()
    return Capabilities(isa, torch_bf16, openvino, _forced())


@functools.cache
def _probe() -> tuple[str, bool, tuple[str, ...] | None]:
    isa = torch.backends.cpu.get_cpu_capability()
    torch_bf16 = any(getattr(torch.cpu, probe, lambda: False)()
                     for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    openvino = None
    if available("openvino"):
        import openvino as ov

        try:
            openvino = tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        except RuntimeError:  # no CPU plugin in this build
            openvino = ()
    return isa, torch_bf16, openvino


@functools.cache
def int8_saturates() -> bool:
    """Whether int8 kernels can saturate on this CPU: x86 without VNNI multiplies uint8 activations by
    int8 weights with an instruction (`vpmaddubsw`) whose 16-bit sums overflow for large values, which
    ONNX Runtime documents as the reason for 7-bit weights (`reduce_range`) on AVX2 and AVX-512
    without VNNI. VNNI's dot product (and other architectures' kernels) accumulate in 32 bits."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return x86 and not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


def _forced() -> bool | None:
    value = os.environ.get(FORCE_BF16_ENV, "").strip().lower()
    if not value:
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise InputError(f"{FORCE_BF16_ENV}={value!r}: use 1 (simulate native bfloat16) or 0 (simulate none)")


def cuda_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# -- sharing the cores -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CoreBudget:
    """How a decode-and-infer pipeline uses the cores: `workers` decoding processes, `threads`
    compute threads for the model (the main process, which also decodes while it waits)."""

    workers: int
    threads: int
    cores: int

    @property
    def oversubscribed(self) -> bool:
        return self.workers + self.threads > self.cores

    def describe(self) -> str:
        return (f"{self.cores} cores: {self.workers} decoding worker{'s' if self.workers != 1 else ''} + "
                f"{self.threads} compute thread{'s' if self.threads != 1 else ''}")


def split_cores(*, workers: int | None = None, threads: int | None = None, decoding: bool = True,
                cores: int | None = None, infer_share: float | None = None) -> CoreBudget:
    """Decoding workers and compute threads with workers + threads <= cores.

    Args:
        workers, threads: what the user asked for; a given value is kept (forced), the other
            takes the cores left (at least one compute thread).
        decoding: whether images are to be decoded alongside the model (False: the model gets
            every core, as for a benchmark or already decoded tensors).
        cores: the cores to share (default: those this process may run on).
        infer_share: the model's estimated share of the work per image (its compute time over
            compute plus decoding); None: an even split.
    """
    cores = cores or available_cpus()
    if not decoding:
        return CoreBudget(0 if workers is None else workers, threads or cores, cores)
    if workers is not None and threads is not None:
        return CoreBudget(workers, threads, cores)
    if threads is not None:
        return CoreBudget(max(0, cores - threads), threads, cores)
    if workers is not None:
        return CoreBudget(workers, max(1, cores - workers), cores)
    if cores == 1:
        return CoreBudget(0, 1, 1)
    share = 0.5 if infer_share is None else min(max(infer_share, 0.0), 1.0)
    threads = min(max(1, round(cores * share)), cores - 1)
    return CoreBudget(cores - threads, threads, cores)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's (process-wide) compute threads set to `threads` for a while (None: left as they are)."""
    saved = torch.get_num_threads()
    if not threads or threads == saved:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
