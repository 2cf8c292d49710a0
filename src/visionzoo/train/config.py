"""The fine-tuning configuration: one typed record, validated once, stored in checkpoints and bundles."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from ..enums import Precision, Task, parse_enum
from ..errors import InputError
from ..registry import DEFAULT_MODEL


class Strategy(str, Enum):
    LINEAR = "linear"  # frozen backbone, features cached once, only the classifier trains
    PARTIAL = "partial"  # the last `unfreeze` stages and the head train; earlier stages frozen (BN too)
    FULL = "full"  # everything trains, earlier stages with smaller learning rates
    AUTO = "auto"  # chosen from the data (see `train/probe.py`)


SEGMENTATION_HEADS = ("fcn", "deeplabv3", "lraspp")
DETECTION_HEADS = ("retinanet", "fcos", "ssdlite", "fasterrcnn", "maskrcnn", "keypointrcnn")
# per-strategy defaults for the options left as None
DEFAULT_EPOCHS = {Strategy.LINEAR: 30, Strategy.PARTIAL: 10, Strategy.FULL: 10}
DEFAULT_LR = {Strategy.LINEAR: 3e-3, Strategy.PARTIAL: 1e-3, Strategy.FULL: 1e-3}
# detection: fresh box heads under AdamW diverged at 1e-3 (RetinaNet on EfficientNet-Lite0, whose head has no
# normalisation); 3e-4 trained every head we tried
DETECTION_LR = {Strategy.LINEAR: 3e-4, Strategy.PARTIAL: 3e-4, Strategy.FULL: 3e-4}
DEFAULT_WARMUP = {Strategy.LINEAR: 0.0, Strategy.PARTIAL: 1.0, Strategy.FULL: 1.0}


def option(default: Any, help: str, *flags: str) -> Any:
    """A configuration field with the help text (and command-line flags, default `--field-name`)
    that the `finetune` command shows for it: the CLI is generated from these fields."""
    return field(default=default, metadata={"help": help, "flags": flags})


@dataclass(frozen=True)
class FinetuneConfig:
    """Every choice that shapes a training run (and so must match when a run is resumed)."""

    model: str = option(DEFAULT_MODEL, "NAME[.TAG] to start from (its weights), or a bundle. Segmentation: a "
                        "segmentation model, or a classifier to put --head on; detection: a detector, or a classifier "
                        "to put --head on.", "--model", "-m")
    head: str | None = option(None, "The head put on a classifier given as --model. Segmentation: lraspp, "
                              "deeplabv3 or fcn (default lraspp); detection: fcos, retinanet, ssdlite, fasterrcnn "
                              "maskrcnn (instance masks; COCO data with segmentations) or keypointrcnn (keypoints; "
                              "COCO data with keypoints) (default fcos).")
    fpn_channels: int | None = option(None, "Detection: the width of the feature pyramid and of the RetinaNet/FCOS "
                                      "heads (or Mask R-CNN's mask head, Keypoint R-CNN's keypoint head) put on a "
                                      "classifier (default 256; 64 trains several times faster).")
    strategy: Strategy = option(Strategy.AUTO, "linear: train the classifier on cached features; partial: also the "
                                "last --unfreeze stages; full: everything; auto: chosen from the data.",
                                "--strategy", "-s")
    epochs: int | None = option(None, "Default: 30 linear, 10 otherwise.", "--epochs", "-e")
    batch_size: int = option(32, "Global batch (all processes together), per optimizer micro-step.",
                             "--batch-size", "-b")
    lr: float | None = option(None, "Head learning rate. Default: 3e-3 linear, 1e-3 otherwise; 3e-4 for "
                              "detection.")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and normalisation weights).")
    lr_decay: float = option(0.7, "Learning-rate factor per earlier stage (each stage gets this times the next's).")
    unfreeze: int = option(2, "partial: how many of the last stages train.")
    warmup_epochs: float | None = option(None, "Linear learning-rate warm-up (default 1; 0 for linear).")
    head_epochs: int = option(0, "partial/full: train the new head alone first for this many epochs.")
    label_smoothing: float = option(0.1, "Label smoothing of the cross-entropy (classification).")
    image_size: int | None = option(None, "Crop size (default: the weights' own preprocessing). Segmentation: also "
                                    "the shorter side images are resized to. Detection: the detector's input size "
                                    "(RetinaNet/FCOS: its min_size; SSDlite on a classifier: its fixed size).")
    clip_len: int | None = option(None, "Video models: frames per clip (default: the weights' own preprocessing).")
    augment: bool = option(True, "Random resized crops during training (segmentation: rescaled, cropped and "
                           "flipped with their masks).", "--augment/--no-augment")
    crop_scale: tuple[float, float] = option((0.7, 1.0), "Area fraction (low high) of the random crops: light, most "
                                             "of the image (classification).")
    scale_range: tuple[float, float] = option((0.5, 2.0), "Segmentation, detection: random rescaling (low high) of "
                                              "each image and its mask or boxes relative to --image-size, before the "
                                              "crop.")
    hflip: bool | None = option(None, "Random horizontal flips (default: on for segmentation and detection; off for "
                                "classification, where a mirrored image may change class).", "--hflip/--no-hflip")
    class_weights: bool = option(False, "Segmentation: weigh each class's pixels by its rarity in the training "
                                 "masks (median frequency balancing).", "--class-weights/--no-class-weights")
    aug_passes: int = option(0, "linear: extra augmented feature passes on top of the clean one (each once).")
    val_fraction: float = option(0.25, "Held out (stratified) when there is no --val.")
    seed: int = option(0, "Seed of the split, the data order, the augmentations and the new head.")
    precision: Precision = option(Precision.AUTO, "auto: bf16 on GPUs that support it and on CPUs with native "
                                  "bf16 (AVX512-BF16/AMX) for crops >= 128 px; else fp32.")
    accumulate: int = option(1, "Micro-batches per optimizer step (gradient accumulation).")
    patience: int | None = option(None, "Early stopping after this many epochs without a better validation "
                                  "accuracy.")
    num_workers: int | None = option(None, "Image decoding processes (default: one per spare core).", "--workers")

    def __post_init__(self):
        object.__setattr__(self, "strategy", parse_enum(Strategy, self.strategy, "strategy"))
        object.__setattr__(self, "precision", parse_enum(Precision, self.precision, "precision"))
        if self.precision is Precision.INT8:
            raise InputError("training runs in fp32 or bf16 (precision auto, fp32 or bf16); int8 is for "
                             "`visionzoo quantize`")
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        checks = [
            (self.epochs is None or self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 < self.lr_decay <= 1, "lr_decay must be in (0, 1]"),
            (self.unfreeze >= 0, "unfreeze must be >= 0"),
            (self.warmup_epochs is None or self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.head_epochs >= 0, "head_epochs must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.image_size is None or self.image_size >= 8, "image_size must be >= 8"),
            (self.clip_len is None or self.clip_len >= 1, "clip_len must be >= 1"),
            (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             "crop_scale must be (low, high) with 0 < low <= high <= 1"),
            (len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1],
             "scale_range must be (low, high) with 0 < low <= high"),
            (self.head is None or self.head in SEGMENTATION_HEADS + DETECTION_HEADS,
             f"head must be one of {', '.join(SEGMENTATION_HEADS)} (segmentation) or {', '.join(DETECTION_HEADS)} "
             f"(detection)"),
            # (the heads normalise 32 groups of channels: a group of one channel on a 1 x 1 level cannot train)
            (self.fpn_channels is None or (self.fpn_channels >= 64 and self.fpn_channels % 32 == 0),
             "fpn_channels must be a multiple of 32, at least 64 (the heads' group normalisation)"),
            (self.aug_passes >= 0, "aug_passes must be >= 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.accumulate >= 1, "accumulate must be >= 1"),
            (self.patience is None or self.patience >= 1, "patience must be >= 1"),
            (self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"{message}; fix the fine-tuning option")

    def resolved(self, strategy: Strategy, task: Task = Task.CLASSIFICATION) -> FinetuneConfig:
        """This configuration for a concrete strategy and task, with its defaults filled in."""
        if strategy is Strategy.AUTO:
            raise ValueError("resolve AUTO to a concrete strategy first")
        epochs = self.epochs or DEFAULT_EPOCHS[strategy]
        if self.head_epochs >= epochs and strategy is not Strategy.LINEAR:
            raise InputError(f"head_epochs ({self.head_epochs}) must be less than epochs ({epochs})")
        heads = {Task.SEGMENTATION: SEGMENTATION_HEADS, Task.DETECTION: DETECTION_HEADS}.get(task)
        if self.head is not None and heads is not None and self.head not in heads:
            raise InputError(f"--head {self.head} is not a {task.value} head; use one of {', '.join(heads)}")
        hflip = task in (Task.SEGMENTATION, Task.DETECTION) if self.hflip is None else self.hflip
        default_lr = (DETECTION_LR if task is Task.DETECTION else DEFAULT_LR)[strategy]
        return replace(self, strategy=strategy, epochs=epochs, lr=self.lr or default_lr, hflip=hflip,
                       warmup_epochs=DEFAULT_WARMUP[strategy] if self.warmup_epochs is None else self.warmup_epochs)

    def settled(self) -> tuple[int, float, float]:
        """`(epochs, lr, warmup_epochs)` of a `resolved` configuration (where none is None)."""
        if self.epochs is None or self.lr is None or self.warmup_epochs is None:
            raise ValueError("FinetuneConfig.settled needs a resolved configuration (FinetuneConfig.resolved)")
        return self.epochs, self.lr, self.warmup_epochs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strategy"], d["precision"] = self.strategy.value, self.precision.value
        d["crop_scale"], d["scale_range"] = list(self.crop_scale), list(self.scale_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
