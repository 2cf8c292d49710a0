"""Fine-tuning a detector on boxes (and instance masks): the detection `Recipe`, and COCO mAP scoring.

Data: a COCO instances JSON or a `path,x1,y1,x2,y2,label` CSV (see `data/detection.py`), a
random `val_fraction` of the images held out unless a separate validation set is given. The
model: a detector of the zoo with new class heads (its published weights, or a detection
bundle), or a classifier of the zoo with a RetinaNet, FCOS, SSDlite, Faster R-CNN, Mask R-CNN or
Keypoint R-CNN head put on it (`--head`, default FCOS) and its own pre-trained weights. A model
with a mask head (Mask R-CNN) trains on COCO data with instance masks (`segmentation`), and its
validation also reports mask AP (pycocotools' "segm" scoring of its masks thresholded at 0.5).
A model with a keypoint head (Keypoint R-CNN) trains on COCO data with keypoints, as many as the
data names (a new keypoint predictor where the model's keypoints are not the data's), and its
validation also reports keypoint AP (pycocotools' "keypoints" scoring, OKS with `oks_sigmas`). Labels are
1-based, 0 is the background: a bundle's classes are `("__background__", *names)`, as
torchvision's COCO detectors number theirs. The strategies are classification's, over the
backbone's stages: `linear` trains the heads (and the feature pyramid, or SSDlite's extra
stages) with the whole classifier frozen, `partial` also its last `unfreeze` stages, `full`
everything; `auto` chooses from the number of training images.

Training sees square `image_size` crops: each image rescaled so that its shorter side is
`image_size` times a random factor from `scale_range`, flipped (`hflip`, on by default), and
cropped at random with its boxes (and masks and keypoints, left and right swapped in a flip) moved
along, clipped, and dropped when mostly cut off. The detector resizes its inputs to `image_size`
itself (RetinaNet/FCOS/R-CNN: the shorter side, its `min_size`; SSDlite on a classifier: the
fixed size), so a small `image_size` trains and detects fast. Its own losses train it (focal and
box losses for RetinaNet, FCOS's three, SSD's hard-negative-mined ones, the R-CNNs' proposal,
box, mask and keypoint losses), in float32 on CPUs
(bfloat16 autocast only when asked for with `precision`) and as `precision` says on GPUs.
Validation runs the detector on each held-out image at its own size, as `detect` does, and
scores the boxes with pycocotools' `COCOeval`: AP at IoU 0.5 picks the best epoch.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..bundle import is_bundle, read_bundle
from ..data.detection import BACKGROUND, BoxAugment, flip_permutation, open_box_dataset
from ..data.images import DEFAULT_LIMITS, DecodeLimits, load_image
from ..data.instance_masks import MASK_THRESHOLD, coco_rle, decode_masks, encode_masks
from ..data.loader import fix_mmap_threshold
from ..data.preprocess import Preprocess
from ..enums import Precision, Task
from ..errors import InputError
from ..factory import create_model
from ..models.base import FeatureInfo, VisionModel, ZooModel
from ..models.detection import DetectionModel
from ..models.detection.rcnn import COCO_PERSON_KEYPOINTS, RCNN, Kind, RCNNConfig, layout_kwargs
from ..optional import require
from ..registry import REGISTRY, split_name
from . import distributed as D
from .config import FinetuneConfig, Strategy
from .data import EpochSampler, KeyedSamples, ShardKeys, sample_seed
from .loop import autocast
from .recipe import (
    JobParts,
    Recipe,
    RunContext,
    RunData,
    StagedUnfreeze,
    fingerprint,
    make_optimizer,
    one_source,
    split_data,
    starting_point,
    trainable_stages,
)
from .stages import map_stages, param_groups

log = logging.getLogger("visionzoo")
DEFAULT_HEAD = "fcos"  # the head put on a classifier: anchor-free, the fastest to learn in our measurements
HEADS = ("retinanet", "fcos", "ssdlite", "fasterrcnn", "maskrcnn", "keypointrcnn")
PYRAMID_HEADS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn", "keypointrcnn")  # the heads with a feature pyramid
# pycocotools' OKS sigmas of COCO's 17 person keypoints (its default), and the one used for every keypoint of
# other data: the mean of COCO's (a point off by about 1.2 * 2 * 0.072 = 0.17 of sqrt(area) scores OKS 0.5)
COCO_OKS_SIGMAS = (.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089)
DEFAULT_OKS_SIGMA = 0.072
FEW_IMAGES = 30  # auto: below this many training images only the heads train
MANY_IMAGES = 1000  # auto: from this many, every layer trains
MAX_SIZE_RATIO = 1333 / 800  # RetinaNet/FCOS: the longer side's limit relative to min_size, as torchvision's


class DetectionRecipe(Recipe):
    task = Task.DETECTION
    metric = "ap50"

    def __init__(self) -> None:
        self._size: int | None = None  # the side of the training crops, set with the model's preprocessing
        # the data's keypoint names and skeleton, where it has keypoints
        self._keypoints: tuple[tuple[str, ...], tuple[tuple[int, int], ...]] | None = None

    def detects(self, data) -> bool:
        from ..data.detection import is_box_dataset

        return is_box_dataset(data)

    def data(self, data, train, val, classes, cfg: FinetuneConfig, dist: D.Dist) -> RunData:
        source = one_source(data, train)
        if classes is not None:
            raise InputError("--classes names a segmentation dataset's classes; a detection dataset names its own "
                             "(COCO categories, or the CSV's labels)")
        found = open_box_dataset(source)
        names = list(found.classes)
        given = open_box_dataset(val, names) if val is not None else None
        if given is not None and given.keypoint_names != found.keypoint_names:
            raise InputError(f"{val} has keypoints {_listed(given.keypoint_names)} but {source} has "
                             f"{_listed(found.keypoint_names)}; validate on data with the same keypoints")
        self._keypoints = None if found.keypoint_names is None else (found.keypoint_names, found.skeleton)
        train_set, val_set, sources = split_data(found, given, source, val, cfg)
        train_samples = [s.row() for s in train_set.samples]
        val_samples = [s.row() for s in val_set.samples]
        _check_boxes(train_samples, names, source)
        all_classes = [BACKGROUND, *names]
        return RunData(train_samples, val_samples, all_classes, sources,
                       fingerprint((train_samples, val_samples), all_classes),
                       {"source": source, "category_ids": list(found.category_ids)})

    def keep(self, found: RunData, train: list, val: list) -> None:
        _check_boxes(train, found.classes[1:], found.extra["source"])
        super().keep(found, train, val)

    def starting_model(self, cfg: FinetuneConfig, classes: Sequence[str], dist: D.Dist
                       ) -> tuple[VisionModel, dict[str, Any], str | None]:
        torch.manual_seed(sample_seed(cfg.seed, 0))  # the new heads' initial weights come from the seed
        net, sizes = _detection_model(cfg.model, cfg.head, len(classes), cfg.image_size, cfg.fpn_channels,
                                      self._keypoints)
        weights = starting_point(net, classes)
        return net.to(dist.device), {**net.require_card().builder_kwargs, **sizes}, weights

    def preprocess(self, net: VisionModel, cfg: FinetuneConfig) -> Preprocess:
        transform = _detector(net).transform
        fixed = transform.fixed_size
        self._size = int(fixed[0]) if fixed is not None else int(transform.min_size[-1])
        return net.require_card().preprocess  # (images in [0, 1]: the detector normalises and resizes them)

    def train_size(self, pp: Preprocess) -> int:
        if self._size is None:
            raise RuntimeError("DetectionRecipe.train_size before preprocess")
        return self._size

    def choose_strategy(self, ctx: RunContext) -> tuple[Strategy, str]:
        n = len(ctx.train_samples)
        if n < FEW_IMAGES:
            return Strategy.LINEAR, (f"only {n} training images: too few to adapt the backbone without "
                                     f"overfitting, so only the detection heads are trained")
        if n < MANY_IMAGES:
            return Strategy.PARTIAL, (f"{n} training images: the heads and the backbone's last {ctx.cfg.unfreeze} "
                                      f"stages are fine-tuned, the earlier stages keep their pre-trained features")
        return Strategy.FULL, f"{n} training images: every layer is fine-tuned"

    def job(self, ctx: RunContext) -> JobParts:
        return _job(ctx, self.train_size(ctx.pp))

    def describe(self, metrics: dict[str, Any]) -> str:
        if "val_ap50" in metrics:
            masks = f", mask AP50 {metrics['val_mask_ap50']:.3f}" if "val_mask_ap50" in metrics else ""
            if "val_keypoint_ap50" in metrics:
                masks += f", keypoint AP50 {metrics['val_keypoint_ap50']:.3f}"
            return f", val AP {metrics['val_ap']:.3f}, AP50 {metrics['val_ap50']:.3f}{masks}"
        return ""


def _listed(names: Sequence[str] | None) -> str:
    return "none" if names is None else f"{len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def _check_boxes(samples: Sequence[tuple], names: Sequence[str], source) -> None:
    """Refuse training data without a box of some class."""
    counts = np.zeros(len(names), dtype=np.int64)
    for _, _, labels, *_ in samples:
        for label in labels:
            counts[label - 1] += 1
    missing = [names[int(i)] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise InputError(f"no training boxes of class{'es' if len(missing) > 1 else ''} {', '.join(missing[:5])} "
                         f"in {source}; add images showing it or remove it from the categories")


def _detector(net: nn.Module) -> DetectionModel:
    if not isinstance(net, DetectionModel):
        raise RuntimeError(f"expected a detector, got {type(net).__name__}")
    return net


def predicts_masks(net: nn.Module) -> bool:
    """Whether `net` has an instance mask head (Mask R-CNN)."""
    heads = getattr(net, "roi_heads", None)
    return bool(getattr(heads, "has_mask", False))


def keypoint_detector(net: nn.Module) -> RCNN | None:
    """`net` if it has a keypoint head (a Keypoint R-CNN, which names its keypoints), else None."""
    return net if isinstance(net, RCNN) and net.roi_heads.has_keypoint else None


def oks_sigmas(names: Sequence[str]) -> tuple[float, ...]:
    """The OKS sigma of each keypoint: COCO's for its 17 person keypoints, else `DEFAULT_OKS_SIGMA` for each."""
    if tuple(names) == COCO_PERSON_KEYPOINTS:
        return COCO_OKS_SIGMAS
    return (DEFAULT_OKS_SIGMA,) * len(names)


