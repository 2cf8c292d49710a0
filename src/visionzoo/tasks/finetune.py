"""Fine-tune a pre-trained model on your labelled images; the result is a bundle.

    result = finetune("pets/", out="runs/pets")                      # strategy chosen from the data
    result = finetune(train="pets/train", val="pets/val", out="runs/pets", strategy="full", epochs=5)
    result = finetune("shapes/", out="runs/shapes", model="efficientnet_lite0", head="lraspp")  # masks
    result = finetune("boxes/instances.json", out="runs/boxes", model="efficientnet_lite0", head="fcos")  # boxes
    model = visionzoo.create_model(result.bundle)

The task follows the data: a COCO instances JSON (or a folder holding `instances.json`) or a
`path,x1,y1,x2,y2,label` CSV fine-tunes a detector (`train/detection.py`), a folder with
`images/` and `masks/` (class-index PNGs) a segmentation model (`train/segmentation.py`), any
other folder or CSV a classifier (`train/classification.py`). Each task is a `Recipe`
(`train/recipe.py`): its data, starting model, strategy choice, training job and validation
metric; this module runs any of them the same way. Strategies (see `train/config.py`):
`linear` trains the new head alone (a classifier's on features computed once), `partial` also
the last `unfreeze` stages, with the earlier stages frozen and in eval mode (BatchNorm
statistics kept), `full` everything, each earlier stage with a `lr_decay` times smaller
learning rate, after a warm-up, with cosine decay; `auto` chooses and says why.

Every epoch ends with a checkpoint; `resume=True` continues a killed run exactly (the data
order and augmentations are functions of the seed and epoch). Errors in the data (a missing
mask, a mask of the wrong size, a class index beyond the classes) are found before anything
is written.

Under `torchrun --nproc-per-node N` the same call trains with DistributedDataParallel:
every process takes a 1/N share of each epoch (and of feature extraction and validation),
`batch_size` stays the global batch, and only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import BUNDLE_JSON, RUN_SUBDIR, save_bundle
from ..data.images import DEFAULT_LIMITS, DecodeLimits, probe_image
from ..data.inputs import Failure
from ..enums import Task
from ..errors import ImageError, InputError, OutputBusyError, TrainingError
from ..fileutil import exclusive, remove_leftovers
from ..progress import stderr_echo
from ..train import checkpoint as ckpt
from ..train import distributed as D
from ..train.classification import ClassificationRecipe, extract_features, training_samples
from ..train.config import FinetuneConfig, Strategy
from ..train.data import default_workers
from ..train.detection import DetectionRecipe
from ..train.loop import Job, fit
from ..train.recipe import Recipe, RunContext, RunData, amp_dtype
from ..train.segmentation import SegmentationRecipe

log = logging.getLogger("visionzoo")
# options that may change when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = {"num_workers"}
# the tasks that fine-tune, most specific data layout first (classification takes any other)
RECIPES: tuple[Recipe, ...] = (DetectionRecipe(), SegmentationRecipe(), ClassificationRecipe())


@dataclass(frozen=True)
class FinetuneResult:
    bundle: Path  # the bundle folder (load it with `visionzoo.create_model(bundle)`)
    run_dir: Path  # the run folder: checkpoint, history, bundle
    strategy: Strategy  # the strategy used (auto resolved)
    reason: str  # why that strategy
    classes: tuple[str, ...]
    # of the best epoch: val_acc, val_loss, val_top5 (classification) or val_miou, val_pixel_acc, val_loss
    # (segmentation); train_acc (of pixels, for segmentation), train_loss
    metrics: dict[str, float]
    history: list[dict[str, Any]]  # one record per epoch
    best_epoch: int | None
    epochs_run: int
    stopped_early: bool
    config: FinetuneConfig  # with the strategy's defaults filled in
    task: Task = Task.CLASSIFICATION
    failures: tuple[Failure, ...] = ()  # images left out: unreadable, or over the decode limits


def finetune(data: str | os.PathLike | None = None, out: str | os.PathLike = "runs/finetune", *,
             train: str | os.PathLike | None = None, val: str | os.PathLike | None = None,
             classes: Sequence[str] | str | None = None, config: FinetuneConfig | None = None, resume: bool = False,
             device: str | torch.device | None = None, progress: bool = True,
             echo: Callable[[str], None] | None = None, limits: DecodeLimits | str | None = None,
             wait: bool = False, **options: Any) -> FinetuneResult:
    """Fine-tune `config.model` on labelled images (or images and masks) and write a bundle to `out/bundle`.

    Args:
        data: an ImageFolder tree (one sub-folder per class), a `path,label` CSV, or a segmentation
            folder (`images/`, `masks/`, `classes.txt`); `val_fraction` of it is held out (stratified
            by class for classification) unless `val` is given.
        out: the run folder (checkpoints, history, and the bundle when done).
        train, val: separate training and validation sets instead of `data`.
        classes: a segmentation dataset's class names in index order (a list or one comma-separated
            string), instead of its `classes.txt`.
        config: the options as a `FinetuneConfig`; keyword `options` override its fields
            (`model`, `strategy`, `epochs`, `lr`, `image_size`, `head`, ... see `FinetuneConfig`).
        resume: continue the run in `out` from its last checkpoint (a fresh start when
            there is none). Without it, a folder that already holds a run is refused.
        device: "cpu", "cuda", "cuda:1" or None/"auto" (the GPU when there is one).
        progress: show progress bars and per-epoch lines (rank 0 only).
        echo: where messages go (default: stderr).
        limits: the decode budget of each image (`DecodeLimits`, or text such as
            "pixels=200M,bytes=1G"). Every image is checked from its header first; the ones
            that cannot be read or break the budget are left out and listed in `failures`.
        wait: when another run is using `out`, wait for it to finish (default: refuse with an
            `OutputBusyError` naming it). A run owns its folder while it runs.
    """
    try:
        cfg = replace(config or FinetuneConfig(), **options)
    except TypeError as e:
        raise InputError(f"unknown fine-tuning option ({e}); see visionzoo.train.config.FinetuneConfig") from None
    limits = DecodeLimits.parse(limits) if isinstance(limits, str) else limits or DEFAULT_LIMITS
    recipe = recipe_for(data if data is not None else train)
    run_dir = Path(out).expanduser()
    dist = D.setup(device)
    try:
        with _owned(run_dir, dist, wait):
            return _run(recipe, data, run_dir, train, val, classes, cfg, resume, dist, progress,
                        echo or stderr_echo(progress and dist.is_main), limits)
    finally:
        D.teardown(dist)


@contextlib.contextmanager
def _owned(run_dir: Path, dist: D.Dist, wait: bool) -> Iterator[None]:
    """The run folder, owned by this run (its main process holds the lock; every process learns
    whether it got it), with the temporary files of a killed run removed."""
    with contextlib.ExitStack() as stack:
        refused = None
        if dist.is_main:
            try:
                stack.enter_context(exclusive(run_dir, wait=wait))
            except OutputBusyError as e:
                refused = str(e)
        refused = D.broadcast_object(dist, refused)
        if refused is not None:
            raise OutputBusyError(refused)
        if dist.is_main:
            for name in (ckpt.CHECKPOINT, ckpt.FEATURES, ckpt.HISTORY, RUN_SUBDIR):
                remove_leftovers(run_dir / name)
        yield


def recipe_for(data: str | os.PathLike | None) -> Recipe:
    """The recipe of the task `data` is laid out for."""
    return next(r for r in RECIPES if r.detects(data))


def _run(recipe: Recipe, data, run_dir: Path, train, val, classes, cfg: FinetuneConfig, resume: bool,
         dist: D.Dist, progress: bool, echo: Callable[[str], None], limits: DecodeLimits) -> FinetuneResult:
    found = _data(recipe, data, train, val, classes, cfg, dist, limits)
    payload = _existing_run(run_dir, resume, cfg, found.fingerprint, recipe.task)
    net, builder_kwargs, base_weights = recipe.starting_model(cfg, found.classes, dist)
    pp = recipe.preprocess(net, cfg)
    size = recipe.train_size(pp)
    ctx = RunContext(**vars(found), run_dir=run_dir, cfg=cfg, dist=dist,
                     say=echo if dist.is_main else (lambda message: None), net=net, pp=pp,
                     amp=amp_dtype(cfg.precision, dist.device, size), workers=default_workers(cfg.num_workers))
    if ctx.failures:
        ctx.say(f"left out {len(ctx.failures)} image{'s' if len(ctx.failures) > 1 else ''} that cannot be read or "
                f"break the decode limits (listed at the end)")
    strategy, reason = _strategy(recipe, ctx, payload)
    ctx.cfg = cfg = cfg.resolved(strategy, recipe.task)
    ctx.say(f"strategy: {strategy.value} ({reason})")
    epochs = cfg.settled()[0]
    ctx.say(f"{len(ctx.train_samples)} training and {len(ctx.val_samples)} validation images, {len(ctx.classes)} "
            f"classes; {ctx.net.arch} at {size}x{size}, {epochs} "
            f"epoch{'s' if epochs > 1 else ''}" + (f", {dist.world} processes" if dist.enabled else ""))
    meta = {"config": cfg.to_dict(), "strategy": strategy.value, "reason": reason, "classes": list(ctx.classes),
            "fingerprint": ctx.fingerprint}
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    state = _train(recipe, ctx, payload, meta, progress)

    net = ctx.net
    net.eval()
    record = state.history[state.best_epoch - 1] if state.best_epoch else {}
    metrics = {k: v for k, v in record.items() if k.startswith(("val_", "train_"))}
    metrics["epoch"] = state.best_epoch
    bundle_dir = run_dir / RUN_SUBDIR
    if dist.is_main:
        training = {**cfg.to_dict(), "strategy": strategy.value, "strategy_reason": reason,
                    "precision_used": "bf16" if ctx.amp is torch.bfloat16 else "fp32", "processes": dist.world,
                    "epochs_run": state.epoch, "best_epoch": state.best_epoch, "stopped_early": state.stopped_early,
                    "train_images": len(ctx.train_samples), "val_images": len(ctx.val_samples), "data": ctx.sources}
        if recipe.task is not Task.CLASSIFICATION:
            training["task"] = recipe.task.value
        save_bundle(net, bundle_dir, classes=ctx.classes, preprocess=ctx.pp, architecture=net.arch,
                    builder_kwargs=builder_kwargs, base_weights=base_weights, training=training, metrics=metrics,
                    history=state.history)
        ctx.say(f"bundle: {bundle_dir} (best epoch {state.best_epoch}{recipe.describe(metrics)})")
    D.barrier(dist)
    return FinetuneResult(bundle=bundle_dir, run_dir=run_dir, strategy=strategy, reason=reason,
                          classes=tuple(ctx.classes), metrics=metrics, history=list(state.history),
                          best_epoch=state.best_epoch, epochs_run=state.epoch, stopped_early=state.stopped_early,
                          config=cfg, task=recipe.task, failures=tuple(ctx.failures))


def _data(recipe: Recipe, data, train, val, classes, cfg: FinetuneConfig, dist: D.Dist,
          limits: DecodeLimits) -> RunData:
    """The run's data (without the images that cannot be used), checked against the number of processes."""
    found = recipe.data(data, train, val, classes, cfg, dist)
    train_kept, failures = usable_samples(found.train_samples, limits)
    val_kept, val_failures = usable_samples(found.val_samples, limits)
    found.limits, found.failures = limits, failures + val_failures
    if found.failures:
        recipe.keep(found, train_kept, val_kept)
    for what, samples in (("training", found.train_samples), ("validation", found.val_samples)):
        if 0 < len(samples) < dist.world or (what == "training" and not samples):
            raise InputError(f"{len(samples)} {what} images cannot be shared among {dist.world} processes; "
                             f"add images or use fewer processes")
    if cfg.batch_size % dist.world:
        raise InputError(f"batch_size {cfg.batch_size} is the global batch: make it a multiple of the "
                         f"{dist.world} processes")
    return found


