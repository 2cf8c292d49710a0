"""What a task brings to fine-tuning: a `Recipe` (its data, model, strategy choice, training job and
bundle description), and the run context every recipe works with.

`tasks/finetune.py` runs any recipe the same way: check the data, refuse or resume an existing
run, build the starting model, choose the strategy, train the recipe's `Job` with `loop.fit`
(checkpoint after every epoch, exact resume), write the bundle. A task plugs in by writing one
recipe (`classification.py`, `segmentation.py`, `detection.py`, `video.py`) and listing it in
`RECIPES`; the shared pieces (staged unfreezing, the data split, the starting point) live here.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from ..data.images import DEFAULT_LIMITS, DecodeLimits, probe_image
from ..data.inputs import Failure
from ..data.preprocess import Preprocess
from ..enums import Precision, Task
from ..errors import ImageError, InputError
from ..models.base import VisionModel
from . import distributed as D
from .config import FinetuneConfig, Strategy
from .data import EpochSampler
from .loop import HitsFn, LossFn, classification_hits, lr_schedule
from .stages import StageMap, freeze, set_train_mode


class _Splittable(Protocol):
    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int]) -> Any: ...


S = TypeVar("S", bound=_Splittable)

@dataclass
class RunData:
    """A run's examples: the training and validation samples, the class names, where they came from."""

    train_samples: list
    val_samples: list
    classes: list[str]
    sources: dict[str, Any]
    fingerprint: str  # of the samples and classes: a resumed run must see the same data
    extra: dict[str, Any] = field(default_factory=dict)  # what else the recipe found (pixel counts, ...)
    limits: DecodeLimits = DEFAULT_LIMITS  # the decode budget of each image
    failures: list[Failure] = field(default_factory=list)  # images left out (unreadable, over the budget)


@dataclass
class RunContext(RunData):
    """What every part of one fine-tuning run needs: the data, the model, and how it trains."""

    run_dir: Path = Path()
    cfg: FinetuneConfig = field(default_factory=FinetuneConfig)
    dist: D.Dist = field(default_factory=D.Dist)
    say: Callable[[str], None] = print
    net: Any = None  # the model being fine-tuned (a VisionModel)
    pp: Preprocess = field(default_factory=lambda: Preprocess(None, None))  # the training recipe (sizes, normalisation)
    amp: torch.dtype | None = None  # bfloat16 autocast, or None
    workers: int = 0


@dataclass
class JobParts:
    """A recipe's training job (see `loop.Job`), less the run's checkpoint callbacks."""

    prepare: Callable[[int], nn.Module]
    batches: Callable[[int], Any]
    steps: int
    validate: Callable[[], dict[str, float] | None]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trained: nn.Module  # what changes: the network, or only its classifier (classification's linear)
    loss: LossFn
    hits: HitsFn = classification_hits
    num_threads: int | None = None


class Recipe(ABC):
    """How one task fine-tunes."""

    task: ClassVar[Task]
    metric: ClassVar[str]  # the validation metric that picks the best epoch: a key of `validate`'s result

    @abstractmethod
    def detects(self, data: str | os.PathLike | None) -> bool:
        """Whether `data` is laid out as this task's dataset."""

    @abstractmethod
    def data(self, data, train, val, classes: Sequence[str] | str | None, cfg: FinetuneConfig,
             dist: D.Dist) -> RunData:
        """The run's samples, checked (every error before anything is written)."""

    @abstractmethod
    def starting_model(self, cfg: FinetuneConfig, classes: Sequence[str], dist: D.Dist
                       ) -> tuple[VisionModel, dict[str, Any], str | None]:
        """(model with new class heads on the run's device, builder arguments a bundle records, the
        name of the weights it starts from)."""

    @abstractmethod
    def preprocess(self, net: VisionModel, cfg: FinetuneConfig) -> Preprocess:
        """The recipe images are evaluated with (the bundle's); its sizes set the training crops."""

    @abstractmethod
    def train_size(self, pp: Preprocess) -> int:
        """The side of the square training inputs."""

    @abstractmethod
    def choose_strategy(self, ctx: RunContext) -> tuple[Strategy, str]:
        """`auto`: the strategy, and one sentence saying why."""

    @abstractmethod
    def job(self, ctx: RunContext) -> JobParts: ...

    def keep(self, found: RunData, train: list, val: list) -> None:
        """`found` reduced to the samples `train` and `val` (in order), when images that cannot be used
        were left out: the run fingerprints what it trains on, and data that no longer trains (a class
        left without examples) is refused."""
        found.train_samples, found.val_samples = train, val
        found.fingerprint = fingerprint((train, val), found.classes)

    def usable(self, samples: list, limits: DecodeLimits) -> tuple[list, list[Failure]]:
        """The samples whose image passes `probe_image` (readable header, within `limits`), and a
        `Failure` for each of the others: one bad file is left out instead of stopping the run.

        `max_resized_pixels` does not apply: training resizes only the area of each crop (a
        random crop, or the centre crop's area, see `transforms.resize_and_crop`), whatever the
        image's aspect ratio."""
        kept, failures = [], []
        for sample in samples:
            try:
                probe_image(sample[0], limits=limits)
                kept.append(sample)
            except ImageError as e:
                failures.append(Failure(str(sample[0]), e.reason))
        return kept, failures

    def describe(self, metrics: dict[str, Any]) -> str:
        """The best epoch's validation result, for the closing line."""
        if "val_acc" in metrics:
            return f", val acc {metrics['val_acc']:.2%}"
        return ""


def one_source(data, train):
    """The training data given as DATA or as --train (not both)."""
    if data is not None and train is not None:
        raise InputError("give the data either as DATA or as --train (with an optional --val), not both")
    return data if data is not None else train


