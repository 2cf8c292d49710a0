"""The fine-tuning configuration: one typed record, validated once, stored in checkpoints and bundles."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any

from ..errors import InputError


class Strategy(str, Enum):
    LINEAR = "linear"  # frozen backbone, features cached once, only the classifier trains
    PARTIAL = "partial"  # the last `unfreeze` stages and the head train; earlier stages frozen (BN too)
    FULL = "full"  # everything trains, earlier stages with smaller learning rates
    AUTO = "auto"  # chosen from the data (see `train/probe.py`)


class Precision(str, Enum):
    AUTO = "auto"  # bf16 on GPUs that support it and on CPUs with native bf16 for crops >= 128 px
    FP32 = "fp32"
    BF16 = "bf16"  # bfloat16 autocast; weights, optimizer state and loss stay float32


# per-strategy defaults for the options left as None
DEFAULT_EPOCHS = {Strategy.LINEAR: 30, Strategy.PARTIAL: 10, Strategy.FULL: 10}
DEFAULT_LR = {Strategy.LINEAR: 3e-3, Strategy.PARTIAL: 1e-3, Strategy.FULL: 1e-3}
DEFAULT_WARMUP = {Strategy.LINEAR: 0.0, Strategy.PARTIAL: 1.0, Strategy.FULL: 1.0}


@dataclass(frozen=True)
class FinetuneConfig:
    """Every choice that shapes a training run (and so must match when a run is resumed)."""

    model: str = "efficientnet_lite0"  # NAME[.TAG]: the architecture and the weights to start from
    strategy: Strategy = Strategy.AUTO
    epochs: int | None = None  # None: 30 for linear, 10 otherwise
    batch_size: int = 32  # per optimizer micro-step, over all processes together
    lr: float | None = None  # the head's learning rate; None: 3e-3 for linear, 1e-3 otherwise
    weight_decay: float = 0.01  # AdamW; not applied to biases and normalisation weights
    lr_decay: float = 0.7  # each stage's learning rate is this times the next (deeper) stage's
    unfreeze: int = 2  # partial: how many of the last stages train
    warmup_epochs: float | None = None  # linear warm-up of the learning rate; None: 1 (0 for linear)
    head_epochs: int = 0  # full/partial: first train the head alone for this many epochs
    label_smoothing: float = 0.1
    image_size: int | None = None  # crop size; None: the weights' own preprocessing
    augment: bool = True  # random resized crops (scale `crop_scale`) during training
    crop_scale: tuple[float, float] = (0.7, 1.0)  # area fraction of the random crops: light, most of the image
    hflip: bool = False  # random horizontal flips: only for classes that survive mirroring
    aug_passes: int = 0  # linear: extra augmented copies of the training features (each computed once)
    val_fraction: float = 0.25  # held out (stratified) when no validation set is given
    seed: int = 0
    precision: Precision = Precision.AUTO
    accumulate: int = 1  # gradient accumulation: micro-batches per optimizer step
    patience: int | None = None  # early stopping: epochs without a better validation accuracy
    num_workers: int | None = None  # image decoding processes; None: one per spare core

    def __post_init__(self):
        object.__setattr__(self, "strategy", _enum(Strategy, self.strategy, "strategy"))
        object.__setattr__(self, "precision", _enum(Precision, self.precision, "precision"))
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
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
            (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             "crop_scale must be (low, high) with 0 < low <= high <= 1"),
            (self.aug_passes >= 0, "aug_passes must be >= 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.accumulate >= 1, "accumulate must be >= 1"),
            (self.patience is None or self.patience >= 1, "patience must be >= 1"),
            (self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"{message}; fix the fine-tuning option")

    def resolved(self, strategy: Strategy) -> FinetuneConfig:
        """This configuration for a concrete strategy, with its defaults filled in."""
        if strategy is Strategy.AUTO:
            raise ValueError("resolve AUTO to a concrete strategy first")
        epochs = self.epochs or DEFAULT_EPOCHS[strategy]
        if self.head_epochs >= epochs and strategy is not Strategy.LINEAR:
            raise InputError(f"head_epochs ({self.head_epochs}) must be less than epochs ({epochs})")
        return replace(self, strategy=strategy, epochs=epochs, lr=self.lr or DEFAULT_LR[strategy],
                       warmup_epochs=DEFAULT_WARMUP[strategy] if self.warmup_epochs is None else self.warmup_epochs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strategy"], d["precision"] = self.strategy.value, self.precision.value
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _enum(kind: type[Enum], value: Any, what: str):
    try:
        return kind(value.value if isinstance(value, Enum) else value)
    except ValueError:
        choices = ", ".join(v.value for v in kind)
        raise InputError(f"{what} must be one of {choices}, got {value!r}") from None