def _strategy(recipe: Recipe, ctx: RunContext, payload: dict | None) -> tuple[Strategy, str]:
    """The strategy and why: the checkpoint's when resuming, the recipe's choice for `auto`, else the option."""
    if payload is not None:
        ctx.say(f"resuming {ctx.run_dir} after epoch {payload['epoch']}")
        return Strategy(payload["meta"]["strategy"]), payload["meta"]["reason"]
    if ctx.cfg.strategy is not Strategy.AUTO:
        return ctx.cfg.strategy, "chosen with --strategy"
    choice = recipe.choose_strategy(ctx) if ctx.dist.is_main else None
    return D.broadcast_object(ctx.dist, choice)


def _train(recipe: Recipe, ctx: RunContext, payload: dict | None, meta: dict, progress: bool) -> ckpt.RunState:
    """Run the epochs (checkpointing each), then put the best epoch's weights in place."""
    parts = recipe.job(ctx)
    optimizer, scheduler = parts.optimizer, parts.scheduler
    trained: nn.Module = parts.trained  # what changes: the network, or only its classifier (linear)
    best: dict[str, dict[str, torch.Tensor] | None] = {"weights": None}

    def on_best() -> None:
        best["weights"] = {k: v.detach().to("cpu", copy=True) for k, v in trained.state_dict().items()}

    def on_epoch_end(state: ckpt.RunState) -> None:
        if ctx.dist.is_main:
            ckpt.save_checkpoint(ctx.run_dir, model=trained, optimizer=optimizer, scheduler=scheduler, state=state,
                                 best_model=best["weights"], meta=meta)
        D.barrier(ctx.dist)

    state = ckpt.RunState()
    if payload is not None:
        state = ckpt.restore(payload, model=trained, optimizer=optimizer, scheduler=scheduler)
        best["weights"] = payload.get("best_model")
    job = Job(prepare=parts.prepare, batches=parts.batches, steps_per_epoch=parts.steps, validate=parts.validate,
              optimizer=optimizer, scheduler=scheduler, on_best=on_best, on_epoch_end=on_epoch_end, loss=parts.loss,
              hits=parts.hits, metric=recipe.metric, num_threads=parts.num_threads)
    cfg = ctx.cfg
    state = fit(job, state, epochs=cfg.settled()[0], seed=cfg.seed, accumulate=cfg.accumulate, patience=cfg.patience,
                amp_dtype=ctx.amp, dist=ctx.dist, progress=progress, echo=ctx.say)
    if best["weights"] is not None:
        trained.load_state_dict(best["weights"])
    return state


