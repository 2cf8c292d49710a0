"""`auto`: the fastest backend and precision that keep float32 PyTorch's answers, measured once per model and machine.

    runner = open_runner("efficientnet_lite0")     # backend and precision auto
    runner.choice.summary()                          # 'openvino fp32: the fastest of 3 ...'

The candidates are every installed backend (torch, onnxruntime, openvino) in float32 and,
where the hardware runs it natively (`machine.py`: AVX512-BF16 or AMX on the CPU, a GPU
with bfloat16), bfloat16 on torch and OpenVINO, alone and with its near ties run again in
float32 (`backends.RecheckRunner`: float32's top-1 at close to bfloat16's speed, where bfloat16
alone moves too many answers); for an exported file the two runtimes in the file's
precision (int8 for a quantized file). A forced `--backend` or `--precision`
narrows the candidates to it. Each candidate is

  1. timed at the batch size and thread count it will run with, the candidates interleaved
     in one process (`measure.interleaved_times`), so that a busy machine slows them alike;
  2. checked, fastest first: its top-1 must agree with float32 PyTorch on at least
     `MIN_AGREEMENT` (99.5%) of the check set. The first that passes is chosen, and the
     slower ones need no check.

The reference is the model in float32 PyTorch with BatchNorms folded (the same function to
float rounding, `torch_opt.py`); for an exported float file, the file on ONNX Runtime
(verified against PyTorch when it was exported). An int8 file has no float32 model to
compare with: `quantize` measured its agreement, and `auto` only picks the faster runtime.

The check set (`CHECK_IMAGES` images): a bundle's own validation images when its data is
still where it was trained from, else the photos packaged with visionzoo and augmented
copies of them (`data/samples.py`), the same images on every run.

Both measurements are cached beside the model's export (`cache.py`): the agreement under a
key of the machine's CPU, its native bfloat16 and the library versions; the choice under
that key plus the cores, threads, batch size and device. Later runs read them back. Every
run logs the choice and why (`--verbose`); `benchmark` and `info` print it.
`VISIONZOO_AUTOTUNE=0` skips the measurement: `auto` is then torch float32 for a model, and
OpenVINO (else ONNX Runtime) for a file.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..data.loader import available_cpus
from ..enums import Precision, Task
from ..errors import InputError, VisionZooError
from ..fileutil import atomic_path, json_digest
from ..models.base import ZooModel
from ..version import __version__
from .machine import capabilities, cuda_bf16, torch_threads
from .measure import cpu_features, cpu_model, interleaved_times
from .metadata import ModelInfo

log = logging.getLogger("visionzoo")
TORCH, ONNXRUNTIME, OPENVINO, AUTO = "torch", "onnxruntime", "openvino", "auto"  # the backends, by name
MIN_AGREEMENT = 0.995  # top-1 agreement with float32 PyTorch a candidate needs
CHECK_IMAGES = 200  # at 99.5%, one disagreement is tolerated, two are not
CHECK_BATCH = 32
TIMING_ROUNDS = 3  # interleaved timed rounds per candidate (after one untimed call)
AUTOTUNE_ENV = "VISIONZOO_AUTOTUNE"
_KEY_VERSION = 2  # 2: bfloat16 with float32 near ties became a candidate
Runner = Any  # a `backends.Runner` (that module imports this one, so it is not imported here)


@dataclass(frozen=True)
class Backends:
    """What `auto` needs of `backends.py`, handed in by `open_runner` (`backends.auto_support()`)."""

    open: Callable[..., Runner]  # `open_runner`, called with one backend and one precision
    installed: tuple[str, ...]  # the backends that can run here, by name
    is_file: Callable[[Any], bool]  # whether a model argument names an exported file
    recheck: Callable[[Runner, Runner], Runner]  # (bfloat16, float32) -> bfloat16 with float32 near ties


@dataclass(frozen=True)
class Candidate:
    backend: str  # torch, onnxruntime or openvino
    precision: Precision
    recheck: bool = False  # bfloat16 with its near ties run again in float32

    @property
    def label(self) -> str:
        return precision_label(self.backend, self.precision.value, self.recheck)


def precision_label(backend: str, precision: str, recheck: bool = False) -> str:
    """`openvino bf16`, or `openvino bf16+fp32` for bfloat16 with float32 near ties."""
    return f"{backend} {precision}{'+fp32' if recheck else ''}"


@dataclass(frozen=True)
class Trial:
    """What was measured of one candidate."""

    backend: str
    precision: str
    images_per_second: float | None = None  # at the batch size and threads of the choice
    agreement: float | None = None  # share of the check set whose top-1 is float32 PyTorch's
    verdict: str = ""  # chosen, rejected (and why), not checked (slower than the choice), failed
    recheck: bool = False  # bfloat16 with float32 near ties

    @property
    def label(self) -> str:
        return precision_label(self.backend, self.precision, self.recheck)

    def line(self) -> str:
        speed = "-" if self.images_per_second is None else f"{self.images_per_second:.1f} img/s"
        agree = "" if self.agreement is None else f", top-1 agreement {self.agreement:.1%}"
        return f"{self.label}: {speed}{agree}: {self.verdict}"


@dataclass(frozen=True)
class Choice:
    """The backend and precision `auto` chose, and why."""

    backend: str  # torch, onnxruntime or openvino
    precision: Precision
    reason: str  # one sentence
    trials: tuple[Trial, ...] = ()
    measured: bool = False  # chosen by measuring (False: by a rule)
    cached: bool = False  # read from an earlier run's measurement
    conditions: dict[str, Any] = field(default_factory=dict)  # batch, threads, device, check set
    recheck: bool = False  # bfloat16 with its near ties run again in float32

    @property
    def label(self) -> str:
        return precision_label(self.backend, self.precision.value, self.recheck)

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.backend, self.precision, self.recheck)

    def summary(self) -> str:
        return f"auto: {self.label}: {self.reason}"

    def where(self) -> str:
        """The conditions it was chosen for, e.g. `batch 32, 1 thread, cpu`."""
        c = self.conditions
        if not c:
            return "any batch size"
        threads = c.get("threads")
        return f"batch {c.get('batch')}, {threads} thread{'s' if threads != 1 else ''}, {c.get('device')}"

    def lines(self) -> list[str]:
        return [self.summary(), *(f"  {t.line()}" for t in self.trials)]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision.value, "recheck": self.recheck,
                "reason": self.reason, "measured": self.measured, "cached": self.cached,
                "conditions": dict(self.conditions), "trials": [asdict(t) for t in self.trials]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Choice:
        return cls(str(d["backend"]), Precision(d["precision"]), d["reason"],
                   tuple(Trial(**t) for t in d.get("trials", ())), bool(d.get("measured")), bool(d.get("cached")),
                   dict(d.get("conditions") or {}), bool(d.get("recheck")))


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


# -- the entry point: open_runner's hook -----------------------------------------------------------

def open_auto(model, backend: str, precision: Precision, backends: Backends, *, threads: int | None = None,
              device: str | torch.device = "cpu", optimize: bool = True, batch_size: int = 32) -> Runner:
    """A runner for `model` with `auto` resolved (the backend, the precision or both); the runner's
    `choice` says what was chosen and why. The arguments are `open_runner`'s."""
    settings = _Settings(backend, precision, threads, torch.device(device), batch_size, optimize, backends)
    if backends.is_file(model):
        from .export import read_onnx_info

        path = Path(model).expanduser()
        info = read_onnx_info(path)
        if info is not None and info.task is not Task.CLASSIFICATION:
            choice = _rule(settings, is_file=True, why="auto measures classifiers; this model is not one")
            return _attach(backends.open(path, choice.backend, threads=threads, precision=choice.precision), choice)
        return _FileTuner(path, settings).run()
    from ..factory import resolve_model

    net = resolve_model(model)
    if not isinstance(net, ZooModel) or net.card is None or net.card.task is not Task.CLASSIFICATION:
        choice = _rule(settings, is_file=False, why="auto measures classifiers; this model is not one")
        return _attach(backends.open(net, choice.backend, threads=threads, device=device,
                                     precision=choice.precision, optimize=optimize), choice)
    return _ModelTuner(net, settings).run()


