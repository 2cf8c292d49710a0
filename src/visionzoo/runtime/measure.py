"""Measuring runners honestly: latency (warm-up, repeats, median), peak memory, accuracy, the machine.

Shared by `benchmark`, `prune` and the scripts in benchmarks/.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch

from ..data.loader import available_cpus, image_batches


@dataclass(frozen=True)
class Timing:
    batch: int
    times: tuple[float, ...]  # seconds per batch, each measured run

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p50_ms(self) -> float:
        return 1000 * float(np.percentile(self.times, 50))

    @property
    def p95_ms(self) -> float:
        return 1000 * float(np.percentile(self.times, 95))

    @property
    def throughput(self) -> float:
        """Images per second at the median batch time."""
        return self.batch / self.median


def time_calls(fn: Callable[[], object], batch: int, *, warmup: int = 2, repeats: int = 10,
               min_repeats: int = 3, max_seconds: float = 30.0) -> Timing:
    """Time `fn` (one batch) after `warmup` calls: `repeats` runs, fewer (but at least
    `min_repeats`) when they would take longer than `max_seconds`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < min_repeats or time.perf_counter() - started < max_seconds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return Timing(batch, tuple(times))


KeyT = TypeVar("KeyT")


def interleaved_times(fns: Mapping[KeyT, Callable[[], object]], rounds: int, *, warmup: int = 2
                      ) -> dict[KeyT, list[float]]:
    """Seconds of each call of each function: `warmup` untimed calls each, then `rounds` rounds
    that call every function once in turn, so that a machine that speeds up or slows down
    during the run affects all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[KeyT, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def random_batch(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- memory --------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def reset_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux: `/proc/self/clear_refs` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else None


# -- accuracy ------------------------------------------------------------------------------------

def load_labelled(samples: Sequence[tuple], preprocess, *, limit: int | None = None,
                  num_workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of `(path, label)` samples, preprocessed once (exact path) so that every
    backend scores the same tensors."""
    samples = list(samples)[:limit] if limit else list(samples)
    paths = [p for p, _ in samples]
    images, labels = [], []
    for batch in image_batches(paths, preprocess, batch_size=64, num_workers=num_workers, fast=False):
        stacked = batch.stacked()
        if stacked is not None:
            images.append(stacked)
            labels += [samples[i][1] for i in batch.indices]
    if not images:
        return torch.zeros(0, 3, preprocess.crop, preprocess.crop), torch.zeros(0, dtype=torch.long)
    return torch.cat(images), torch.tensor(labels, dtype=torch.long)


def accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 64) -> float:
    correct = 0
    for s in range(0, len(images), batch_size):
        correct += int((logits_fn(images[s:s + batch_size]).argmax(1) == labels[s:s + batch_size]).sum())
    return correct / len(images) if len(images) else float("nan")


# -- the machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The SIMD extensions that decide CPU inference speed (x86 flags from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    flags = set(match.group(1).split()) if match else set()
    wanted = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
              ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")]
    return [name for flag, name in wanted if flag in flags]


def library_versions() -> dict[str, str]:
    import importlib

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for module in ("onnxruntime", "openvino", "onnx", "torch_pruning"):
        try:
            mod = importlib.import_module(module)
            versions[module] = getattr(mod, "__version__", None) or getattr(mod, "get_version", lambda: "?")()
        except ImportError:
            continue
    return versions


def machine_description(threads: int | None = None) -> dict[str, object]:
    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "logical_cpus": os.cpu_count(),
            "available_cpus": available_cpus(), "threads": threads if threads else torch.get_num_threads(),
            "os": f"{platform.system()} {platform.release()}", "libraries": library_versions()}


def describe_machine(threads: int | None = None) -> str:
    m = machine_description(threads)
    libs = ", ".join(f"{k} {v}" for k, v in cast(dict[str, str], m["libraries"]).items())
    features = "/".join(cast(list[str], m["cpu_features"])) or "no AVX2"
    return (f"{m['cpu']} ({features}), {m['available_cpus']} CPUs available, {m['threads']} compute threads; "
            f"{m['os']}; {libs}")