def _detection_model(name: str, head: str | None, num_classes: int, image_size: int | None,
                     fpn_channels: int | None = None,
                     keypoints: tuple[Sequence[str], Sequence[tuple[int, int]]] | None = None
                     ) -> tuple[VisionModel, dict[str, Any]]:
    """The model to fine-tune with `num_classes` outputs (background included), and the size arguments
    that rebuild it: a detection bundle or model (its weights), or `head` on a classifier (a name with
    its weights, or a classifier bundle). `image_size` sets the size the detector resizes images to;
    `fpn_channels` the pyramid's width of a head put on a classifier; `keypoints` the data's keypoint
    names and skeleton (a keypoint head gets a new predictor when its keypoints differ, and they are
    recorded in the builder arguments)."""
    def no_keypoints() -> InputError:
        return InputError(f"{name}{f' --head {head}' if head else ''} predicts keypoints but the data has none "
                          f"(COCO categories naming \"keypoints\", annotations with \"keypoints\"); add them, or "
                          f"train boxes only (--head fasterrcnn)")

    if keypoints is None and _keypoint_architecture(name, head):  # (before any weights are loaded)
        raise no_keypoints()
    net, sizes = _detection_net(name, head, num_classes, image_size, fpn_channels, keypoints)
    detector = keypoint_detector(net)
    if detector is not None:
        if keypoints is None:
            raise no_keypoints()
        names, skeleton = tuple(keypoints[0]), tuple(keypoints[1])
        if detector.keypoint_names != names:
            detector.reset_keypoints(names, skeleton)
        else:
            detector.set_keypoint_layout(names, skeleton)
        sizes.update(layout_kwargs(names, skeleton))
    return net, sizes