def _attach(runner: Runner, choice: Choice) -> Runner:
    runner.choice = choice
    log.info("%s", "\n".join(choice.lines()))
    return runner


def _rule(settings: _Settings, *, is_file: bool, file_precision: Precision | None = None, why: str) -> Choice:
    """`auto` without measuring: torch (float32) for a model, OpenVINO (else ONNX Runtime) for a file."""
    backend, precision = settings.backend, settings.precision
    if backend == AUTO:
        if is_file:
            backend = OPENVINO if OPENVINO in settings.backends.installed else ONNXRUNTIME
        else:
            backend = TORCH
    if precision is Precision.AUTO:
        precision = file_precision or Precision.FP32
    return Choice(backend, precision, why)


# -- candidates ------------------------------------------------------------------------------------

def candidates(backend: str, precision: Precision, installed: Sequence[str], *, is_file: bool,
               file_precision: Precision = Precision.FP32, device: torch.device = torch.device("cpu")
               ) -> tuple[list[Candidate], list[str]]:
    """The (backend, precision) pairs `auto` measures among the `installed` backends, and notes on
    what it leaves out and why."""
    notes: list[str] = []
    caps = capabilities()
    if device.type != "cpu":
        names = [TORCH]
    else:
        names = [b for b in installed if not (is_file and b == TORCH)]
    if backend != AUTO:
        names = [backend]
    if file_precision is Precision.INT8:
        if precision not in (Precision.AUTO, Precision.INT8):
            raise InputError(f"the file is quantized: it runs in int8, not {precision.value}")
        return [Candidate(b, Precision.INT8) for b in names if b != TORCH], notes
    if precision is Precision.INT8:
        raise InputError("int8 needs a quantized model file: run `visionzoo quantize MODEL --calibration DIR "
                         "--out MODEL.int8.onnx` and give that file")
    found = []
    for b in names:
        if precision in (Precision.AUTO, Precision.FP32):
            found.append(Candidate(b, Precision.FP32))
        if b == ONNXRUNTIME:
            continue  # its CPU kernels are float32
        native = cuda_bf16(device) if device.type != "cpu" else caps.bf16_for(b)
        if precision is Precision.BF16 or (precision is Precision.AUTO and native):
            found.append(Candidate(b, Precision.BF16))
        if precision is Precision.AUTO and native:
            found.append(Candidate(b, Precision.BF16, recheck=True))  # (float32 on its near ties: auto only)
    if precision is Precision.AUTO and not any(c.precision is Precision.BF16 for c in found):
        where = f"the GPU ({device}) has no bfloat16" if device.type != "cpu" else caps.describe()
        notes.append(f"bfloat16 not considered: {where}")
    if precision is Precision.BF16 and not found:
        raise InputError("bf16 runs on the torch and openvino backends; ONNX Runtime's CPU kernels are float32")
    return found, notes


