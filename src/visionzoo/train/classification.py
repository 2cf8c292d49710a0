"""Fine-tuning a classifier: the classification `Recipe`.

Data: an ImageFolder tree or a `path,label` CSV, a stratified `val_fraction` held out unless a
separate validation set is given. Strategies (see `config.py`): `linear` computes the frozen
backbone's features once (plus `aug_passes` augmented copies, each once) and trains only the
classifier on them; `partial` trains the last `unfreeze` stages and the head, with the earlier
stages frozen and in eval mode (BatchNorm statistics kept); `full` trains everything, each
earlier stage with a `lr_decay` times smaller learning rate; `auto` chooses (`probe.py`).

Under DDP in `linear` mode each process extracts the features of images `rank::N` and an
all-gather gives every process the whole cache; the classifier then trains with DDP on shards
of it like any other module.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..bundle import is_bundle
from ..data.datasets import ImageDataset, open_dataset
from ..data.images import DEFAULT_LIMITS, DecodeLimits
from ..data.preprocess import Preprocess
from ..enums import Task
from ..errors import InputError
from ..factory import create_model
from ..fileutil import atomic_path
from ..metrics import topk_hits
from ..models.base import VisionModel, ZooModel
from ..registry import split_name
from . import checkpoint as ckpt
from . import distributed as D
from .config import FinetuneConfig, Strategy
from .data import (
    Augment,
    EpochSampler,
    KeyedImages,
    ShardKeys,
    check_classes,
    loader,
    sample_seed,
    stratified_split,
    training_preprocess,
)
from .loop import autocast, classification_loss
from .probe import choose_strategy
from .recipe import (
    JobParts,
    Recipe,
    RunContext,
    RunData,
    StagedUnfreeze,
    ddp,
    fingerprint,
    make_optimizer,
    trainable_stages,
)
from .stages import StageMap, map_stages, param_groups

log = logging.getLogger("visionzoo")


class ClassificationRecipe(Recipe):
    task = Task.CLASSIFICATION
    metric = "acc"

    def detects(self, data) -> bool:
        return True  # the default: folders of classes and CSVs

    def data(self, data, train, val, classes, cfg: FinetuneConfig, dist: D.Dist) -> RunData:
        if classes is not None:
            raise InputError("--classes names the classes of a segmentation dataset; a classification dataset's "
                             "classes are its sub-folders (or CSV labels)")
        train_samples, val_samples, names, sources = training_samples(data, train, val, cfg)
        return RunData(train_samples, val_samples, names, sources,
                       fingerprint((train_samples, val_samples), names))

    def keep(self, found: RunData, train: list, val: list) -> None:
        super().keep(found, train, val)
        check_classes([y for _, y in found.train_samples], len(found.classes), found.classes)

    def starting_model(self, cfg: FinetuneConfig, classes: Sequence[str], dist: D.Dist
                       ) -> tuple[ZooModel, dict[str, Any], str | None]:
        # NAME: its default weights; NAME.TAG: those weights; a bundle: its weights (fine-tune further)
        named_weights = is_bundle(cfg.model) or split_name(cfg.model)[1] is not None
        torch.manual_seed(sample_seed(cfg.seed, 0))  # the new classifier's initial weights come from the seed
        net = create_model(cfg.model, weights=None if named_weights else "DEFAULT", num_classes=len(classes))
        if not isinstance(net, VisionModel):  # create_model wraps a model only with features_only
            raise RuntimeError(f"create_model returned a {type(net).__name__}, not a model")
        if not isinstance(net, ZooModel):
            raise InputError(f"{cfg.model} is a {net.task.value} model; a folder of class sub-folders fine-tunes "
                             f"classifiers (a segmentation dataset has images/ and masks/ folders)")
        if net.task is not self.task:  # a video classifier on images, or an image classifier on videos
            data = "videos" if self.task is Task.VIDEO else "images"
            raise InputError(f"{cfg.model} is a {net.task.value} model and the data are {data}: choose a "
                             f"{self.task.value} model")
        card = net.require_card()
        if card.bundle is not None and list(card.bundle.classes) != list(classes):
            net.reset_classifier(len(classes))  # a bundle for other classes: keep its backbone, not its head
        builder_kwargs = dict(card.builder_kwargs)
        return net.to(dist.device), builder_kwargs, card.weights.name if card.weights else card.source

    def preprocess(self, net, cfg: FinetuneConfig) -> Preprocess:
        return training_preprocess(net.require_card().preprocess, cfg.image_size)

    def train_size(self, pp: Preprocess) -> int:
        return pp.crop

    def choose_strategy(self, ctx: RunContext) -> tuple[Strategy, str]:
        ctx.say("choosing a strategy: probing the pre-trained features ...")
        choice = choose_strategy(ctx.net, ctx.train_samples, len(ctx.classes), ctx.pp, seed=ctx.cfg.seed,
                                 unfreeze=ctx.cfg.unfreeze, device=ctx.dist.device, num_workers=ctx.workers,
                                 limits=ctx.limits)
        return choice.strategy, choice.reason

    def job(self, ctx: RunContext) -> JobParts:
        return _linear_job(ctx, self) if ctx.cfg.strategy is Strategy.LINEAR else _network_job(ctx, self)

    # what the jobs below take from the recipe: the video recipe (`video.py`) gives clips instead

    def dataset(self, ctx: RunContext, samples: Sequence[tuple], augment: Any) -> Dataset:
        """`(index, seed)` keys -> (input, label): augmented with a seed, the evaluation view without."""
        return KeyedImages(samples, ctx.pp, augment, ctx.limits)

    def augmentation(self, ctx: RunContext) -> Any:
        """The training augmentation (None: off)."""
        return Augment(ctx.pp, ctx.cfg.crop_scale, hflip=bool(ctx.cfg.hflip)) if ctx.cfg.augment else None

    def stage_map(self, ctx: RunContext) -> StageMap:
        return map_stages(ctx.net, ctx.pp.crop)

    def eval_batch(self, ctx: RunContext) -> int:
        """The batch size of validation and feature extraction."""
        return 64

    def feature_key(self, ctx: RunContext) -> dict[str, Any]:
        """What else changes the cached features (beyond the data, model, crop, augmentation and seed)."""
        return {}


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
        sources: dict[str, Any] = {"train": str(data or train), "val": str(val)}
    elif cfg.val_fraction > 0:
        tr, va = stratified_split(base.targets, cfg.val_fraction, cfg.seed)
        train_samples, val_samples = [base.samples[i] for i in tr], [base.samples[i] for i in va]
        sources = {"train": str(data or train), "val": f"{cfg.val_fraction:g} of train, stratified, seed {cfg.seed}"}
    else:
        train_samples, val_samples = base.samples, []
        sources = {"train": str(data or train), "val": None}
    check_classes([y for _, y in train_samples], len(classes), classes)
    return train_samples, val_samples, list(classes), sources


# -- partial and full: the network trains on images ------------------------------------------

def _network_job(ctx: RunContext, recipe: ClassificationRecipe) -> JobParts:
    net, train_samples, val_samples = ctx.net, ctx.train_samples, ctx.val_samples
    cfg, dist, amp, workers = ctx.cfg, ctx.dist, ctx.amp, ctx.workers
    stages = recipe.stage_map(ctx)
    n = stages.num_stages
    main = trainable_stages(cfg.strategy, n, cfg.unfreeze)  # full or partial (linear is its own job)
    if stages.unused:
        log.info("%d parameters never run in a forward pass stay frozen (%s, ...)", len(stages.unused),
                 stages.unused[0])
    groups = param_groups(net, stages, cfg.settled()[1], cfg.lr_decay, cfg.weight_decay, main)
    augment = recipe.augmentation(ctx)
    train_set = recipe.dataset(ctx, train_samples, augment)
    sampler = EpochSampler(len(train_samples), dist, cfg.seed, augment=augment is not None)
    per_rank = cfg.batch_size // dist.world
    train_loader = loader(train_set, sampler, per_rank, workers, dist.device)
    optimizer, scheduler = make_optimizer(groups, cfg, len(train_loader))
    staged = StagedUnfreeze(net, stages, main, cfg.head_epochs, dist, sampler, train_loader)

    val_loader = None
    if val_samples:
        val_loader = loader(recipe.dataset(ctx, val_samples, None), ShardKeys(len(val_samples), dist, None),
                            recipe.eval_batch(ctx), workers, dist.device)

    def validate():
        if val_loader is None:
            return None
        net.eval()
        return _evaluate_batches(((net(x.to(dist.device)), y) for x, y in val_loader), dist, amp)

    return JobParts(prepare=staged.prepare, batches=staged.batches, steps=len(train_loader), validate=validate,
                    optimizer=optimizer, scheduler=scheduler, trained=net,
                    loss=classification_loss(cfg.label_smoothing))


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
                     batch_size: int = 64, limits: DecodeLimits = DEFAULT_LIMITS,
                     dataset: Dataset | None = None) -> tuple[torch.Tensor, bool]:
    """Run the frozen backbone once over `samples` (this process's `rank::world` share; all
    shares gathered): returns (features, on_pre_logits). Features are the pooled pre-logits
    when the classifier is a layer on them, else the feature maps `forward_head` takes.
    `dataset` stands for the images of `samples` (a video recipe's clips)."""
    dataset = KeyedImages(samples, pp, augment, limits) if dataset is None else dataset
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


def _linear_job(ctx: RunContext, recipe: ClassificationRecipe) -> JobParts:
    net, cfg, dist = ctx.net, ctx.cfg, ctx.dist
    cache = _feature_cache(ctx, recipe)
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
    optimizer, scheduler = make_optimizer([g for g in groups if g["params"]], cfg, steps)
    wrapped = ddp(module, dist)

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
    return JobParts(prepare=prepare, batches=batches, steps=steps, validate=validate, optimizer=optimizer,
                    scheduler=scheduler, trained=classifier, loss=classification_loss(cfg.label_smoothing),
                    num_threads=1 if small else None)


def _feature_cache(ctx: RunContext, recipe: ClassificationRecipe) -> dict:
    """Features of the training images (clean, then `aug_passes` augmented passes) and of the
    validation images: loaded from `run_dir/features.pt` when a resumed run made them."""
    net, train_samples, val_samples, pp = ctx.net, ctx.train_samples, ctx.val_samples, ctx.pp
    cfg, dist, amp, workers, run_dir, say = ctx.cfg, ctx.dist, ctx.amp, ctx.workers, ctx.run_dir, ctx.say
    path = run_dir / ckpt.FEATURES
    key = {"fingerprint": ctx.fingerprint, "model": cfg.model, "crop": pp.crop, "aug_passes": cfg.aug_passes,
           "augment": [cfg.augment, list(cfg.crop_scale), cfg.hflip], "seed": cfg.seed,
           "precision": "bf16" if amp else "fp32", **recipe.feature_key(ctx)}
    if path.is_file():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
            if cache.get("key") == json.dumps(key):
                say(f"features: reusing {path}")
                return cache
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed
            pass
    augment = recipe.augmentation(ctx)
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
                                      recipe.eval_batch(ctx), dataset=recipe.dataset(ctx, train_samples, aug))
        train_rows.append(rows)
        on_pre_logits &= mode
    val_rows = torch.empty(0)
    if val_samples:
        val_rows, mode = extract_features(net, val_samples, pp, None, None, dist, amp, workers,
                                          recipe.eval_batch(ctx), dataset=recipe.dataset(ctx, val_samples, None))
        on_pre_logits &= mode
    cache = {"key": json.dumps(key), "train": torch.cat(train_rows), "train_labels": labels.repeat(len(passes)),
             "val": val_rows, "val_labels": torch.tensor([y for _, y in val_samples], dtype=torch.long),
             "on_pre_logits": on_pre_logits}
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(cache, tmp)
    return cache