def _keypoint_architecture(name: str, head: str | None) -> bool:
    """Whether `name` (with `head`) names a keypoint detector: the head, or a published Keypoint R-CNN."""
    if head == "keypointrcnn":
        return True
    if head is not None or is_bundle(name):
        return False
    try:
        config = REGISTRY.get_architecture(split_name(name)[0]).config
    except LookupError:
        return False
    return isinstance(config, RCNNConfig) and config.kind is Kind.KEYPOINT


def _detection_net(name: str, head: str | None, num_classes: int, image_size: int | None,
                   fpn_channels: int | None, keypoints: tuple[Sequence[str], Sequence[tuple[int, int]]] | None
                   ) -> tuple[VisionModel, dict[str, Any]]:
    if head is not None and head not in HEADS:
        raise InputError(f"--head {head} is not a detection head; use one of {', '.join(HEADS)}")
    if fpn_channels is not None and not (head in (None, *PYRAMID_HEADS) and _is_classifier(name)):
        raise InputError("--fpn-channels sizes a RetinaNet, FCOS or R-CNN head put on a classifier; drop it for "
                         f"{head or name}")
    if is_bundle(name):
        task = REGISTRY.get_architecture(read_bundle(name).architecture).task
        if task is Task.CLASSIFICATION:
            classifier = create_model(name)
            if not isinstance(classifier, ZooModel):
                raise InputError(f"{name} is not a classifier bundle")
            return _on_classifier(head, classifier, num_classes, image_size, fpn_channels, keypoints)
        if task is not Task.DETECTION:
            raise InputError(f"{name} is a {task.value} bundle; boxes fine-tune detectors or classifiers")
        if head is not None:
            raise InputError(f"--head puts a head on a classifier; {name} is a detection bundle already")
        return _sized(_model(create_model(name)), image_size)
    arch = REGISTRY.get_architecture(split_name(name)[0])
    if arch.task is Task.CLASSIFICATION:
        return _on_classifier(head, name, num_classes, image_size, fpn_channels, keypoints)
    if arch.task is not Task.DETECTION:
        raise InputError(f"{name} is a {arch.task.value} model; boxes fine-tune detectors or classifiers")
    if arch.composed:
        raise InputError(f"{name} is a head for any classifier: name the classifier with --model and the head "
                         f"with --head {name}")
    if head is not None:
        raise InputError(f"--head puts a head on a classifier; {name} is a detector already")
    tagged = split_name(name)[1] is not None
    net = _model(create_model(name, weights=None if tagged else "DEFAULT", num_classes=num_classes))
    return _sized(net, image_size)