# -- measuring -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Settings:
    backend: str  # auto, or forced
    precision: Precision  # auto, or forced
    threads: int | None
    device: torch.device
    batch_size: int
    optimize: bool
    backends: Backends


class _Tuner:
    """One resolution of `auto`: for a model (`_ModelTuner`) or an exported file (`_FileTuner`)."""

    is_file = False
    reference_candidate = Candidate(TORCH, Precision.FP32)  # the candidate that is the reference

    def __init__(self, info: ModelInfo, settings: _Settings, file_precision: Precision | None = None):
        self.info, self.settings, self.file_precision = info, settings, file_precision
        self._opened: dict[Candidate, Runner] = {}  # while measuring: the runners opened, shared by the rechecks

    def _parts(self, c: Candidate) -> tuple[Runner, Runner]:
        """The bfloat16 and the float32 runner of a recheck candidate, opened once."""
        parts = []
        for part in (replace(c, recheck=False), Candidate(c.backend, Precision.FP32)):
            if part not in self._opened:
                self._opened[part] = self._open(part)
            parts.append(self._opened[part])
        return parts[0], parts[1]

    # what differs between a model and a file
    def _open(self, c: Candidate) -> Runner:
        raise NotImplementedError

    def _reference(self, runners: dict[Candidate, Runner]) -> Runner | None:
        """What the candidates must agree with (None: nothing to agree with, speed alone decides)."""
        raise NotImplementedError

    def _path(self, kind: str, digest: str) -> Path:
        raise NotImplementedError

    def _net(self) -> ZooModel | None:
        return None

    def candidates(self) -> tuple[list[Candidate], list[str]]:
        s = self.settings
        return candidates(s.backend, s.precision, s.backends.installed, is_file=self.is_file,
                          file_precision=self.file_precision or Precision.FP32, device=s.device)

    def run(self) -> Runner:
        s = self.settings
        if not autotune_enabled():
            choice = _rule(s, is_file=self.is_file, file_precision=self.file_precision,
                           why=f"{AUTOTUNE_ENV}=0: not measured")
            return _attach(self._open(Candidate(choice.backend, choice.precision)), choice)
        found, notes = self.candidates()
        if len(found) == 1:
            only = found[0]
            reason = "the only candidate" + (f" ({'; '.join(notes)})" if notes else "")
            return _attach(self._open(only), Choice(only.backend, only.precision, reason))
        conditions = self.conditions(found)
        # both names before anything is opened: the torch backend may fold the network in place,
        # which would change the weights digest in the names
        choice_file, agreement_file = self.cache_path("auto", conditions), self.cache_path("agreement", None)
        cached = self.cached(conditions)
        if cached is not None:
            return _attach(self._open(cached.candidate), cached)
        log.warning("%s: measuring which backend and precision run it fastest on this machine, once (cached "
                    "in %s)", self.info.arch, choice_file.parent)
        choice, runner = self._measure(found, notes, conditions, agreement_file)
        _write(choice_file, {"choice": choice.to_dict(), "key": _key(s.device, conditions)})
        return _attach(runner, choice)

    def cached(self, conditions: dict[str, Any]) -> Choice | None:
        return _read_choice(self.cache_path("auto", conditions))

    def conditions(self, found: Sequence[Candidate]) -> dict[str, Any]:
        s = self.settings
        return {"batch": s.batch_size, "threads": s.threads or available_cpus(), "device": str(s.device),
                "candidates": [c.label for c in found], "optimize": s.optimize}

    def cache_path(self, kind: str, conditions: dict[str, Any] | None) -> Path:
        return self._path(kind, json_digest(_key(self.settings.device, conditions), 16))

    def _measure(self, found: list[Candidate], notes: list[str], conditions: dict[str, Any], agreement_file: Path
                 ) -> tuple[Choice, Runner]:
        runners, failed = self._open_all(found)
        checks = _CheckSet(self.info, self._net())
        x = checks.timing_batch(self.settings.batch_size)
        speeds = self._time(runners, x)
        ranked = sorted(runners, key=lambda c: -speeds[c])
        known: dict[str, float] = _read(agreement_file) or {}
        reference = self._reference(runners)
        trials: dict[Candidate, Trial] = {}
        chosen: Candidate | None = None
        for c in ranked:
            trial = Trial(c.backend, c.precision.value, speeds[c], recheck=c.recheck)
            if chosen is not None:
                trials[c] = replace(trial, verdict="slower than the choice (not checked)")
                continue
            agree: float | None = None  # None: an int8 file, speed alone decides
            if reference is not None:
                if c == self.reference_candidate:
                    known[c.label] = 1.0
                elif c.label not in known:
                    known[c.label] = checks.agreement(runners[c], reference)
                agree = known[c.label]
            if agree is None or agree >= MIN_AGREEMENT:
                chosen = c
                trials[c] = replace(trial, agreement=agree, verdict="chosen")
            else:
                trials[c] = replace(trial, agreement=agree,
                                    verdict=f"rejected: agrees with float32 PyTorch on {agree:.1%} < "
                                            f"{MIN_AGREEMENT:.1%} of the check set")
        if reference is not None:
            _write(agreement_file, known)
        if chosen is None:  # only with a forced backend whose every precision disagrees: the closest one
            chosen = max(ranked, key=lambda c: trials[c].agreement or 0.0)
            trials[chosen] = replace(trials[chosen], verdict="chosen, although it disagrees (the forced backend)")
            log.warning("%s: every candidate disagrees with float32 PyTorch on more than %.1f%% of the check set; "
                        "using %s", self.info.arch, 100 * (1 - MIN_AGREEMENT), chosen.label)
        all_trials = tuple(trials[c] for c in ranked) + tuple(failed)
        reason = self._reason(chosen, trials[chosen], ranked, speeds, reference is not None, checks, notes)
        conditions = {**conditions, "check_set": checks.description if reference is not None else None}
        choice = Choice(chosen.backend, chosen.precision, reason, all_trials, measured=True, conditions=conditions,
                        recheck=chosen.recheck)
        runner = runners.pop(chosen)
        runners.clear()
        self._opened.clear()
        return choice, runner

    def _open_all(self, found: list[Candidate]) -> tuple[dict[Candidate, Runner], list[Trial]]:
        # the runtimes first: they export the network as it is, before the torch backend may fold it in place
        order = sorted(found, key=lambda c: c.backend == TORCH)
        runners: dict[Candidate, Runner] = {}
        failed: list[Trial] = []
        errors: list[Exception] = []
        for c in sorted(order, key=lambda c: c.recheck):  # (a recheck reuses the runners of its two parts)
            try:
                runners[c] = self._opened[c] = self._open(c) if c not in self._opened else self._opened[c]
            except (VisionZooError, RuntimeError) as e:  # a runtime that cannot run this model: not a candidate
                failed.append(Trial(c.backend, c.precision.value, verdict=f"failed to open: {_first_line(e)}",
                                    recheck=c.recheck))
                errors.append(e)
        if not runners:
            raise errors[0]
        return runners, failed

    def _time(self, runners: dict[Candidate, Runner], x: torch.Tensor) -> dict[Candidate, float]:
        fns = {c.label: (lambda r=r: r.logits(x)) for c, r in runners.items()}
        with torch_threads(self.settings.threads):
            times = interleaved_times(fns, TIMING_ROUNDS, warmup=1)
        return {c: len(x) / statistics.median(times[c.label]) for c in runners}

    def _reason(self, chosen: Candidate, trial: Trial, ranked: list[Candidate], speeds: dict[Candidate, float],
                checked: bool, checks: _CheckSet, notes: list[str]) -> str:
        threads = self.settings.threads or available_cpus()
        speed_list = ", ".join(f"{c.label} {speeds[c]:.1f}" for c in ranked)
        faster = [c for c in ranked if speeds[c] > speeds[chosen]]
        text = f"the fastest of {len(ranked)} measured" if not faster else \
            f"the fastest that agrees with float32 PyTorch ({', '.join(c.label for c in faster)} rejected)"
        text += (f" (img/s at batch {self.settings.batch_size}, {threads} thread{'s' if threads != 1 else ''}: "
                 f"{speed_list})")
        if checked and trial.agreement is not None:
            text += f"; top-1 agrees with float32 PyTorch on {trial.agreement:.1%} of {checks.description}"
        elif not checked:
            text += "; an int8 file: its agreement with float32 was measured by `quantize`"
        if notes:
            text += "; " + "; ".join(notes)
        return text


