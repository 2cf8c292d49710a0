"""The training loop: epochs of (mixed-precision, accumulated) steps, validation, early
stopping, a checkpoint after every epoch. Whatever is trained (the whole network, or only
the classifier on cached features), its loss and its scores come in through a `Job`, so one
loop trains every task (see `recipe.py`).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TrainingError
from . import distributed as D
from .checkpoint import RunState
from .data import sample_seed

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]  # (module outputs, targets) -> the batch's mean loss
HitsFn = Callable[[Any, torch.Tensor], tuple[float, float]]  # (outputs, targets) -> (right, counted)


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy of the logits (in float32) with label smoothing."""
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    return loss


def classification_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(images whose top class is right, images)."""
    return float((logits.argmax(1) == y).sum()), float(len(y))


@dataclass
class Job:
    """What one run trains, on what, and how it is checked."""

    prepare: Callable[[int], nn.Module]  # epoch -> the module to call (train mode set, maybe DDP-wrapped)
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> this process's batches
    steps_per_epoch: int  # batches per epoch on this process
    validate: Callable[[], dict[str, float] | None]  # metrics over all processes, or None without validation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    on_best: Callable[[], None]  # called (on every process) when an epoch is the best so far
    on_epoch_end: Callable[[RunState], None]  # checkpoint; called on every process
    loss: LossFn  # the training loss of a batch
    hits: HitsFn = classification_hits  # the running training accuracy (images, or pixels, right)
    metric: str = "acc"  # the validation metric (higher is better) that picks the best epoch, ties to lower loss
    num_threads: int | None = None  # intra-op threads while training (None: leave torch's setting)


def lr_schedule(total_steps: int, warmup_steps: int, constant_steps: int = 0) -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: 1 for `constant_steps` (head warm-up), then a
    linear warm-up over `warmup_steps` and a cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < constant_steps:
            return 1.0
        step -= constant_steps
        span = max(1, total_steps - constant_steps)
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, span - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fit(job: Job, state: RunState, *, epochs: int, seed: int, accumulate: int, patience: int | None,
        amp_dtype: torch.dtype | None, dist: D.Dist, progress: bool = True,
        echo: Callable[[str], None] = print) -> RunState:
    """Train from `state.epoch` to `epochs` (or early stop); returns the final state."""
    threads = torch.get_num_threads()
    if job.num_threads is not None:
        torch.set_num_threads(job.num_threads)
    try:
        return _epochs(job, state, epochs, seed, accumulate, patience, amp_dtype, dist, progress and dist.is_main,
                       echo)
    finally:
        torch.set_num_threads(threads)


def _epochs(job: Job, state: RunState, epochs: int, seed: int, accumulate: int, patience: int | None,
            amp_dtype: torch.dtype | None, dist: D.Dist, show: bool, echo: Callable[[str], None]) -> RunState:
    for epoch in range(state.epoch, epochs):
        if state.stopped_early:
            break
        # dropout and stochastic depth draw from the global generator: reseed it from
        # (seed, epoch, rank) so a resumed epoch draws what the uninterrupted one drew
        torch.manual_seed(sample_seed(seed, epoch, dist.rank, 1))
        started = time.perf_counter()
        with _Bar(show, f"epoch {epoch + 1}/{epochs}", job.steps_per_epoch) as bar:
            loss_sum, seen, correct, counted = _train_epoch(job, epoch, accumulate, amp_dtype, dist, bar)
        loss_sum, seen, correct, counted = D.all_reduce_sum(dist, [loss_sum, seen, correct, counted])
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(counted, 1),
                  "lr": max(g["lr"] for g in job.optimizer.param_groups)}
        val = job.validate()
        if val is not None:
            record.update({f"val_{k}": v for k, v in val.items()})
        record["time_s"] = round(time.perf_counter() - started, 3)
        state.history.append(record)
        state.epoch = epoch + 1
        # the best epoch: highest validation metric (accuracy, mIoU), ties to the lower loss (the last
        # epoch without validation); `best_acc` holds the metric's value whatever it is
        if val is None or (val[job.metric], -val["loss"]) > (state.best_acc, -state.best_loss):
            state.best_epoch = epoch + 1
            state.best_acc = val[job.metric] if val else record["train_acc"]
            state.best_loss = val["loss"] if val else record["train_loss"]
            job.on_best()
        if val is not None and patience is not None and state.best_epoch is not None \
                and state.epoch - state.best_epoch >= patience \
                and state.epoch < epochs:
            state.stopped_early = True
        job.on_epoch_end(state)
        if dist.is_main:
            echo(_summary(record, state))
    return state


def _train_epoch(job: Job, epoch: int, accumulate: int, amp_dtype: torch.dtype | None, dist: D.Dist,
                 bar: _Bar) -> tuple[float, float, float, float]:
    """One pass over this process's batches; returns (loss summed over images, images, right, counted):
    the last two count what `job.hits` scores (images, or labelled pixels)."""
    device, n = dist.device, job.steps_per_epoch
    module = job.prepare(epoch)
    loss_sum = seen = correct = counted = 0.0
    in_group = 0  # images in the current accumulation group
    job.optimizer.zero_grad(set_to_none=True)
    for step, (x, y) in enumerate(job.batches(epoch)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        group_end = (step + 1) % accumulate == 0 or step + 1 == n
        # between optimizer steps, DDP need not all-reduce the gradients
        no_sync = getattr(module, "no_sync", None)
        sync = contextlib.nullcontext() if group_end or no_sync is None else no_sync()
        with sync:
            with autocast(device, amp_dtype):
                outputs = module(x)
            loss = job.loss(outputs, y)
            _check_finite(loss, epoch, step, job.optimizer, dist)
            # summed over images, divided by the group's image count before the step: accumulating
            # K micro-batches is then exactly one K-times larger batch, a short last one included
            (loss * len(y) if accumulate > 1 else loss).backward()
        in_group += len(y)
        if group_end:
            if accumulate > 1:
                _scale_grads(job.optimizer, 1.0 / in_group)
            in_group = 0
            job.optimizer.step()
            job.scheduler.step()
            job.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.item() * len(y)
        seen += len(y)
        right, scored = job.hits(outputs, y)
        correct += right
        counted += scored
        bar.update(loss_sum / seen, correct / max(counted, 1))
    return loss_sum, seen, correct, counted


def _scale_grads(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(factor)


def _check_finite(loss: torch.Tensor, epoch: int, step: int, optimizer, dist: D.Dist) -> None:
    bad = not bool(torch.isfinite(loss))
    if dist.enabled:  # every process must stop together, or the others wait forever
        bad = D.all_reduce_sum(dist, [float(bad)])[0] > 0
    if bad:
        lr = max(g["lr"] for g in optimizer.param_groups)
        raise TrainingError(f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}: "
                            f"training diverged; lower the learning rate (now {lr:.3g}) or use --precision fp32")


def _summary(r: dict, state: RunState) -> str:
    text = f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_acc']:.2%}"
    validated = "val_acc" in r or "val_miou" in r or "val_ap50" in r
    if "val_ap50" in r:  # detection (no running accuracy of boxes)
        text = f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} | val loss {r['val_loss']:.4f} AP " \
               f"{r['val_ap']:.3f} AP50 {r['val_ap50']:.3f} AP75 {r['val_ap75']:.3f}"
        if "val_mask_ap50" in r:  # instance masks
            text += f" mask AP {r['val_mask_ap']:.3f} AP50 {r['val_mask_ap50']:.3f}"
        if "val_keypoint_ap50" in r:  # keypoints
            text += f" keypoint AP {r['val_keypoint_ap']:.3f} AP50 {r['val_keypoint_ap50']:.3f}"
    elif "val_acc" in r:
        text += f" | val loss {r['val_loss']:.4f} acc {r['val_acc']:.2%}"
        if "val_top5" in r:
            text += f" top-5 {r['val_top5']:.2%}"
    elif "val_miou" in r:
        text += f" | val loss {r['val_loss']:.4f} mIoU {r['val_miou']:.2%} pixel acc {r['val_pixel_acc']:.2%}"
    text += f" | {r['time_s']:.1f}s"
    if state.best_epoch == r["epoch"] and validated:
        text += " (best)"
    if state.stopped_early:
        metric = "mIoU" if "val_miou" in r else "AP50" if "val_ap50" in r else "accuracy"
        text += f" | early stop: no better validation {metric} since epoch {state.best_epoch}"
    return text


class _Bar:
    """A rich progress bar with the running loss and accuracy (nothing when disabled)."""

    def __init__(self, enabled: bool, title: str, total: int):
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            # stderr, like every message, so stdout stays for results; a log file gets no bar
            console = Console(stderr=True)
            if not console.is_terminal:
                return
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.1%}"),
                                     TimeRemainingColumn(), console=console, transient=True)
            self.task = self.progress.add_task(title, total=total, loss=float("nan"), acc=0.0)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def update(self, loss: float, acc: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=loss, acc=acc)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
