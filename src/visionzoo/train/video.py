"""Fine-tuning video classifiers: a folder of class sub-folders of video files, clips as samples.

`VideoRecipe` is the classification recipe (`classification.py`: the strategies, the jobs, the
feature cache) with what video changes: the samples (`video_samples`, each file's header read
first: a file that is not a readable video is left out and listed), the recipe clips are
evaluated with (the weights' scaled to `image_size`, `clip_len` frames), the training dataset
(`KeyedClips`: one clip per video and step) and its augmentation (`ClipAugment`: a random clip
position in time, one random resized crop for all its frames, flips only with `--hflip`: a
mirrored clip reverses left-right motion), and `auto`'s choice.

Augmentation draws everything from the key's seed, as the image pipeline does, so a resumed run
sees the same clips. The evaluation view of a video is its middle clip, centre-cropped: what
`predict --clips 1` computes.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.images import DEFAULT_LIMITS, DecodeLimits
from ..data.inputs import Failure
from ..data.preprocess import Preprocess
from ..data.video import VIDEO_EXTENSIONS, ClipSampling, ClipTransform, VideoReader
from ..enums import Task
from ..errors import InputError, VideoError
from ..models.base import ZooModel
from . import distributed as D
from .classification import ClassificationRecipe
from .config import FinetuneConfig, Strategy
from .data import KeyedSamples, check_classes, stratified_split
from .recipe import RunContext, RunData, fingerprint
from .stages import StageMap, map_stages

# `auto` for video: no feature probe (it would decode every clip twice); the images' thresholds on
# the number of clips per class decide
FEW_PER_CLASS, MANY_PER_CLASS = 15, 500


def video_class_folders(root: str | os.PathLike) -> dict[str, list[Path]] | None:
    """{class: video files} of a folder laid out as `root/<class>/**/<video>`, or None when `root` is
    not such a folder (no class sub-folder holds a video)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        found[sub.name] = files
    return found if any(found.values()) else None


def is_video_dataset(data: str | os.PathLike | None) -> bool:
    return data is not None and video_class_folders(data) is not None