class _ModelTuner(_Tuner):
    def __init__(self, net: ZooModel, settings: _Settings):
        from .metadata import model_info

        super().__init__(model_info(net), settings)
        self.net = net
        self.torch_fp32: Runner | None = None  # the folded network, shared by the torch candidates

    def _net(self) -> ZooModel | None:
        return self.net

    def _path(self, kind: str, digest: str) -> Path:
        from .cache import measurement_path

        return measurement_path(self.net, kind, digest)

    def _open(self, c: Candidate) -> Runner:
        s = self.settings
        if c.recheck:
            return s.backends.recheck(*self._parts(c))
        if c.backend != TORCH:
            return s.backends.open(self.net, c.backend, threads=s.threads, precision=c.precision)
        if self.torch_fp32 is None:
            self.torch_fp32 = s.backends.open(self.net, TORCH, device=s.device, optimize=s.optimize,
                                              precision=Precision.FP32)
        return _with_precision(self.torch_fp32, c.precision)

    def _reference(self, runners: dict[Candidate, Runner]) -> Runner | None:
        return self._open(Candidate(TORCH, Precision.FP32))


class _FileTuner(_Tuner):
    is_file = True
    reference_candidate = Candidate(ONNXRUNTIME, Precision.FP32)

    def __init__(self, path: Path, settings: _Settings):
        from .export import read_onnx_info

        info = read_onnx_info(path)
        if info is None:
            raise InputError(f"{path} has no visionzoo metadata (preprocessing, classes); export it with "
                             f"`visionzoo export` or `visionzoo quantize`")
        if settings.backend == TORCH:
            raise InputError(f"{path} is an ONNX file: run it with --backend onnxruntime or openvino "
                             f"(the torch backend takes a model name or bundle)")
        super().__init__(info, replace(settings, device=torch.device("cpu")), Precision(info.precision))
        self.path = path

    def _path(self, kind: str, digest: str) -> Path:
        from .cache import file_measurement_path

        return file_measurement_path(self.path, kind, digest)

    def _open(self, c: Candidate) -> Runner:
        if c.recheck:
            return self.settings.backends.recheck(*self._parts(c))
        return self.settings.backends.open(self.path, c.backend, threads=self.settings.threads, precision=c.precision)

    def _reference(self, runners: dict[Candidate, Runner]) -> Runner | None:
        if self.file_precision is Precision.INT8:
            return None
        if self.reference_candidate in runners:
            return runners[self.reference_candidate]
        if ONNXRUNTIME in self.settings.backends.installed:
            return self._open(self.reference_candidate)
        return runners.get(Candidate(OPENVINO, Precision.FP32))