def _is_classifier(name: str) -> bool:
    arch = read_bundle(name).architecture if is_bundle(name) else split_name(name)[0]
    return REGISTRY.get_architecture(arch).task is Task.CLASSIFICATION


def _on_classifier(head: str | None, backbone: str | ZooModel, num_classes: int, image_size: int | None,
                   fpn_channels: int | None, keypoints: tuple[Sequence[str], Sequence[tuple[int, int]]] | None
                   ) -> tuple[VisionModel, dict[str, Any]]:
    kind = head or DEFAULT_HEAD
    sizes: dict[str, Any] = {}
    if image_size is not None:
        sizes = {"size": image_size} if kind == "ssdlite" else {"min_size": image_size,
                                                                "max_size": round(image_size * MAX_SIZE_RATIO)}
    if kind == "keypointrcnn" and keypoints is not None:  # (built with the data's keypoints)
        sizes.update(layout_kwargs(*keypoints))
    if fpn_channels is not None:
        sizes["fpn_channels"] = fpn_channels
    net = _model(create_model(kind, backbone=backbone, num_classes=num_classes,
                              **{"pretrained_backbone": isinstance(backbone, str), **sizes}))
    return net, sizes


def _sized(net: VisionModel, image_size: int | None) -> tuple[VisionModel, dict[str, Any]]:
    """A built detector resized to `image_size` (RetinaNet/FCOS: its `min_size`); a fixed-size one (SSD)
    only accepts its own size."""
    transform = _detector(net).transform
    if image_size is None:
        return net, {}
    if transform.fixed_size is not None:
        if tuple(transform.fixed_size) != (image_size, image_size):
            raise InputError(f"{net.arch} takes fixed {transform.fixed_size[0]}x{transform.fixed_size[1]} inputs; "
                             f"drop --image-size, or put an SSDlite head on a classifier (--head ssdlite) to choose")
        return net, {}
    max_size = round(image_size * MAX_SIZE_RATIO)
    transform.min_size, transform.max_size = (image_size,), max_size
    return net, {"min_size": image_size, "max_size": max_size}


def _model(net: Any) -> VisionModel:
    if not isinstance(net, DetectionModel):  # (create_model wraps a model only with features_only)
        raise RuntimeError(f"create_model returned a {type(net).__name__}, not a detector")
    return net


def backbone_stages(net: DetectionModel) -> list[FeatureInfo]:
    """The stages of the classifier under `net`'s heads, named within `net` (none where the backbone
    is not a zoo classifier's stages)."""
    body = getattr(net.backbone, "body", None)
    if not isinstance(body, ZooModel):
        return []
    prefix = "backbone.body."
    used = getattr(net.backbone, "out_indices", None)
    infos = list(body.feature_info)
    if used:  # stages after the last one the heads read never run
        infos = infos[:max(used) + 1]
    return [FeatureInfo(prefix + info.module, info.num_chs, info.reduction) for info in infos]


# -- data ------------------------------------------------------------------------------------

def check_masks(net: nn.Module, samples: Sequence[tuple], source: Any) -> None:
    """Refuse to train a mask head on data without instance masks."""
    if predicts_masks(net) and any(s[4] is None for s in samples):
        raise InputError(f"{source} has no instance masks (COCO annotations with a segmentation) for the mask head "
                         f"of {getattr(net, 'arch', None) or type(net).__name__}; add them, or train boxes only "
                         f"(--head fasterrcnn)")