def random_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): a random `val_fraction` held out (at least one image each
    when there are two or more), chosen by `seed`."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def split_data(found: S, val_set: S | None, source, val, cfg: FinetuneConfig) -> tuple[S, S, dict[str, Any]]:
    """(training set, validation set, where each came from): the validation data given, else a random
    `val_fraction` of the training data chosen by the seed, else none. `found` and `val_set` are
    datasets with `len()` and `subset(indices)`."""
    if val_set is not None:
        return found, val_set, {"train": str(source), "val": str(val)}
    if cfg.val_fraction > 0:
        train_idx, val_idx = random_split(len(found), cfg.val_fraction, cfg.seed)
        return (found.subset(train_idx), found.subset(val_idx),
                {"train": str(source), "val": f"{cfg.val_fraction:g} of train, random, seed {cfg.seed}"})
    return found, found.subset([]), {"train": str(source), "val": None}


def starting_point(net: VisionModel, classes: Sequence[str]) -> str | None:
    """Fit a starting bundle to the run's classes (new class layers when they differ, all else kept)
    and name the weights the run starts from."""
    card = net.require_card()
    if card.bundle is not None and list(card.bundle.classes) != list(classes):
        net.reset_classifier(len(classes))
    if card.weights:
        return card.weights.name
    base = card.bundle.base_weights if card.bundle is not None else None
    backbone = card.builder_kwargs.get("backbone")
    return base or card.source or (f"{backbone}.DEFAULT" if backbone else None)


def fingerprint(samples: Sequence[Sequence[Any]], classes: Sequence[str]) -> str:
    """A digest of (train samples, val samples) and the class names: paths as absolute paths."""
    h = hashlib.sha256(json.dumps(list(classes)).encode())
    for part in samples:
        h.update(b"|")
        for item in part:
            h.update(("\t".join(os.path.abspath(v) if isinstance(v, Path) else str(v) for v in item) + "\n").encode())
    return h.hexdigest()[:16]


def make_optimizer(groups: list[dict], cfg: FinetuneConfig, steps_per_epoch: int):
    """AdamW over `groups`, with the warm-up and cosine schedule (the new head alone first for
    `head_epochs`, except for linear)."""
    epochs, lr, warmup_epochs = cfg.settled()
    optimizer = torch.optim.AdamW(groups, lr=lr)
    per_epoch = math.ceil(steps_per_epoch / cfg.accumulate)
    head_steps = cfg.head_epochs * per_epoch if cfg.strategy is not Strategy.LINEAR else 0
    total = epochs * per_epoch
    # a warm-up longer than half the (post-head) run would leave no time at the full rate
    warmup = min(round(warmup_epochs * per_epoch), (total - head_steps) // 2)
    schedule = lr_schedule(total, warmup, head_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def ddp(module: nn.Module, dist: D.Dist) -> nn.Module:
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def trainable_stages(strategy: Strategy, num_stages: int, unfreeze: int) -> set[int]:
    """The stages a strategy trains after the heads' first epochs (stage `num_stages` is the heads):
    all of them (`full`), the last `unfreeze` and the heads (`partial`), or the heads alone (`linear`)."""
    if strategy is Strategy.FULL:
        return set(range(num_stages + 1))
    if strategy is Strategy.PARTIAL:
        return set(range(max(0, num_stages - unfreeze), num_stages + 1))
    return {num_stages}


class StagedUnfreeze:
    """The training job's `prepare` and `batches` for staged unfreezing, shared by every recipe.

    The heads (stage `n`, the last) train alone for the first `head_epochs` epochs, then the stages
    in `main` do. Freezing changes which parameters need gradients, so the DDP wrapper is rebuilt
    (after dropping the old one and its gradient hooks) whenever the trainable set changes.
    """

    def __init__(self, net: nn.Module, stages: StageMap, main: set[int], head_epochs: int, dist: D.Dist,
                 sampler: EpochSampler, train_loader: Iterable, forward: nn.Module | None = None):
        self.net, self.stages, self.main, self.head_epochs, self.dist = net, stages, main, head_epochs, dist
        self.forward = net if forward is None else forward  # what the loop calls: `net`, or a module around it
        self.sampler, self.train_loader = sampler, train_loader
        self._trainable: set[int] | None = None
        self._frozen: list[str] = []
        self._module: nn.Module | None = None

    def prepare(self, epoch: int) -> nn.Module:
        trainable = {self.stages.num_stages} if epoch < self.head_epochs else self.main
        if trainable != self._trainable or self._module is None:
            self._module = None  # drop the old DDP wrapper (and its gradient hooks) first
            self._frozen = freeze(self.net, self.stages, trainable)
            # DDP tracks the parameters that require gradients when it is built
            self._module, self._trainable = ddp(self.forward, self.dist), trainable
        set_train_mode(self.net, self._frozen)
        return self._module

    def batches(self, epoch: int) -> Iterable:
        self.sampler.set_epoch(epoch)
        return self.train_loader


def amp_dtype(precision: Precision, device: torch.device, crop_size: int) -> torch.dtype | None:
    """bfloat16 autocast, or None for fp32. `auto`: on GPUs that support bf16; on CPUs with native
    bf16 instructions (AVX512-BF16, AMX) for crops of 128 px and more, where it was measured to
    train ~25% faster (EfficientNet-Lite0, one thread: 15.7 -> 20.1 img/s at 128 px, 5.8 -> 7.1
    at 224 px, but only 59 -> 62 at 48 px); fp32 otherwise."""
    if precision is Precision.BF16:
        return torch.bfloat16
    if precision is Precision.FP32:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = any(getattr(torch.cpu, name, lambda: False)()
                 for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if device.type == "cpu" and native and crop_size >= 128 else None