def video_samples(data, train, val, cfg: FinetuneConfig) -> tuple[list, list, list[str], dict[str, str | None]]:
    """(train samples, val samples, class names, sources) of video class folders: (path, label) pairs."""
    if data is None and train is None:
        raise InputError("no training data: give a folder of class sub-folders of videos as DATA, or --train")
    if data is not None and train is not None:
        raise InputError("give the data either as DATA or as --train (with an optional --val), not both")
    source = data if data is not None else train
    sources: dict[str, str | None]
    found = video_class_folders(source)
    if found is None:
        raise InputError(f"{source}: no class sub-folder holds a video file ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    classes = sorted(found)
    samples = [(path, k) for k, name in enumerate(classes) for path in found[name]]
    if val is not None:
        val_found = video_class_folders(val) or {}
        unknown = sorted(set(val_found) - set(classes))
        if unknown:
            raise InputError(f"{val}: classes {', '.join(unknown[:5])} are not in the training data")
        val_samples = [(path, classes.index(name)) for name in sorted(val_found) for path in val_found[name]]
        train_samples, sources = samples, {"train": str(source), "val": str(val)}
    elif cfg.val_fraction > 0:
        tr, va = stratified_split([y for _, y in samples], cfg.val_fraction, cfg.seed)
        train_samples, val_samples = [samples[i] for i in tr], [samples[i] for i in va]
        sources = {"train": str(source), "val": f"{cfg.val_fraction:g} of train, stratified, seed {cfg.seed}"}
    else:
        train_samples, val_samples, sources = samples, [], {"train": str(source), "val": None}
    check_classes([y for _, y in train_samples], len(classes), classes)
    return train_samples, val_samples, classes, sources


def labelled_videos(data: str | os.PathLike, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """(paths, class indices) of a folder of class sub-folders of videos, for a model knowing `classes`."""
    found = video_class_folders(data)
    if found is None:
        raise InputError(f"{data}: no class sub-folder holds a video file ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    unknown = sorted(name for name, files in found.items() if files and name not in classes)
    if unknown:
        raise InputError(f"{data}: classes {', '.join(unknown[:5])} are not the model's ({', '.join(classes[:5])}, "
                         f"...); rename the folders or evaluate another model")
    pairs = [(path, list(classes).index(name)) for name in sorted(found) for path in found[name]]
    return [p for p, _ in pairs], [y for _, y in pairs]


def video_training_preprocess(base: Preprocess, cfg: FinetuneConfig) -> Preprocess:
    """The weights' video recipe at the run's crop size (`image_size`, same resize/crop ratio) and clip
    length (`clip_len`): what the bundle records and its clips are evaluated with."""
    if base.clip_len is None:
        raise InputError(f"the {base.kind} preprocessing has no clip length; fine-tune a video model here")
    p = base
    if cfg.image_size is not None and cfg.image_size != base.crop:
        ratio = cfg.image_size / base.crop
        if base.resize_hw is not None:
            hw = (max(cfg.image_size, round(base.resize_hw[0] * ratio)), max(cfg.image_size,
                                                                              round(base.resize_hw[1] * ratio)))
            p = dataclasses.replace(p, resize_hw=hw, crop_size=cfg.image_size)
        else:
            p = dataclasses.replace(p, resize_size=round((base.resize_size or base.crop) * ratio),
                                    crop_size=cfg.image_size)
    if cfg.clip_len is not None:
        p = dataclasses.replace(p, clip_len=cfg.clip_len)
    return p


@dataclass(frozen=True)
class ClipAugment:
    """A training clip drawn from a generator: a random position in time, one random resized crop (and
    optional horizontal flip) shared by all its frames."""

    preprocess: Preprocess
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False

    def frames(self, num_frames: int, fps: float, g: torch.Generator) -> list[int]:
        sampling = ClipSampling.of(self.preprocess)
        step = sampling.step(fps)
        free = max(num_frames - sampling.span(fps), 0)
        start = int(torch.randint(free + 1, (), generator=g))
        return [min(start + math.floor(k * step), num_frames - 1) for k in range(sampling.clip_len)]

    def box(self, width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height) of the random resized crop, in source pixels."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= width and 0 < ch <= height:
                v = torch.rand(2, generator=g, dtype=torch.float64).tolist()
                return int(v[0] * (width - cw)), int(v[1] * (height - ch)), cw, ch
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side

    def __call__(self, rgb_frames: Sequence[np.ndarray], g: torch.Generator) -> torch.Tensor:
        p = self.preprocess
        height, width = rgb_frames[0].shape[:2]
        left, top, cw, ch = self.box(width, height, g)
        flip = self.hflip and torch.rand((), generator=g).item() < 0.5
        clip = torch.stack([torch.from_numpy(np.ascontiguousarray(f[top:top + ch, left:left + cw]))
                            for f in rgb_frames]).permute(0, 3, 1, 2).float()
        clip = F.interpolate(clip, size=(p.crop, p.crop), mode="bilinear", align_corners=False, antialias=True)
        if flip:
            clip = clip.flip(-1)
        clip = clip.div_(255.0).permute(1, 0, 2, 3)  # (C, T, H, W)
        mean = torch.tensor(p.mean).view(-1, 1, 1, 1)
        std = torch.tensor(p.std).view(-1, 1, 1, 1)
        return clip.sub_(mean).div_(std)


class KeyedClips(KeyedSamples):
    """`(index, seed)` -> (clip tensor, label): a random training clip for that seed, or the video's middle
    clip through the evaluation recipe when the seed is None. The stand-in of `KeyedImages` for videos."""

    def __init__(self, samples: Sequence[tuple], preprocess: Preprocess, augment: ClipAugment | None,
                 limits: DecodeLimits = DEFAULT_LIMITS):
        super().__init__(samples, limits)
        self.preprocess = preprocess
        self.eval_transform = ClipTransform(preprocess)
        self.augment = augment

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, label = self.samples[index]
        try:
            with VideoReader(path, self.limits) as reader:
                info = reader.info
                if seed is None or self.augment is None:
                    wanted = ClipSampling.of(self.preprocess).clip_indices(info, 1)[0]
                    return self.eval_transform.stack([self.eval_transform.frame(rgb)
                                                      for _, rgb in reader.frames(wanted)]), label
                g = torch.Generator().manual_seed(seed)
                wanted = self.augment.frames(info.num_frames, info.fps, g)
                return self.augment([rgb for _, rgb in reader.frames(wanted)], g), label
        except VideoError as e:
            # training data is checked up front (`VideoRecipe.usable`); a file that breaks later stops the run
            raise InputError(f"{e.path}: {e.reason}; remove or replace it and resume") from None


def choose_video_strategy(train_samples: Sequence[tuple], num_classes: int, unfreeze: int) -> tuple[Strategy, str]:
    """`auto` for videos, from the number of clips per class (the images' thresholds)."""
    per_class = len(train_samples) / max(num_classes, 1)
    if per_class < FEW_PER_CLASS:
        return Strategy.LINEAR, (f"{per_class:.0f} videos per class: too few to train more than the classifier "
                                 f"without overfitting")
    if per_class >= MANY_PER_CLASS:
        return Strategy.FULL, f"{per_class:.0f} videos per class: enough to train every layer"
    return Strategy.PARTIAL, (f"{per_class:.0f} videos per class: the last {unfreeze} stages and the head train, "
                              f"the earlier stages keep their pre-trained weights")



class VideoRecipe(ClassificationRecipe):
    """Classification of videos: clips instead of images (see the module docstring)."""

    task = Task.VIDEO

    def detects(self, data) -> bool:
        return is_video_dataset(data)

    def data(self, data, train, val, classes, cfg: FinetuneConfig, dist: D.Dist) -> RunData:
        if classes is not None:
            raise InputError("--classes names the classes of a segmentation dataset; a video dataset's classes are "
                             "its sub-folders")
        train_samples, val_samples, names, sources = video_samples(data, train, val, cfg)
        return RunData(train_samples, val_samples, names, sources, fingerprint((train_samples, val_samples), names))

    def usable(self, samples: list, limits: DecodeLimits) -> tuple[list, list[Failure]]:
        """The samples whose header reads as a video within `limits` (frame size), and a `Failure` for each
        of the others."""
        kept, failures = [], []
        for sample in samples:
            try:
                with VideoReader(sample[0], limits=limits):
                    kept.append(sample)
            except VideoError as e:
                failures.append(Failure(e.path, e.reason))
        return kept, failures

    def starting_model(self, cfg: FinetuneConfig, classes: Sequence[str], dist: D.Dist):
        net, builder_kwargs, weights = super().starting_model(cfg, classes, dist)
        _own_weights(net)
        return net, builder_kwargs, weights

    def preprocess(self, net, cfg: FinetuneConfig) -> Preprocess:
        return video_training_preprocess(net.require_card().preprocess, cfg)

    def choose_strategy(self, ctx: RunContext) -> tuple[Strategy, str]:
        return choose_video_strategy(ctx.train_samples, len(ctx.classes), ctx.cfg.unfreeze)

    def dataset(self, ctx: RunContext, samples: Sequence[tuple], augment) -> Dataset:
        return KeyedClips(samples, ctx.pp, augment, ctx.limits)

    def augmentation(self, ctx: RunContext) -> ClipAugment | None:
        return ClipAugment(ctx.pp, ctx.cfg.crop_scale, hflip=bool(ctx.cfg.hflip)) if ctx.cfg.augment else None

    def stage_map(self, ctx: RunContext) -> StageMap:
        return map_stages(ctx.net, ctx.pp.crop, frames=ctx.pp.clip_len)

    def eval_batch(self, ctx: RunContext) -> int:
        return ctx.cfg.batch_size  # a clip is clip_len images: the training batch bounds the memory

    def feature_key(self, ctx: RunContext) -> dict:
        return {"clip_len": ctx.pp.clip_len}


def _own_weights(net: ZooModel) -> None:
    """Give every parameter and buffer memory of its own. A model loaded from a file holds views of the
    file's memory map (several dtypes over one storage), which training would write through and which
    `torch.save` refuses to checkpoint."""
    with torch.no_grad():
        for module in net.modules():
            for p in module.parameters(recurse=False):
                p.data = p.data.clone()
            for name, b in module.named_buffers(recurse=False):
                setattr(module, name, b.clone())