def _keypoint_tensor(points: Sequence[tuple[float, ...]] | None, count: int, device: torch.device | None = None
                     ) -> torch.Tensor:
    """A sample's keypoints as an (N, K, 3) float tensor."""
    return torch.tensor(points or (), dtype=torch.float32, device=device).reshape(-1, count, 3)


class BoxBatch:
    """A training batch: the images and their targets. The loop moves it with `.to` and counts it with `len`."""

    def __init__(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device, non_blocking: bool = False) -> BoxBatch:
        return BoxBatch([x.to(device, non_blocking=non_blocking) for x in self.images],
                        [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets])


def collate_boxes(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                         torch.Tensor | None]]) -> tuple[BoxBatch, BoxBatch]:
    targets = [{"boxes": b, "labels": lab, **({} if m is None else {"masks": m}),
                **({} if k is None else {"keypoints": k})} for _, b, lab, m, k in items]
    batch = BoxBatch([x for x, *_ in items], targets)
    return batch, batch  # (the loop's (inputs, targets): the detector needs both at once)


class KeyedBoxes(KeyedSamples):
    """`(index, seed)` -> (image tensor in [0, 1], boxes, labels, masks or None, keypoints or None): the
    augmented crop for that seed; with `masks`, the instance masks ((N, crop, crop) uint8) cropped with it;
    with `keypoints` (their number), the keypoints ((N, K, 3)) moved with it."""

    def __init__(self, samples: Sequence[tuple], augment: BoxAugment, limits: DecodeLimits = DEFAULT_LIMITS,
                 masks: bool = False, keypoints: int | None = None):
        super().__init__(samples, limits)
        self.augment = augment
        self.masks = masks
        self.keypoints = keypoints

    def __getitem__(self, key: tuple[int, int | None]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        index, seed = key
        image, boxes, labels, _, rles, points = self.samples[index]
        img = load_image(image, limits=self.limits)
        masks = None
        if self.masks:
            masks = decode_masks(rles, image, self.limits) if rles else torch.zeros((0, img.height, img.width),
                                                                                    dtype=torch.uint8)
        keypoints = None if self.keypoints is None else _keypoint_tensor(points, self.keypoints)
        return self.augment.apply_all(img, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                      torch.tensor(labels, dtype=torch.int64), masks, keypoints,
                                      torch.Generator().manual_seed(seed or 0))


class EvalBoxes(KeyedSamples):
    """`(index, None)` -> (image in [0, 1] at its own size, the sample): what `detect` feeds the model."""

    def __init__(self, samples: Sequence[tuple], preprocess: Preprocess, limits: DecodeLimits = DEFAULT_LIMITS):
        super().__init__(samples, limits)
        self.transform = preprocess.transforms()

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, tuple]:
        sample = self.samples[key[0]]
        return self.transform(load_image(sample[0], limits=self.limits)), sample


class _TrainingForward(nn.Module):
    """The detector in training: a batch in, its losses out."""

    def __init__(self, net: DetectionModel):
        super().__init__()
        self.net = net

    def forward(self, batch: BoxBatch) -> dict[str, torch.Tensor]:
        return self.net(batch.images, batch.targets)


