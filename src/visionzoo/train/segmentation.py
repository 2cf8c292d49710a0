"""Fine-tuning a segmentation model on masks: the segmentation `Recipe`.

Data: a folder with `images/` and `masks/` (see `data/masks.py`), a random `val_fraction` of
the images held out unless a separate validation folder is given. The model: a segmentation
model with new class heads (its published weights, or a bundle), or a classifier of the zoo
with an FCN, DeepLabV3 or LR-ASPP head put on it (`--head`, default LR-ASPP) and its own
pre-trained weights. The strategies are classification's, over the backbone's stages: `linear`
trains the heads alone (the backbone frozen, in eval mode), `partial` also the last
`unfreeze` stages, `full` everything, earlier stages with smaller learning rates; `auto`
chooses from the number of training images.

Training follows torchvision's reference recipe: each image and its mask are rescaled together
by a random factor (`scale_range`) of the base size (`image_size`, the shorter side), flipped
(`hflip`), and cropped to `image_size` x `image_size` (padded with ignored pixels where the
image is smaller); the loss is the pixel-wise cross-entropy with 255 ignored
(`segmentation_loss`; auxiliary head weighted 0.5), optionally class-weighted. Validation
resizes each image to the base size, as `segment` does, and scores the labels at the mask's
own size: mIoU picks the best epoch.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..bundle import is_bundle, read_bundle
from ..data.images import DEFAULT_LIMITS, DecodeLimits, load_image
from ..data.loader import fix_mmap_threshold
from ..data.masks import IGNORE_INDEX, open_mask_folder, read_classes, read_mask
from ..data.preprocess import Preprocess
from ..data.transforms import Interpolation, resized_size, to_normalized_tensor
from ..enums import Task
from ..errors import InputError
from ..factory import create_model
from ..metrics import mean_iou, pixel_accuracy, pixel_confusion
from ..models.base import VisionModel
from ..models.features import FeatureExtractor
from ..models.segmentation import segmentation_loss
from ..ops.labels import resize_argmax
from ..registry import REGISTRY, split_name
from . import distributed as D
from .config import FinetuneConfig, Strategy
from .data import EpochSampler, KeyedSamples, ShardKeys, loader, sample_seed
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
DEFAULT_HEAD = "lraspp"  # the head put on a classifier: light, and precise at stride 8 on any backbone
FEW_IMAGES = 30  # auto: below this many training images only the heads train


class SegmentationRecipe(Recipe):
    task = Task.SEGMENTATION
    metric = "miou"

    def detects(self, data) -> bool:
        from ..data.masks import is_mask_folder

        return data is not None and is_mask_folder(data)

    def data(self, data, train, val, classes, cfg: FinetuneConfig, dist: D.Dist) -> RunData:
        source = one_source(data, train)
        folder = open_mask_folder(source, classes)
        names = folder.classes
        given = None
        if val is not None:
            val_names = read_classes(val, names if classes is not None or not _has_classes_file(val) else None)
            if val_names != names:
                raise InputError(f"{val}: its classes {list(val_names)[:5]} are not the training data's "
                                 f"{list(names)[:5]}; give both the same classes.txt")
            given = open_mask_folder(val, names)
        train_set, val_set, sources = split_data(folder, given, source, val, cfg)
        pixels = train_set.class_pixels
        _check_pixels(pixels, names, source)
        train_samples = [(s.image, s.mask) for s in train_set.samples]
        val_samples = [(s.image, s.mask) for s in val_set.samples]
        if classes is not None:
            sources["classes"] = list(names)
        return RunData(train_samples, val_samples, list(names), sources,
                       fingerprint((train_samples, val_samples), names),
                       {"class_pixels": pixels.tolist(), "pixel_counts": train_set.pixel_counts, "source": source})

    def keep(self, found: RunData, train: list, val: list) -> None:
        kept = set(train)
        rows = [i for i, sample in enumerate(found.train_samples) if sample in kept]
        pixels = found.extra["pixel_counts"][rows].sum(0)
        _check_pixels(pixels, found.classes, found.extra["source"])
        super().keep(found, train, val)
        found.extra.update(class_pixels=pixels.tolist(), pixel_counts=found.extra["pixel_counts"][rows])

    def starting_model(self, cfg: FinetuneConfig, classes: Sequence[str], dist: D.Dist
                       ) -> tuple[VisionModel, dict[str, Any], str | None]:
        torch.manual_seed(sample_seed(cfg.seed, 0))  # the new heads' initial weights come from the seed
        net = _segmentation_model(cfg.model, cfg.head, len(classes))
        weights = starting_point(net, classes)
        return net.to(dist.device), dict(net.require_card().builder_kwargs), weights

    def preprocess(self, net: VisionModel, cfg: FinetuneConfig) -> Preprocess:
        base = net.require_card().preprocess
        size = cfg.image_size or base.resize_size or 520
        return Preprocess(size, None, base.interpolation, base.mean, base.std, kind="SemanticSegmentation")

    def train_size(self, pp: Preprocess) -> int:
        return int(pp.resize_size or 520)

    def choose_strategy(self, ctx: RunContext) -> tuple[Strategy, str]:
        n = len(ctx.train_samples)
        if n < FEW_IMAGES:
            return Strategy.LINEAR, (f"only {n} training images: too few masks to adapt the backbone without "
                                     f"overfitting, so only the heads are trained")
        return Strategy.FULL, (f"{n} training images: every layer is fine-tuned (a dense task needs the backbone's "
                               f"features to adapt, and each mask holds many labelled pixels)")

    def job(self, ctx: RunContext) -> JobParts:
        return _job(ctx)

    def describe(self, metrics: dict[str, Any]) -> str:
        if "val_miou" in metrics:
            return f", val mIoU {metrics['val_miou']:.2%}, pixel acc {metrics['val_pixel_acc']:.2%}"
        return ""


def _has_classes_file(folder) -> bool:
    from pathlib import Path

    from ..data.masks import CLASSES_FILE

    return (Path(folder).expanduser() / CLASSES_FILE).is_file()


def _check_pixels(pixels: np.ndarray, names: Sequence[str], source) -> None:
    """Refuse training masks without a pixel of some class (`pixels`: labelled pixels per class)."""
    missing = [names[int(i)] for i in np.flatnonzero(pixels == 0)]
    if missing:
        raise InputError(f"no training pixels of class{'es' if len(missing) > 1 else ''} {', '.join(missing[:5])} "
                         f"in the masks of {source}; add images showing it or remove it from the classes")


def _segmentation_model(name: str, head: str | None, num_classes: int) -> VisionModel:
    """The model to fine-tune, with `num_classes` outputs: a segmentation bundle or model (its
    weights), or `head` on a classifier (a name with its weights, or a classifier bundle)."""
    if is_bundle(name):
        task = REGISTRY.get_architecture(read_bundle(name).architecture).task
        if task is Task.CLASSIFICATION:
            backbone = create_model(name)
            return _model(create_model(head or DEFAULT_HEAD, backbone=backbone, num_classes=num_classes))
        if head is not None:
            raise InputError(f"--head puts a head on a classifier; {name} is already a {task.value} model")
        return _model(create_model(name))
    arch = REGISTRY.get_architecture(split_name(name)[0])
    if arch.task is Task.CLASSIFICATION:
        return _model(create_model(head or DEFAULT_HEAD, backbone=name, pretrained_backbone=True,
                                   num_classes=num_classes))
    if arch.task is not Task.SEGMENTATION:
        raise InputError(f"{name} is a {arch.task.value} model; masks fine-tune segmentation models or classifiers")
    if arch.composed:
        raise InputError(f"{name} is a head for any classifier: name the classifier with --model and the head "
                         f"with --head {name}")
    if head is not None:
        raise InputError(f"--head puts a head on a classifier; {name} is a segmentation model already")
    tagged = split_name(name)[1] is not None
    return _model(create_model(name, weights=None if tagged else "DEFAULT", num_classes=num_classes))


def _model(net: VisionModel | FeatureExtractor) -> VisionModel:
    if not isinstance(net, VisionModel):  # create_model wraps a model only with features_only
        raise RuntimeError(f"create_model returned a {type(net).__name__}, not a model")
    return net


# -- data ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JointAugment:
    """The same random rescale, flip and crop of an image and its mask, drawn from an explicit generator.

    The image's shorter side is scaled to `base * U(scale)` (bilinear for the image, nearest for the
    mask), flipped half the time with `hflip`, then a random `crop` x `crop` window is cut, the image
    padded with zeros (black) and the mask with 255 (ignored) where it is smaller. Without
    `random`, the scale is 1, nothing is flipped and the window is centred.
    """

    preprocess: Preprocess  # base size (resize_size), interpolation, normalisation
    crop: int
    scale: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    random: bool = True

    def __call__(self, img: Image.Image, mask: Image.Image, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.preprocess
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        factor = self.scale[0] + u[0] * (self.scale[1] - self.scale[0]) if self.random else 1.0
        size = resized_size(img.width, img.height, max(1, round((p.resize_size or self.crop) * factor)))
        img = img.resize(size, Interpolation(p.interpolation).pil)
        mask = mask.resize(size, Image.Resampling.NEAREST)
        if self.random and self.hflip and u[1] < 0.5:
            img, mask = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left, top = self._offset(u[2], size[0]), self._offset(u[3], size[1])
        box = (left, top, left + self.crop, top + self.crop)
        x = to_normalized_tensor(_crop(img, box, 0), p.mean, p.std)
        y = torch.from_numpy(np.asarray(_crop(mask, box, IGNORE_INDEX), dtype=np.int64).copy())
        return x, y

    def _offset(self, u: float, size: int) -> int:
        """Where the window starts along an axis of `size` pixels (negative: it overhangs the image)."""
        if not self.random:
            return (size - self.crop) // 2
        return int(u * (size - self.crop + 1)) if size >= self.crop else -int(u * (self.crop - size + 1))


def _crop(img: Image.Image, box: tuple[int, int, int, int], fill: int) -> Image.Image:
    """`img.crop(box)` with `fill` (not black) where the box reaches beyond the image."""
    left, top, right, bottom = box
    if left >= 0 and top >= 0 and right <= img.width and bottom <= img.height:
        return img.crop(box)
    canvas = Image.new(img.mode, (right - left, bottom - top), fill if img.mode in ("L", "P") else (fill,) * 3)
    canvas.paste(img, (-left, -top))
    return canvas


class KeyedMasks(KeyedSamples):
    """`(index, seed)` -> (image tensor, class-index tensor): the augmented crop for that seed. Images
    are decoded within `limits` (the budget the run's images were checked against)."""

    def __init__(self, samples: Sequence[tuple], augment: JointAugment, num_classes: int,
                 limits: DecodeLimits = DEFAULT_LIMITS):
        super().__init__(samples, limits)
        self.augment = augment
        self.num_classes = num_classes

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        image, mask = self.samples[index]
        labels = Image.fromarray(read_mask(mask, self.num_classes))
        return self.augment(load_image(image, limits=self.limits), labels, torch.Generator().manual_seed(seed or 0))


class EvalMasks(KeyedSamples):
    """`(index, None)` -> (image preprocessed as `segment` does, class indices at the mask's size)."""

    def __init__(self, samples: Sequence[tuple], preprocess: Preprocess, num_classes: int,
                 limits: DecodeLimits = DEFAULT_LIMITS):
        super().__init__(samples, limits)
        self.transform = preprocess.transforms()
        self.num_classes = num_classes

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.samples[key[0]]
        x = self.transform(load_image(image, limits=self.limits))
        return x, torch.from_numpy(read_mask(mask, self.num_classes))


# -- the job -----------------------------------------------------------------------------------

def class_weights(pixels: Sequence[int]) -> torch.Tensor:
    """Median frequency balancing (Eigen & Fergus, 2015): each class's weight is the median of the
    classes' pixel frequencies over its own, so rare classes count more and the median class 1."""
    freq = np.asarray(pixels, dtype=np.float64)
    freq = freq / freq.sum()
    return torch.tensor(np.median(freq) / freq, dtype=torch.float32)


def pixel_hits(outputs: dict[str, torch.Tensor], y: torch.Tensor) -> tuple[float, float]:
    """(labelled pixels predicted right, labelled pixels)."""
    labelled = y != IGNORE_INDEX
    return float(((outputs["out"].argmax(1) == y) & labelled).sum()), float(labelled.sum())


def _job(ctx: RunContext) -> JobParts:
    net, cfg, dist, pp = ctx.net, ctx.cfg, ctx.dist, ctx.pp
    size = int(pp.resize_size or 520)
    stages = map_stages(net, size, net.feature_info)
    n = stages.num_stages
    main = trainable_stages(cfg.strategy, n, cfg.unfreeze)
    groups = param_groups(net, stages, cfg.settled()[1], cfg.lr_decay, cfg.weight_decay, main)
    augment = JointAugment(pp, size, cfg.scale_range, hflip=bool(cfg.hflip), random=cfg.augment)
    train_set = KeyedMasks(ctx.train_samples, augment, len(ctx.classes), ctx.limits)
    sampler = EpochSampler(len(ctx.train_samples), dist, cfg.seed, augment=True)
    per_rank = cfg.batch_size // dist.world
    train_loader = loader(train_set, sampler, per_rank, ctx.workers, dist.device)
    optimizer, scheduler = make_optimizer(groups, cfg, len(train_loader))
    weights = class_weights(ctx.extra["class_pixels"]).to(dist.device) if cfg.class_weights else None
    staged = StagedUnfreeze(net, stages, main, cfg.head_epochs, dist, sampler, train_loader)

    def loss(outputs: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return segmentation_loss({k: v.float() for k, v in outputs.items()}, y, class_weights=weights)

    val_loader = None
    if ctx.val_samples:
        # lists, not stacked batches: the images keep their own sizes
        val_loader = DataLoader(EvalMasks(ctx.val_samples, pp, len(ctx.classes), ctx.limits),
                                sampler=ShardKeys(len(ctx.val_samples), dist, None), batch_size=8,
                                num_workers=ctx.workers, collate_fn=list, persistent_workers=ctx.workers > 0,
                                worker_init_fn=fix_mmap_threshold if ctx.workers else None)

    def validate():
        if val_loader is None:
            return None
        net.eval()
        return evaluate_masks(net, val_loader, len(ctx.classes), dist, ctx.amp, weights)

    return JobParts(prepare=staged.prepare, batches=staged.batches, steps=len(train_loader), validate=validate,
                    optimizer=optimizer, scheduler=scheduler, trained=net, loss=loss, hits=pixel_hits)


def score_masks(net: nn.Module, batches, num_classes: int, device: torch.device, amp,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """(pixel confusion matrix, summed loss, images) of `net` over lists of (image, mask) pairs.

    The labels are scored at the mask's own size (the logits resized there, as `segment` writes
    them); the loss at the model's input size, against the mask resized by nearest neighbour."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, images = 0.0, 0
    with torch.inference_mode(), autocast(device, amp):
        for items in batches:
            for group in same_size(items):
                out = net(torch.stack([x for x, _ in group]).to(device))["out"].float().cpu()
                for logits, (_, mask) in zip(out, group, strict=True):
                    small = F.interpolate(mask[None, None].float(), size=logits.shape[-2:], mode="nearest")[0]
                    loss_sum += float(segmentation_loss({"out": logits[None]}, small.long(), class_weights=weights))
                    images += 1
                    confusion += pixel_confusion(mask, resize_argmax(logits, mask.shape), num_classes)
    return confusion, loss_sum, images


def evaluate_masks(net: nn.Module, batches, num_classes: int, dist: D.Dist, amp,
                   weights: torch.Tensor | None = None) -> dict[str, float]:
    """Validation: `score_masks` summed over all processes, as loss, mIoU and pixel accuracy."""
    confusion, loss_sum, images = score_masks(net, batches, num_classes, dist.device, amp, weights)
    totals = D.all_reduce_sum(dist, [loss_sum, images, *confusion.reshape(-1).tolist()])
    loss_total, count = totals[0], totals[1]
    summed = np.asarray(totals[2:], dtype=np.int64).reshape(num_classes, num_classes)
    return {"loss": loss_total / max(count, 1), "miou": mean_iou(summed), "pixel_acc": pixel_accuracy(summed)}


def same_size(items: Sequence[tuple[torch.Tensor, Any]]) -> list[list[tuple[torch.Tensor, Any]]]:
    """`(image, ...)` items grouped by image size (first appearance order): a batch per size, since
    padding to a common size would change what the heads' global pooling sees."""
    groups: dict[tuple[int, ...], list] = {}
    for item in items:
        groups.setdefault(tuple(item[0].shape), []).append(item)
    return list(groups.values())