def usable_samples(samples: list, limits: DecodeLimits) -> tuple[list, list[Failure]]:
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


def _existing_run(run_dir: Path, resume: bool, cfg: FinetuneConfig, fingerprint: str, task: Task) -> dict | None:
    has_run = (run_dir / ckpt.CHECKPOINT).is_file() or (run_dir / RUN_SUBDIR / BUNDLE_JSON).is_file()
    if not resume:
        if has_run:
            raise InputError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        return None
    payload = ckpt.load_checkpoint(run_dir)
    if payload is None:
        return None
    meta = payload["meta"]
    if meta["fingerprint"] != fingerprint:
        raise TrainingError(f"{run_dir}: the data differ from the checkpoint's (other images, labels or split); "
                            f"resume with the same data or choose another --out")
    saved = FinetuneConfig.from_dict(meta["config"])
    strategy = saved.strategy if cfg.strategy is Strategy.AUTO else cfg.strategy
    ours = cfg.resolved(strategy, task).to_dict()
    changed = [k for k, v in ours.items() if k not in RESUMABLE_CHANGES and saved.to_dict().get(k) != v]
    if changed:
        diffs = ", ".join(f"{k}={saved.to_dict().get(k)!r} (now {ours[k]!r})" for k in changed[:4])
        raise TrainingError(f"{run_dir}: the checkpoint was trained with {diffs}; resume with the same options "
                            f"or choose another --out")
    return payload


__all__ = ["RECIPES", "FinetuneResult", "extract_features", "finetune", "recipe_for", "training_samples"]
