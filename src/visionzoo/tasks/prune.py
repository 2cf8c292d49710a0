"""Structured pruning: remove whole convolution channels, then fine-tune to recover.

    result = prune("runs/digits", ratio=0.3, finetune_epochs=3, out="runs/digits-pruned")
    result.before, result.after      # params, GMACs, latency, accuracy

Channels are chosen and removed with torch-pruning (Fang et al., "DepGraph: Towards Any
Structural Pruning", CVPR 2023): it traces the network, groups every layer whose channels
are coupled (a convolution's output, the BatchNorm after it, the next layer's input, both
sides of a residual addition, a depthwise convolution's groups, squeeze-excitation), and
removes the same channels from the whole group, so the smaller network still computes a
well-formed function. Each group loses `ratio` of its channels, those with the smallest
L2 norm, rounded to multiples of 8 (what SIMD kernels want; not rounding leaves the
latency barely lower). Linear layers are kept whole: the classifier keeps its classes and
embeddings keep their meaning. The network really gets smaller (fewer multiply-adds,
smaller tensors), unlike masking weights to zero.

Fine-tuning reuses `visionzoo.finetune` (strategy `full`) on the bundle's own training data
and validation split (recorded in its `bundle.json`), so the accuracy before and after is
measured on the same images. The pruned network is stored as a bundle whose
`bundle.json` records the new channel counts (`models/structure.py`): loading applies
them to the registry architecture and loads the safetensors weights; no code is unpickled.

    OUT/pruned/     the pruned network before fine-tuning (a bundle)
    OUT/bundle/     the pruned, fine-tuned network (the result)
    OUT/prune.json  the report: before/after params, GMACs, latency, accuracy
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from ..bundle import RUN_SUBDIR, is_bundle, read_bundle, save_bundle
from ..errors import InputError
from ..fileutil import atomic_path
from ..models.base import ZooModel
from ..optional import require
from ..runtime.measure import accuracy, interleaved_times, load_labelled, random_batch

log = logging.getLogger("visionzoo")
PRUNED_SUBDIR = "pruned"
REPORT = "prune.json"
ROUND_TO = 8


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int  # multiply-adds of one image at the bundle's input size
    latency_ms: float  # median time of one batch of `latency_batch` images (torch backend, optimised)
    latency_batch: int
    accuracy: float | None  # on the validation split


@dataclass(frozen=True)
class PruneResult:
    bundle: Path  # the pruned (and fine-tuned) bundle
    pruned: Path  # the pruned bundle before fine-tuning
    ratio: float
    before: ModelStats
    after: ModelStats
    after_pruning_accuracy: float | None  # before fine-tuning
    finetune_epochs: int
    val_images: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle"], d["pruned"] = str(self.bundle), str(self.pruned)
        return d

    def lines(self) -> list[str]:
        b, a = self.before, self.after

        def pct(new, old):
            return f"{(new - old) / old:+.1%}" if old else "-"

        def acc(v):
            return f"{v:.2%}" if v is not None else "-"

        return [
            f"{'':<26} {'before':>12} {'after':>12} {'change':>9}",
            f"{'parameters':<26} {b.params:>12,} {a.params:>12,} {pct(a.params, b.params):>9}",
            f"{'GMACs per image':<26} {b.macs / 1e9:>12.4f} {a.macs / 1e9:>12.4f} {pct(a.macs, b.macs):>9}",
            f"{f'latency, batch {b.latency_batch} (ms)':<26} {b.latency_ms:>12.2f} {a.latency_ms:>12.2f} "
            f"{pct(a.latency_ms, b.latency_ms):>9}",
            f"{'validation accuracy':<26} {acc(b.accuracy):>12} {acc(a.accuracy):>12} "
            + (f"{100 * (a.accuracy - b.accuracy):>+8.2f}pt" if a.accuracy is not None and b.accuracy is not None
               else ""),
            f"(pruned, before fine-tuning: {acc(self.after_pruning_accuracy)}; {self.finetune_epochs} fine-tuning "
            f"epochs; {self.val_images} validation images)",
        ]


def prune_model(net: ZooModel, ratio: float, size: int, *, round_to: int | None = ROUND_TO) -> ZooModel:
    """Remove `ratio` of the channels of every coupled group of convolutions, in place."""
    from ..models.structure import refresh_interface

    tp = require("torch_pruning")
    if not 0 < ratio < 1:
        raise InputError(f"ratio must be between 0 and 1 (the share of channels removed), got {ratio}")
    net.eval()
    example = torch.zeros(1, 3, size, size)
    # Linear layers keep their width: the classifier its classes, transformer blocks their heads
    ignored = [m for m in net.modules() if isinstance(m, nn.Linear)]
    try:
        pruner = tp.pruner.MetaPruner(net, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
        pruner.step()
        refresh_interface(net, size)
        with torch.inference_mode():
            out = net(example)
    except Exception as e:  # noqa: BLE001  (whatever breaks, the network cannot be pruned this way)
        raise InputError(f"{net.arch} cannot be pruned structurally ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); pruning supports convolutional "
                         f"networks") from None
    if tuple(out.shape) != (1, net.num_classes):
        raise InputError(f"{net.arch} no longer gives {net.num_classes} outputs after pruning; pruning supports "
                         f"convolutional networks")
    return net


def count_macs(net: nn.Module, size: int) -> tuple[int, int]:
    """(multiply-adds, parameters) of one `size` x `size` image."""
    tp = require("torch_pruning")
    was_training = net.training
    net.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(net, torch.zeros(1, 3, size, size))
    finally:
        net.train(was_training)
    return int(macs), int(params)


def prune(bundle: str | os.PathLike, ratio: float = 0.3, *, out: str | os.PathLike, finetune_epochs: int = 3,
          data: str | os.PathLike | None = None, val: str | os.PathLike | None = None, lr: float | None = None,
          batch_size: int = 32, latency_batch: int = 32, round_to: int | None = ROUND_TO, progress: bool = True,
          num_workers: int | None = None) -> PruneResult:
    """Prune the network of `bundle` and fine-tune it on the bundle's training data; write OUT.

    Args:
        ratio: the share of channels removed from every group of coupled convolutions.
        finetune_epochs: epochs of full fine-tuning after pruning (0: none).
        data, val: the training and validation data (default: what the bundle was trained on,
            with the same validation split).
        lr: fine-tuning learning rate (default: `finetune`'s for the full strategy).
        latency_batch: the batch size latency is measured with.
    """
    from ..runtime.backends import TorchRunner
    from .finetune import finetune

    if not is_bundle(bundle):
        raise InputError(f"{bundle} is not a bundle; prune a model fine-tuned with `visionzoo finetune` (its "
                         f"bundle records the training data used to recover the accuracy)")
    if finetune_epochs < 0:
        raise InputError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    info = read_bundle(bundle)
    out = Path(out).expanduser()
    if (out / RUN_SUBDIR).exists() or (out / REPORT).exists():
        raise InputError(f"{out} already holds a pruning run; choose another --out")
    train_data, val_data, cfg = _training_data(info, data, val)
    _, val_samples, classes = bundle_split(info, data, val)

    size = info.preprocess.crop
    original = _classifier(bundle)
    images, labels = load_labelled(val_samples, info.preprocess, num_workers=num_workers)
    pruned_net = prune_model(_classifier(bundle), ratio, size, round_to=round_to)
    pruned_dir = save_bundle(pruned_net, out / PRUNED_SUBDIR, classes=info.classes, preprocess=info.preprocess,
                             architecture=info.architecture, builder_kwargs=info.builder_kwargs,
                             base_weights=str(info.path),
                             training={"pruned_from": str(info.path), "ratio": ratio, "round_to": round_to})
    pruned_accuracy = accuracy(TorchRunner(pruned_net).logits, images, labels) if len(images) else None

    if finetune_epochs:
        options: _FinetuneOptions = {"strategy": "full", "epochs": finetune_epochs, "batch_size": batch_size,
                                     "image_size": size, "num_workers": num_workers}
        if lr is not None:
            options["lr"] = lr
        result = finetune(train=train_data, val=val_data, out=out, model=str(pruned_dir), progress=progress,
                          seed=cfg.seed, val_fraction=cfg.val_fraction, **options)
        final_dir = result.bundle
    else:
        final_dir = save_bundle(pruned_net, out / RUN_SUBDIR, classes=info.classes, preprocess=info.preprocess,
                                architecture=info.architecture, builder_kwargs=info.builder_kwargs,
                                base_weights=str(info.path), training={"pruned_from": str(info.path), "ratio": ratio})
    final = _classifier(final_dir)

    before, after = _compare(original, final, size, images, labels, latency_batch)
    report = PruneResult(bundle=final_dir, pruned=pruned_dir, ratio=ratio, before=before, after=after,
                         after_pruning_accuracy=pruned_accuracy, finetune_epochs=finetune_epochs,
                         val_images=len(images))
    with atomic_path(out / REPORT) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if before.accuracy is not None and after.accuracy is not None and after.accuracy < before.accuracy - 0.01:
        log.warning("the pruned model is %.1f points less accurate than the original (%.2f%% vs %.2f%%); fine-tune "
                    "it longer (--finetune-epochs; 10 recover the digits example) or prune less (--ratio)",
                    100 * (before.accuracy - after.accuracy), 100 * after.accuracy, 100 * before.accuracy)
    return report


def bundle_split(bundle, data: str | os.PathLike | None = None, val: str | os.PathLike | None = None):
    """(train samples, validation samples, classes) of the data a bundle was fine-tuned on, split
    as `finetune` split it (same seed and fraction), so that its validation images are the ones
    its recorded accuracy was measured on. `data`/`val` replace the recorded sources."""
    from .finetune import training_samples

    info = bundle if hasattr(bundle, "training") else read_bundle(bundle)
    train_data, val_data, cfg = _training_data(info, data, val)
    train_samples, val_samples, classes, _ = training_samples(None, train_data, val_data, cfg)
    if list(classes) != list(info.classes):
        raise InputError(f"the data's classes {classes[:5]} are not the bundle's {list(info.classes)[:5]}; give the "
                         f"data the bundle was trained on (--data)")
    return train_samples, val_samples, classes


def _training_data(info, data, val) -> tuple[Any, Any, Any]:
    """(train data, val data or None, config with the bundle's split) for re-creating its validation set."""
    from ..train.config import FinetuneConfig

    training = dict(info.training or {})
    sources = training.get("data") or {}
    train_data = data if data is not None else sources.get("train")
    if train_data is None or not Path(train_data).exists():
        raise InputError(f"the training data of {info.path} ({train_data}) is not available; give it with --data")
    recorded_val = sources.get("val")
    if val is None and data is None and recorded_val and Path(str(recorded_val)).exists():
        val = recorded_val
    cfg = FinetuneConfig(seed=int(training.get("seed", 0)), val_fraction=float(training.get("val_fraction", 0.25)))
    return train_data, val, cfg


class _FinetuneOptions(TypedDict, total=False):
    """The `finetune` options a pruning run sets."""

    strategy: str
    epochs: int
    batch_size: int
    image_size: int
    num_workers: int | None
    lr: float


def _classifier(bundle: str | os.PathLike) -> ZooModel:
    from ..factory import create_model

    net = create_model(bundle)
    if not isinstance(net, ZooModel):
        raise InputError(f"{bundle} holds a {type(net).__name__}, not a classifier; prune takes classifier bundles")
    return net


def _compare(original: ZooModel, final: ZooModel, size: int, images, labels, batch: int):
    """Stats of both networks; their latencies measured alternately, so that a machine that
    slows down or speeds up during the run affects both alike."""
    from ..runtime.backends import TorchRunner

    runners = [TorchRunner(original), TorchRunner(final)]
    x = random_batch(batch, size)
    times = interleaved_times({i: partial(r.logits, x) for i, r in enumerate(runners)}, 21, warmup=3)
    stats = []
    for i, (net, runner) in enumerate(zip((original, final), runners, strict=True)):
        macs, params = count_macs(net, size)
        acc = accuracy(runner.logits, images, labels) if len(images) else None
        stats.append(ModelStats(params=params, macs=macs, latency_ms=1000 * statistics.median(times[i]),
                                latency_batch=batch, accuracy=acc))
    return stats[0], stats[1]