def detection_loss(losses: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    """The detector's losses summed (classification, box regression, centre-ness), in float32."""
    return sum((v.float() for v in losses.values()), torch.zeros(()))


def no_hits(outputs: Any, batch: Any) -> tuple[float, float]:
    return 0.0, 0.0  # (no running accuracy for boxes: validation's AP says how training goes)


# -- the job -----------------------------------------------------------------------------------

def _job(ctx: RunContext, size: int) -> JobParts:
    net, cfg, dist = _detector(ctx.net), ctx.cfg, ctx.dist
    if dist.device.type == "cpu" and cfg.precision is Precision.AUTO:
        # fp32 on CPUs: the matching and the box losses compare and subtract box coordinates, which bfloat16's
        # 8 bits of mantissa blur at a few hundred pixels (`--precision bf16` still asks for it)
        ctx.amp = None
    stages = map_stages(net, size, backbone_stages(net))
    n = stages.num_stages
    main = trainable_stages(cfg.strategy, n, cfg.unfreeze)
    groups = param_groups(net, stages, cfg.settled()[1], cfg.lr_decay, cfg.weight_decay, main)
    points = keypoint_detector(net)
    count = points.num_keypoints if points is not None else None
    flip = flip_permutation(points.keypoint_names) if points is not None else None
    augment = BoxAugment(size, size, cfg.scale_range, hflip=bool(cfg.hflip), random=cfg.augment, flip_keypoints=flip)
    with_masks = predicts_masks(net)
    check_masks(net, ctx.train_samples, ctx.extra.get("source", "the data"))
    train_set = KeyedBoxes(ctx.train_samples, augment, ctx.limits, masks=with_masks, keypoints=count)
    sampler = EpochSampler(len(ctx.train_samples), dist, cfg.seed, augment=True)
    per_rank = cfg.batch_size // dist.world
    train_loader = DataLoader(train_set, sampler=sampler, batch_size=per_rank, num_workers=ctx.workers,
                              collate_fn=collate_boxes, persistent_workers=ctx.workers > 0,
                              generator=torch.Generator(), worker_init_fn=fix_mmap_threshold if ctx.workers else None)
    optimizer, scheduler = make_optimizer(groups, cfg, len(train_loader))
    staged = StagedUnfreeze(net, stages, main, cfg.head_epochs, dist, sampler, train_loader,
                            forward=_TrainingForward(net))

    val_loader = None
    if ctx.val_samples:
        val_loader = DataLoader(EvalBoxes(ctx.val_samples, ctx.pp, ctx.limits),
                                sampler=ShardKeys(len(ctx.val_samples), dist, None), batch_size=8,
                                num_workers=ctx.workers, collate_fn=list, persistent_workers=ctx.workers > 0,
                                worker_init_fn=fix_mmap_threshold if ctx.workers else None)
    num_classes = len(ctx.classes) - 1

    def validate():
        if val_loader is None:
            return None
        net.eval()
        return evaluate_boxes(net, val_loader, num_classes, dist, ctx.amp, ctx.limits)

    return JobParts(prepare=staged.prepare, batches=staged.batches, steps=len(train_loader), validate=validate,
                    optimizer=optimizer, scheduler=scheduler, trained=net, loss=detection_loss, hits=no_hits)


def score_boxes(net: DetectionModel, batches: Iterable[list[tuple[torch.Tensor, tuple]]], device: torch.device,
                amp, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[list[dict[str, Any]], float, int]:
    """(detections, summed loss, images) of `net` (in eval mode) over lists of (image, sample) pairs:
    per image `image_id`, `width`, `height`, the ground truth (`gt_boxes`, `gt_labels`) and the
    detections (`boxes` x1 y1 x2 y2, `scores`, `labels`) as numpy arrays; with instance masks, the
    data's (`gt_masks`) and the model's (`masks`, thresholded at `MASK_THRESHOLD`) as COCO RLE dicts;
    with keypoints, the data's (`gt_keypoints`, (N, K, 3)) and the model's (`keypoints`, (D, K, 3)).
    A mask or keypoint head on data without them detects without losses (the loss is then 0)."""
    results: list[dict[str, Any]] = []
    loss_sum, images = 0.0, 0
    wants_masks = predicts_masks(net)
    points = keypoint_detector(net)
    count = points.num_keypoints if points is not None else None
    with torch.inference_mode(), autocast(device, amp):
        for items in batches:
            if not items:
                continue
            xs = [x.to(device) for x, _ in items]
            with_masks = all(s[4] is not None for _, s in items)
            with_keypoints = all(s[5] is not None and len(s[5]) == len(s[1]) and
                                 all(len(k) == 3 * (count or 0) for k in s[5]) for _, s in items)
            losses: dict[str, torch.Tensor] = {}
            if (wants_masks and not with_masks) or (count is not None and not with_keypoints):
                detections = net(xs)
            else:
                targets = [_target(x, s, wants_masks, count, device, limits) for x, s in items]
                detections, losses = net.detect_with_losses(xs, targets)
            loss_sum += float(detection_loss(losses, None).cpu()) * len(items)
            images += len(items)
            for x, (_, sample), det in zip(xs, items, detections, strict=True):
                result = {"image_id": sample[3], "width": int(x.shape[-1]), "height": int(x.shape[-2]),
                          "gt_boxes": np.asarray(sample[1], dtype=np.float64).reshape(-1, 4),
                          "gt_labels": np.asarray(sample[2], dtype=np.int64),
                          "boxes": det["boxes"].float().cpu().numpy().astype(np.float64),
                          "scores": det["scores"].float().cpu().numpy().astype(np.float64),
                          "labels": det["labels"].cpu().numpy().astype(np.int64)}
                if sample[4] is not None:
                    result["gt_masks"] = [coco_rle(m) for m in sample[4]]
                if "masks" in det:
                    result["masks"] = encode_masks(det["masks"][:, 0] >= MASK_THRESHOLD) if len(det["masks"]) else []
                if sample[5] is not None:
                    k = len(sample[5][0]) // 3 if sample[5] else (count or 0)
                    result["gt_keypoints"] = np.asarray(sample[5], dtype=np.float64).reshape(len(sample[1]), k, 3)
                if "keypoints" in det:
                    result["keypoints"] = det["keypoints"].float().cpu().numpy().astype(np.float64)
                results.append(result)
    return results, loss_sum, images


def _target(x: torch.Tensor, sample: tuple, masks: bool, keypoints: int | None, device: torch.device,
            limits: DecodeLimits) -> dict[str, torch.Tensor]:
    target = {"boxes": torch.tensor(sample[1], dtype=torch.float32, device=device).reshape(-1, 4),
              "labels": torch.tensor(sample[2], dtype=torch.int64, device=device)}
    if masks:
        dense = decode_masks(sample[4], sample[0], limits) if sample[4] else \
            torch.zeros((0, *x.shape[-2:]), dtype=torch.uint8)
        target["masks"] = dense.to(device)
    if keypoints is not None:
        target["keypoints"] = _keypoint_tensor(sample[5], keypoints, device)
    return target


def evaluate_boxes(net: DetectionModel, batches, num_classes: int, dist: D.Dist, amp,
                   limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, float]:
    """Validation: `score_boxes` gathered from all processes, scored with COCO mAP (boxes, and masks
    where both the model and the data have them)."""
    results, loss_sum, count = score_boxes(net, batches, dist.device, amp, limits)
    images = float(count)
    if dist.enabled:
        gathered: list[Any] = [None] * dist.world
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in (part or [])]
        loss_sum, images = D.all_reduce_sum(dist, [loss_sum, images])
    scores = coco_map(results, num_classes)
    metrics = {"loss": loss_sum / max(images, 1), "ap": scores.ap, "ap50": scores.ap50, "ap75": scores.ap75}
    if has_mask_results(results):
        masks = coco_map(results, num_classes, "segm")
        metrics.update(mask_ap=masks.ap, mask_ap50=masks.ap50, mask_ap75=masks.ap75)
    points = keypoint_detector(net)
    if points is not None and has_keypoint_results(results, points.num_keypoints):
        scores = coco_map(results, num_classes, "keypoints", oks_sigmas(points.keypoint_names))
        metrics.update(keypoint_ap=scores.ap, keypoint_ap50=scores.ap50, keypoint_ap75=scores.ap75)
    return metrics


def has_mask_results(results: Sequence[dict[str, Any]]) -> bool:
    """Whether `score_boxes` results can be scored by mask: the model predicted masks and the data has them."""
    return bool(results) and all("masks" in r and "gt_masks" in r for r in results)


def has_keypoint_results(results: Sequence[dict[str, Any]], count: int) -> bool:
    """Whether `score_boxes` results can be scored by keypoints: the model predicted `count` keypoints per
    detection and the data has that many per box."""
    return bool(results) and all("keypoints" in r and "gt_keypoints" in r and r["keypoints"].shape[1:] == (count, 3)
                                 and r["gt_keypoints"].shape[1:] == (count, 3) for r in results)


# -- COCO mAP ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CocoScores:
    """COCO box, mask or keypoint AP (pycocotools' COCOeval, 100 detections per image; 20 for keypoints,
    as pycocotools scores them). None where nothing can be scored (no ground truth of that size or class;
    keypoints have no small objects)."""

    ap: float  # mean over IoU 0.50:0.95
    ap50: float
    ap75: float
    ap_small: float | None
    ap_medium: float | None
    ap_large: float | None
    ar100: float  # recall, 100 detections per image
    class_ap: tuple[float | None, ...]  # per class (1..K), IoU 0.50:0.95
    class_ap50: tuple[float | None, ...]
    recall: tuple[float, ...]  # the 101 recall points of the precision-recall curves
    precision50: tuple[tuple[float | None, ...], ...]  # per class: precision at IoU 0.5 over `recall`


def coco_map(results: Sequence[dict[str, Any]], num_classes: int, iou_type: str = "bbox",
             sigmas: Sequence[float] | None = None) -> CocoScores:
    """Score `score_boxes` results (labels 1..num_classes) with pycocotools' `COCOeval`: their boxes
    (`iou_type` "bbox"), their masks ("segm": `gt_masks` and `masks`, COCO RLE dicts, one per box) or
    their keypoints ("keypoints": `gt_keypoints` (N, K, 3) and `keypoints` (D, K, 3), scored by object
    keypoint similarity with the K `sigmas`, by default `oks_sigmas` of COCO's names for 17 keypoints
    and `DEFAULT_OKS_SIGMA` otherwise; a ground-truth box without a labelled keypoint is not scored)."""
    if iou_type not in ("bbox", "segm", "keypoints"):
        raise InputError(f"iou_type must be 'bbox', 'segm' or 'keypoints', got {iou_type!r}")
    segm = iou_type == "segm"
    kps = iou_type == "keypoints"
    mask_api = require("pycocotools.mask") if segm else None
    coco_mod = require("pycocotools.coco")
    eval_mod = require("pycocotools.cocoeval")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    for r in results:
        images.append({"id": r["image_id"], "width": r["width"], "height": r["height"]})
        gt_masks = r["gt_masks"] if segm else [None] * len(r["gt_labels"])
        gt_points = r["gt_keypoints"] if kps else [None] * len(r["gt_labels"])
        for box, label, gt_mask, gt_kps in zip(r["gt_boxes"], r["gt_labels"], gt_masks, gt_points, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotation = {"id": len(annotations) + 1, "image_id": r["image_id"], "category_id": int(label),
                          "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0}
            if gt_mask is not None and mask_api is not None:
                annotation.update(segmentation=gt_mask, area=float(mask_api.area(_rle_bytes(gt_mask))))
            if gt_kps is not None:
                annotation.update(keypoints=[float(v) for v in np.asarray(gt_kps).reshape(-1)],
                                  num_keypoints=int((np.asarray(gt_kps)[:, 2] > 0).sum()))
            annotations.append(annotation)
        masks = r["masks"] if segm else [None] * len(r["labels"])
        points = r["keypoints"] if kps else [None] * len(r["labels"])
        for box, score, label, mask, kp in zip(r["boxes"], r["scores"], r["labels"], masks, points, strict=True):
            if 1 <= label <= num_classes:
                detection: dict[str, Any] = {"image_id": r["image_id"], "category_id": int(label),
                                             "score": float(score)}
                if mask is not None:  # (pycocotools takes the area and box from the mask)
                    detection["segmentation"] = mask
                elif kp is not None:  # (and the keypoints' extent as their box)
                    detection["keypoints"] = [float(v) for v in np.asarray(kp).reshape(-1)]
                else:
                    detection["bbox"] = [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
                detections.append(detection)
    categories = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt = coco_mod.COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        gt.createIndex()
        dt = gt.loadRes(detections) if detections else coco_mod.COCO()
        if not detections:
            dt.dataset = {"images": images, "annotations": [], "categories": categories}
            dt.createIndex()
        ev = eval_mod.COCOeval(gt, dt, iou_type)
        if kps:
            count = next((len(a["keypoints"]) // 3 for a in annotations), None)
            count = count if count is not None else next((len(d["keypoints"]) // 3 for d in detections), 17)
            chosen = list(sigmas) if sigmas is not None else list(
                COCO_OKS_SIGMAS if count == len(COCO_OKS_SIGMAS) else (DEFAULT_OKS_SIGMA,) * count)
            if len(chosen) != count:
                raise InputError(f"{len(chosen)} OKS sigmas given for {count} keypoints")
            ev.params.kpt_oks_sigmas = np.asarray(chosen, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(v) for v in ev.stats]
    precision = ev.eval["precision"]  # (IoU thresholds, recall points, classes, areas, max detections)
    present = {int(a["category_id"]) for a in annotations}

    def per_class(p: np.ndarray, k: int) -> float | None:
        if k + 1 not in present:
            return None
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else 0.0

    def at(v: float) -> float | None:
        return None if v < 0 else v

    class_ap = tuple(per_class(precision[:, :, k, 0, -1], k) for k in range(num_classes))
    class_ap50 = tuple(per_class(precision[0, :, k, 0, -1], k) for k in range(num_classes))
    curves = tuple(tuple(None if v < 0 else float(v) for v in precision[0, :, k, 0, -1]) for k in range(num_classes))
    if kps:  # (AP, AP50, AP75, AP medium, AP large, AR, ...: no small objects)
        stats = stats[:3] + [-1.0] + stats[3:5] + [0.0, 0.0] + stats[5:6]
    return CocoScores(ap=max(stats[0], 0.0), ap50=max(stats[1], 0.0), ap75=max(stats[2], 0.0), ap_small=at(stats[3]),
                      ap_medium=at(stats[4]), ap_large=at(stats[5]), ar100=max(stats[8], 0.0), class_ap=class_ap,
                      class_ap50=class_ap50, recall=tuple(float(v) for v in ev.params.recThrs), precision50=curves)


def _rle_bytes(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