def _with_precision(runner: Runner, precision: Precision) -> Runner:
    """The same folded network, run in another precision (a shallow copy: the weights are shared)."""
    other = copy.copy(runner)
    other.precision = precision
    return other


class _CheckSet:
    """The images candidates are checked on, preprocessed for the model, made when first needed."""

    def __init__(self, info: ModelInfo, net: ZooModel | None):
        self.info, self.net = info, net
        self._batches: list[torch.Tensor] | None = None
        self._expected: list[torch.Tensor] | None = None  # the reference's top-1 classes
        self.description = ""

    @property
    def batches(self) -> list[torch.Tensor]:
        if self._batches is None:
            self._batches, self.description = check_images(self.info, self.net)
        return self._batches

    def timing_batch(self, batch_size: int) -> torch.Tensor:
        images = torch.cat(self.batches)
        reps = -(-batch_size // len(images))
        return images.repeat(reps, 1, 1, 1)[:batch_size].contiguous()

    def agreement(self, runner: Runner, reference: Runner) -> float:
        """The share of the images whose top-1 class from `runner` is `reference`'s."""
        if self._expected is None:
            self._expected = [reference.logits(x).argmax(1) for x in self.batches]
        same = sum(int((runner.logits(x).argmax(1) == top1).sum()) for x, top1 in zip(self.batches, self._expected,
                                                                                       strict=True))
        return same / sum(len(x) for x in self.batches)


def check_images(info: ModelInfo, net: ZooModel | None = None) -> tuple[list[torch.Tensor], str]:
    """(batches, description) of the check set of a model (`net`, or an exported file's `info`): a
    bundle's validation images, or the packaged photos and augmented copies."""
    transform = info.preprocess.transforms()
    bundle = net.card.bundle if net is not None and net.card is not None else None
    files, where = bundle_images(bundle) if bundle is not None else ([], "")
    if files:
        from ..data.loader import image_batches

        # a classifier's bundle (`net` is one): its preprocessing crops, so every batch stacks
        stacked = (b.stacked() for b in image_batches(files, info.preprocess, batch_size=CHECK_BATCH, fast=False))
        batches = [x for x in stacked if x is not None]
        if batches:
            return batches, f"{sum(len(b) for b in batches)} images of {where}"
    from ..data.samples import augmented_photos, sample_photos

    images = [transform(img) for img in augmented_photos(CHECK_IMAGES)]
    batches = [torch.stack(images[s:s + CHECK_BATCH]) for s in range(0, len(images), CHECK_BATCH)]
    return batches, f"{len(images)} check images ({len(sample_photos())} packaged photos and augmented copies)"


def bundle_images(bundle, limit: int = CHECK_IMAGES) -> tuple[list[Path], str]:
    """Up to `limit` of the validation images a bundle was trained with (its validation data, or the
    split of its training data that `finetune` held out), evenly spread; ([], "") when gone."""
    from ..data.datasets import open_dataset

    sources = dict(bundle.training or {}).get("data") or {}
    train, val = sources.get("train"), sources.get("val")
    try:
        if val and Path(val).exists():
            samples, where = open_dataset(val).samples, f"the bundle's validation data ({val})"
        elif train and Path(train).exists():
            from ..train.data import stratified_split

            data = open_dataset(train)
            fraction = float(dict(bundle.training).get("val_fraction", 0.25))
            _, held_out = stratified_split(data.targets, fraction, int(dict(bundle.training).get("seed", 0)))
            samples = [data.samples[i] for i in held_out] or data.samples
            where = f"the bundle's validation split of {train}"
        else:
            return [], ""
    except VisionZooError:
        return [], ""
    step = max(1, len(samples) / limit)
    return [Path(samples[int(i * step)][0]) for i in range(min(limit, len(samples)))], where


# -- keys and files --------------------------------------------------------------------------------

def _key(device: torch.device, conditions: dict[str, Any] | None) -> dict[str, Any]:
    """What a measurement depends on: the machine and libraries, and (for a choice) its conditions."""
    key: dict[str, Any] = {"version": _KEY_VERSION, "machine": machine_key(), "libraries": library_key(),
                           "device": device.type, "check": {"images": CHECK_IMAGES, "min_agreement": MIN_AGREEMENT}}
    if conditions is not None:
        key["conditions"] = conditions
        key["cores"] = available_cpus()
    return key


def _read_choice(path: Path) -> Choice | None:
    data = _read(path)
    try:
        return replace(Choice.from_dict(data["choice"]), cached=True)
    except (TypeError, KeyError, ValueError):  # missing, or written by another version: measured again
        return None


def measured_choices(net: ZooModel) -> list[Choice]:
    """What `auto` chose for `net` on this machine, under every set of conditions (batch size,
    threads, device) measured so far, from the cache; nothing is measured."""
    from .cache import measurements

    here = json.loads(json.dumps({"machine": machine_key(), "libraries": library_key()}))  # as read back
    found = []
    for path in measurements(net, "auto"):
        key = (_read(path) or {}).get("key") or {}
        if {k: key.get(k) for k in here} == here:
            choice = _read_choice(path)
            if choice is not None:
                found.append(choice)
    return found


def machine_key() -> dict[str, Any]:
    return {"cpu": cpu_model(), "features": cpu_features(), **capabilities().fingerprint()}


def library_key() -> dict[str, str]:
    versions = {"visionzoo": __version__, "torch": torch.__version__}
    for package in ("onnxruntime", "openvino", "onnx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, value: Any) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(value, indent=1) + "\n")
    except OSError as e:  # a read-only cache only costs a new measurement next time
        log.warning("could not cache the measurement in %s (%s)", path, e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def cached_choice(model, backends: Backends, *, threads: int | None = None, batch_size: int = 32,
                  device: str | torch.device = "cpu") -> Choice | None:
    """What `auto` chose for `model` (a name, bundle, model or file) with these settings, if it was
    measured before on this machine; None otherwise (nothing is measured)."""
    settings = _Settings(AUTO, Precision.AUTO, threads, torch.device(device), batch_size, True, backends)
    tuner: _Tuner
    if backends.is_file(model):
        tuner = _FileTuner(Path(model).expanduser(), settings)
    else:
        from ..factory import resolve_model

        net = resolve_model(model)
        if not isinstance(net, ZooModel) or net.card is None or net.card.task is not Task.CLASSIFICATION:
            return None
        tuner = _ModelTuner(net, settings)
    found, _ = tuner.candidates()
    return tuner.cached(tuner.conditions(found)) if len(found) > 1 else None
