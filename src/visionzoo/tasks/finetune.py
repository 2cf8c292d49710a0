"""Fine-tune a pre-trained model on a folder of labelled images; the result is a bundle.

    result = finetune("pets/", out="runs/pets")                      # strategy chosen from the data
    result = finetune(train="pets/train", val="pets/val", out="runs/pets", strategy="full", epochs=5)
    model = visionzoo.create_model(result.bundle)

Strategies (see `train/config.py`): `linear` computes the frozen backbone's features once
(plus `aug_passes` augmented copies, each once) and trains only the classifier on them;
`partial` trains the last `unfreeze` stages and the head, with the earlier stages frozen and
in eval mode (BatchNorm statistics kept); `full` trains everything, each earlier stage with
a `lr_decay` times smaller learning rate, after a warm-up, with cosine decay; `auto`
chooses (`train/probe.py`) and says why.

Under `torchrun --nproc-per-node N` the same call trains with DistributedDataParallel:
every process takes a 1/N share of each epoch (and of feature extraction and validation),
`batch_size` stays the global batch, and only rank 0 writes. In `linear` mode each process
extracts the features of images `rank::N` and an all-gather gives every process the whole
cache; the classifier then trains with DDP on shards of it like any other module.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from ..bundle import BUNDLE_JSON, RUN_SUBDIR, is_bundle, save_bundle
from ..data.datasets import ImageDataset, open_dataset
from ..data.images import DEFAULT_LIMITS, DecodeLimits, probe_image
from ..data.inputs import Failure
from ..data.preprocess import Preprocess
from ..enums import Precision
from ..errors import ImageError, InputError, OutputBusyError, TrainingError
from ..factory import create_model
from ..fileutil import atomic_path, exclusive, remove_leftovers
from ..metrics import topk_hits
from ..models.base import VisionModel, ZooModel
from ..progress import stderr_echo
from ..registry import split_name
from ..train import checkpoint as ckpt
from ..train import distributed as D
from ..train.config import FinetuneConfig, Strategy
from ..train.data import (
    Augment,
    EpochSampler,
    KeyedImages,
    ShardKeys,
    check_classes,
    default_workers,
    loader,
    sample_seed,
    stratified_split,
    training_preprocess,
)
from ..train.loop import Job, autocast, fit, lr_schedule
from ..train.probe import choose_strategy
from ..train.stages import freeze, map_stages, param_groups, set_train_mode

log = logging.getLogger("visionzoo")
# options that may change when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = {"num_workers"}


@dataclass(frozen=True)
class FinetuneResult:
    bundle: Path  # the bundle folder (load it with `visionzoo.create_model(bundle)`)
    run_dir: Path  # the run folder: checkpoint, history, bundle
    strategy: Strategy  # the strategy used (auto resolved)
    reason: str  # why that strategy
    classes: tuple[str, ...]
    metrics: dict[str, float]  # of the best epoch: val_acc, val_loss, val_top5, train_acc, train_loss
    history: list[dict[str, Any]]  # one record per epoch
    best_epoch: int | None
    epochs_run: int
    stopped_early: bool
    config: FinetuneConfig  # with the strategy's defaults filled in
    failures: tuple[Failure, ...] = ()  # images left out: unreadable, or over the decode limits


def finetune(data: str | os.PathLike | None = None, out: str | os.PathLike = "runs/finetune", *,
             train: str | os.PathLike | None = None, val: str | os.PathLike | None = None,
             config: FinetuneConfig | None = None, resume: bool = False, device: str | torch.device | None = None,
             progress: bool = True, echo: Callable[[str], None] | None = None,
             limits: DecodeLimits | str | None = None, wait: bool = False, **options: Any) -> FinetuneResult:
    """Fine-tune `config.model` on labelled images and write a bundle to `out/bundle`.

    Args:
        data: an ImageFolder tree (one sub-folder per class) or a `path,label` CSV; a
            stratified `val_fraction` of it is held out unless `val` is given.
        out: the run folder (checkpoints, history, and the bundle when done).
        train, val: separate training and validation sets (trees or CSVs) instead of `data`.
        config: the options as a `FinetuneConfig`; keyword `options` override its fields
            (`model`, `strategy`, `epochs`, `lr`, `image_size`, ... see `FinetuneConfig`).
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
    run_dir = Path(out).expanduser()
    dist = D.setup(device)
    try:
        with _owned(run_dir, dist, wait):
            return _run(data, run_dir, train, val, cfg, resume, dist, progress,
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


@dataclass
class _Data:
    """A run's images: the training and validation samples, the class names, where they came from."""

    train_samples: list
    val_samples: list
    classes: list[str]
    sources: dict[str, Any]
    fingerprint: str
    limits: DecodeLimits
    failures: list[Failure]


@dataclass
class _Context(_Data):
    """What every part of one fine-tuning run needs: the data, the model, and how it trains."""

    run_dir: Path
    cfg: FinetuneConfig
    dist: D.Dist
    say: Callable[[str], None]
    net: ZooModel
    pp: Preprocess  # the training preprocessing (crop size and recipe)
    amp: torch.dtype | None  # bfloat16 autocast, or None
    workers: int


def _run(data, run_dir: Path, train, val, cfg: FinetuneConfig, resume: bool, dist: D.Dist, progress: bool,
         echo: Callable[[str], None], limits: DecodeLimits) -> FinetuneResult:
    found = _data(data, train, val, cfg, dist, limits)
    payload = _existing_run(run_dir, resume, cfg, found.fingerprint)
    net, builder_kwargs, base_weights = _starting_model(cfg, found.classes, dist)
    pp = training_preprocess(net.card_required.preprocess, cfg.image_size)
    ctx = _Context(**vars(found), run_dir=run_dir, cfg=cfg, dist=dist,
                   say=echo if dist.is_main else (lambda message: None), net=net, pp=pp,
                   amp=_amp_dtype(cfg.precision, dist.device, pp.crop), workers=default_workers(cfg.num_workers))
    if ctx.failures:
        ctx.say(f"left out {len(ctx.failures)} image{'s' if len(ctx.failures) > 1 else ''} that cannot be read or "
                f"break the decode limits (listed at the end)")
    strategy, reason = _strategy(ctx, payload)
    ctx.cfg = cfg = cfg.resolved(strategy)
    ctx.say(f"strategy: {strategy.value} ({reason})")
    epochs = cfg.settled()[0]
    ctx.say(f"{len(ctx.train_samples)} training and {len(ctx.val_samples)} validation images, {len(ctx.classes)} "
            f"classes; {ctx.net.arch} at {ctx.pp.crop}x{ctx.pp.crop}, {epochs} "
            f"epoch{'s' if epochs > 1 else ''}" + (f", {dist.world} processes" if dist.enabled else ""))
    meta = {"config": cfg.to_dict(), "strategy": strategy.value, "reason": reason, "classes": list(ctx.classes),
            "fingerprint": ctx.fingerprint}
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    parts = _linear_job(ctx) if strategy is Strategy.LINEAR else _network_job(ctx)
    state = _train(ctx, parts, payload, meta, progress)

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
        save_bundle(net, bundle_dir, classes=ctx.classes, preprocess=ctx.pp, architecture=net.arch,
                    builder_kwargs=builder_kwargs, base_weights=base_weights, training=training, metrics=metrics,
                    history=state.history)
        ctx.say(f"bundle: {bundle_dir} (best epoch {state.best_epoch}"
                + (f", val acc {metrics['val_acc']:.2%})" if "val_acc" in metrics else ")"))
    D.barrier(dist)
    return FinetuneResult(bundle=bundle_dir, run_dir=run_dir, strategy=strategy, reason=reason,
                          classes=tuple(ctx.classes), metrics=metrics, history=list(state.history),
                          best_epoch=state.best_epoch, epochs_run=state.epoch, stopped_early=state.stopped_early,
                          config=cfg, failures=tuple(ctx.failures))


def _data(data, train, val, cfg: FinetuneConfig, dist: D.Dist, limits: DecodeLimits) -> _Data:
    """The run's data (without the images that cannot be used), checked against the number of processes."""
    train_samples, val_samples, classes, sources = training_samples(data, train, val, cfg)
    train_samples, failures = usable_samples(train_samples, limits)
    val_samples, val_failures = usable_samples(val_samples, limits)
    failures += val_failures
    check_classes([y for _, y in train_samples], len(classes), classes)
    for what, samples in (("training", train_samples), ("validation", val_samples)):
        if 0 < len(samples) < dist.world or (what == "training" and not samples):
            raise InputError(f"{len(samples)} {what} images cannot be shared among {dist.world} processes; "
                             f"add images or use fewer processes")
    if cfg.batch_size % dist.world:
        raise InputError(f"batch_size {cfg.batch_size} is the global batch: make it a multiple of the "
                         f"{dist.world} processes")
    return _Data(train_samples, val_samples, classes, sources, _fingerprint(train_samples, val_samples, classes),
                 limits, failures)


def _starting_model(cfg: FinetuneConfig, classes: list[str], dist: D.Dist
                    ) -> tuple[ZooModel, dict[str, Any], str | None]:
    """The model to fine-tune (with a head for the run's classes) on the run's device, the builder
    arguments its weights imply, and the name of those weights."""
    # NAME: its default weights; NAME.TAG: those weights; a bundle: its weights (fine-tune further)
    named_weights = is_bundle(cfg.model) or split_name(cfg.model)[1] is not None
    torch.manual_seed(sample_seed(cfg.seed, 0))  # the new classifier's initial weights come from the seed
    # without features_only, create_model returns the model itself
    net = cast(VisionModel, create_model(cfg.model, weights=None if named_weights else "DEFAULT",
                                         num_classes=len(classes)))
    if not isinstance(net, ZooModel):
        raise InputError(f"{cfg.model} is a {net.task.value} model; this fine-tunes classifiers")
    card = net.card_required
    if card.bundle is not None and list(card.bundle.classes) != list(classes):
        net.reset_classifier(len(classes))  # a bundle for other classes: keep its backbone, not its head
    builder_kwargs = dict(card.builder_kwargs)
    return net.to(dist.device), builder_kwargs, card.weights.name if card.weights else card.source


def _strategy(ctx: _Context, payload: dict | None) -> tuple[Strategy, str]:
    """The strategy and why: the checkpoint's when resuming, the probe's for `auto`, else the option."""
    if payload is not None:
        ctx.say(f"resuming {ctx.run_dir} after epoch {payload['epoch']}")
        return Strategy(payload["meta"]["strategy"]), payload["meta"]["reason"]
    if ctx.cfg.strategy is not Strategy.AUTO:
        return ctx.cfg.strategy, "chosen with --strategy"
    choice = None
    if ctx.dist.is_main:
        ctx.say("choosing a strategy: probing the pre-trained features ...")
        choice = choose_strategy(ctx.net, ctx.train_samples, len(ctx.classes), ctx.pp, seed=ctx.cfg.seed,
                                 unfreeze=ctx.cfg.unfreeze, device=ctx.dist.device, num_workers=ctx.workers,
                                 limits=ctx.limits)
    choice = D.broadcast_object(ctx.dist, choice)
    return choice.strategy, choice.reason


def _train(ctx: _Context, parts: dict, payload: dict | None, meta: dict, progress: bool) -> ckpt.RunState:
    """Run the epochs (checkpointing each), then put the best epoch's weights in place."""
    optimizer, scheduler = parts["optimizer"], parts["scheduler"]
    trained: nn.Module = parts["trained"]  # what changes: the network, or only its classifier (linear)
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
    job = Job(prepare=parts["prepare"], batches=parts["batches"], steps_per_epoch=parts["steps"],
              validate=parts["validate"], optimizer=optimizer, scheduler=scheduler, on_best=on_best,
              on_epoch_end=on_epoch_end, num_threads=parts.get("num_threads"))
    cfg = ctx.cfg
    state = fit(job, state, epochs=cfg.settled()[0], seed=cfg.seed, accumulate=cfg.accumulate,
                label_smoothing=cfg.label_smoothing, patience=cfg.patience, amp_dtype=ctx.amp, dist=ctx.dist,
                progress=progress, echo=ctx.say)
    if best["weights"] is not None:
        trained.load_state_dict(best["weights"])
    return state


# -- data ------------------------------------------------------------------------------------

def training_samples(data, train, val, cfg: FinetuneConfig):
    """(train samples, val samples, class names, description of the sources)."""
    if data is None and train is None:
        raise InputError("no training data: give a folder (one sub-folder per class) or CSV as DATA, or --train")
    if data is not None and train is not None:
        raise InputError("give the data either as DATA or as --train (with an optional --val), not both")
    base: ImageDataset = open_dataset(data if data is not None else train)
    classes = base.classes
    if val is not None:
        val_ds = open_dataset(val, classes=classes)
        train_samples, val_samples = base.samples, val_ds.samples
        sources: dict[str, str | None] = {"train": str(data or train), "val": str(val)}
    elif cfg.val_fraction > 0:
        tr, va = stratified_split(base.targets, cfg.val_fraction, cfg.seed)
        train_samples, val_samples = [base.samples[i] for i in tr], [base.samples[i] for i in va]
        sources = {"train": str(data or train), "val": f"{cfg.val_fraction:g} of train, stratified, seed {cfg.seed}"}
    else:
        train_samples, val_samples = base.samples, []
        sources = {"train": str(data or train), "val": None}
    check_classes([y for _, y in train_samples], len(classes), classes)
    return train_samples, val_samples, list(classes), sources


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


def _fingerprint(train_samples, val_samples, classes) -> str:
    h = hashlib.sha256(json.dumps(classes).encode())
    for part in (train_samples, val_samples):
        h.update(b"|")
        for path, label in part:
            h.update(f"{os.path.abspath(path)}\t{label}\n".encode())
    return h.hexdigest()[:16]


def _existing_run(run_dir: Path, resume: bool, cfg: FinetuneConfig, fingerprint: str) -> dict | None:
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
    ours = cfg.resolved(saved.strategy) if cfg.strategy is Strategy.AUTO else cfg.resolved(cfg.strategy)
    changed = [k for k, v in ours.to_dict().items() if k not in RESUMABLE_CHANGES and saved.to_dict().get(k) != v]
    if changed:
        diffs = ", ".join(f"{k}={saved.to_dict().get(k)!r} (now {ours.to_dict()[k]!r})" for k in changed[:4])
        raise TrainingError(f"{run_dir}: the checkpoint was trained with {diffs}; resume with the same options "
                            f"or choose another --out")
    return payload


def _amp_dtype(precision: Precision, device: torch.device, crop_size: int) -> torch.dtype | None:
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


def _optimizer(groups: list[dict], cfg: FinetuneConfig, steps_per_epoch: int):
    epochs, lr, warmup_epochs = cfg.settled()
    optimizer = torch.optim.AdamW(groups, lr=lr)
    per_epoch = math.ceil(steps_per_epoch / cfg.accumulate)
    head_steps = cfg.head_epochs * per_epoch if cfg.strategy is not Strategy.LINEAR else 0
    total = epochs * per_epoch
    # a warm-up longer than half the (post-head) run would leave no time at the full rate
    warmup = min(round(warmup_epochs * per_epoch), (total - head_steps) // 2)
    schedule = lr_schedule(total, warmup, head_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _ddp(module: nn.Module, dist: D.Dist) -> nn.Module:
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


# -- partial and full: the network trains on images ------------------------------------------

def _network_job(ctx: _Context) -> dict:
    net, train_samples, val_samples, pp = ctx.net, ctx.train_samples, ctx.val_samples, ctx.pp
    cfg, dist, amp, workers = ctx.cfg, ctx.dist, ctx.amp, ctx.workers
    stages = map_stages(net, pp.crop)
    n = stages.num_stages
    if cfg.strategy is Strategy.FULL:
        main = set(range(n + 1))
    else:
        main = set(range(max(0, n - cfg.unfreeze), n + 1))
    if stages.unused:
        log.info("%d parameters never run in a forward pass stay frozen (%s, ...)", len(stages.unused),
                 stages.unused[0])
    groups = param_groups(net, stages, cfg.settled()[1], cfg.lr_decay, cfg.weight_decay, main)
    augment = Augment(pp, cfg.crop_scale, hflip=cfg.hflip) if cfg.augment else None
    train_set = KeyedImages(train_samples, pp, augment, ctx.limits)
    sampler = EpochSampler(len(train_samples), dist, cfg.seed, augment=augment is not None)
    per_rank = cfg.batch_size // dist.world
    train_loader = loader(train_set, sampler, per_rank, workers, dist.device)
    optimizer, scheduler = _optimizer(groups, cfg, len(train_loader))
    current: dict[str, Any] = {"trainable": None, "frozen": [], "module": None}

    def prepare(epoch: int) -> nn.Module:
        trainable = {n} if epoch < cfg.head_epochs else main
        if trainable != current["trainable"]:
            current["module"] = None  # drop the old DDP wrapper (and its gradient hooks) first
            current["frozen"] = freeze(net, stages, trainable)
            # DDP tracks the parameters that require gradients when it is built
            current["module"], current["trainable"] = _ddp(net, dist), trainable
        set_train_mode(net, current["frozen"])
        return current["module"]

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        return train_loader

    val_loader = None
    if val_samples:
        val_loader = loader(KeyedImages(val_samples, pp, None, ctx.limits), ShardKeys(len(val_samples), dist, None), 64,
                            workers, dist.device)

    def validate():
        if val_loader is None:
            return None
        net.eval()
        return _evaluate_batches(((net(x.to(dist.device)), y) for x, y in val_loader), dist, amp)

    return {"prepare": prepare, "batches": batches, "steps": len(train_loader), "validate": validate,
            "optimizer": optimizer, "scheduler": scheduler, "trained": net}


def _evaluate_batches(outputs, dist: D.Dist, amp) -> dict[str, float]:
    """Loss, accuracy and top-5 over (logits, labels) pairs, summed over all processes."""
    loss_sum = correct = top5 = seen = 0.0
    with torch.inference_mode(), autocast(dist.device, amp):
        for logits, y in outputs:
            logits, y = logits.float(), y.to(logits.device)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float(topk_hits(logits, y, 1).sum())
            top5 += float(topk_hits(logits, y, 5).sum())
            seen += len(y)
    loss_sum, correct, top5, seen = D.all_reduce_sum(dist, [loss_sum, correct, top5, seen])
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "top5": top5 / max(seen, 1)}


# -- linear: the classifier trains on features computed once ---------------------------------

class _HeadOnMaps(nn.Module):
    """`forward_head` on cached feature maps, for heads that are not a layer on the pre-logits
    (SqueezeNet's classifier is a convolution on the map)."""

    def __init__(self, net: ZooModel):
        super().__init__()
        self.net = net

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(maps)


def _classifier_on_pre_logits(net: ZooModel, maps: torch.Tensor) -> bool:
    """Whether logits == classifier(pre-logits) for this model (checked on real feature maps)."""
    try:
        with torch.inference_mode():
            direct = net.forward_head(maps)
            composed = net.get_classifier()(net.forward_head(maps, pre_logits=True))
        return composed.shape == direct.shape and torch.allclose(composed, direct, rtol=1e-4, atol=1e-5)
    except (RuntimeError, ValueError):
        return False


def extract_features(net: ZooModel, samples: Sequence[tuple], pp: Preprocess, augment: Augment | None,
                     seed_parts: tuple[int, ...] | None, dist: D.Dist, amp, workers: int,
                     batch_size: int = 64, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[torch.Tensor, bool]:
    """Run the frozen backbone once over `samples` (this process's `rank::world` share; all
    shares gathered): returns (features, on_pre_logits). Features are the pooled pre-logits
    when the classifier is a layer on them, else the feature maps `forward_head` takes."""
    dataset = KeyedImages(samples, pp, augment, limits)
    rows, mode = [], None
    net.eval()
    with torch.inference_mode():
        for x, _ in loader(dataset, ShardKeys(len(samples), dist, seed_parts), batch_size, workers, dist.device):
            with autocast(dist.device, amp):
                maps = net.forward_features(x.to(dist.device))
            if mode is None:
                mode = _classifier_on_pre_logits(net, maps.float())
            rows.append((net.forward_head(maps.float(), pre_logits=True) if mode else maps).float().cpu())
    local = torch.cat(rows) if rows else torch.empty(0)
    mode = bool(D.all_reduce_sum(dist, [float(bool(mode))])[0] == dist.world) if dist.enabled else bool(mode)
    return D.gather_rows(dist, local, len(samples)), mode


def _linear_job(ctx: _Context) -> dict:
    net, cfg, dist = ctx.net, ctx.cfg, ctx.dist
    cache = _feature_cache(ctx)
    train_x, train_y = cache["train"].to(dist.device), cache["train_labels"].to(dist.device)
    val_x, val_y = cache["val"].to(dist.device), cache["val_labels"].to(dist.device)
    # the rest of the network stays in eval mode and frozen; only the final layer learns
    for p in net.parameters():
        p.requires_grad_(False)
    classifier = net.get_classifier()
    for p in classifier.parameters():
        p.requires_grad_(True)
    module = classifier if cache["on_pre_logits"] else _HeadOnMaps(net)
    groups = [{"params": [p for p in classifier.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in classifier.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    sampler = EpochSampler(len(train_x), dist, cfg.seed, augment=False)
    per_rank = cfg.batch_size // dist.world
    steps = math.ceil(len(sampler) / per_rank)
    optimizer, scheduler = _optimizer([g for g in groups if g["params"]], cfg, steps)
    wrapped = _ddp(module, dist)

    def prepare(epoch: int) -> nn.Module:
        net.eval()  # the backbone never leaves eval mode: its BatchNorm statistics stay as pre-trained
        return wrapped

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        order = torch.tensor([i for i, _ in sampler], device=train_x.device)
        for s in range(0, len(order), per_rank):
            idx = order[s:s + per_rank]
            yield train_x[idx], train_y[idx]

    def validate():
        if not len(val_y):
            return None
        # every process holds all validation features; each scores its share
        idx = torch.arange(dist.rank, len(val_y), dist.world, device=val_y.device)
        return _evaluate_batches(((module(val_x[idx[s:s + 256]]), val_y[idx[s:s + 256]])
                                  for s in range(0, len(idx), 256)), dist, None)

    # ops this small run fastest on one thread: more only add synchronisation (measured: 15x
    # slower with two threads on a busy two-core machine)
    small = sum(p.numel() for p in classifier.parameters()) * per_rank <= 1 << 26
    return {"prepare": prepare, "batches": batches, "steps": steps, "validate": validate,
            "optimizer": optimizer, "scheduler": scheduler, "trained": classifier,
            "num_threads": 1 if small else None}


def _feature_cache(ctx: _Context) -> dict:
    """Features of the training images (clean, then `aug_passes` augmented passes) and of the
    validation images: loaded from `run_dir/features.pt` when a resumed run made them."""
    net, train_samples, val_samples, pp = ctx.net, ctx.train_samples, ctx.val_samples, ctx.pp
    cfg, dist, amp, workers, run_dir, say = ctx.cfg, ctx.dist, ctx.amp, ctx.workers, ctx.run_dir, ctx.say
    path = run_dir / ckpt.FEATURES
    key = {"fingerprint": ctx.fingerprint, "model": cfg.model, "crop": pp.crop, "aug_passes": cfg.aug_passes,
           "augment": [cfg.augment, list(cfg.crop_scale), cfg.hflip], "seed": cfg.seed,
           "precision": "bf16" if amp else "fp32"}
    if path.is_file():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
            if cache.get("key") == json.dumps(key):
                say(f"features: reusing {path}")
                return cache
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed
            pass
    augment = Augment(pp, cfg.crop_scale, hflip=cfg.hflip) if cfg.augment else None
    passes = [(None, None)] + [(augment, (cfg.seed, 7, p)) for p in range(1, cfg.aug_passes + 1)] \
        if augment is not None else [(None, None)]
    if cfg.aug_passes and augment is None:
        say("aug_passes ignored: augmentation is off")
    labels = torch.tensor([y for _, y in train_samples])
    train_rows, on_pre_logits = [], True
    for i, (aug, seed_parts) in enumerate(passes):
        say(f"features: pass {i + 1}/{len(passes)} over {len(train_samples)} training images"
            + (" (augmented)" if aug is not None else ""))
        rows, mode = extract_features(net, train_samples, pp, aug, seed_parts, dist, amp, workers,
                                      limits=ctx.limits)
        train_rows.append(rows)
        on_pre_logits &= mode
    val_rows = torch.empty(0)
    if val_samples:
        val_rows, mode = extract_features(net, val_samples, pp, None, None, dist, amp, workers, limits=ctx.limits)
        on_pre_logits &= mode
    cache = {"key": json.dumps(key), "train": torch.cat(train_rows), "train_labels": labels.repeat(len(passes)),
             "val": val_rows, "val_labels": torch.tensor([y for _, y in val_samples], dtype=torch.long),
             "on_pre_logits": on_pre_logits}
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(cache, tmp)
    return cache

