"""Typed, immutable records of published weights (their preprocessing is a `data.preprocess.Preprocess`)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..data.preprocess import DEFAULT_PREPROCESS, IMAGENET_MEAN, IMAGENET_STD, Preprocess

__all__ = ["DEFAULT_PREPROCESS", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "Weights"]


@dataclass(frozen=True)
class Weights:
    """One published weights file of one architecture, with everything needed to use it."""

    arch: str  # registry name of the architecture
    tag: str  # e.g. "IMAGENET1K_V2"; the full name is "arch.TAG"
    file_name: str  # file name in the cache ($TORCH_HOME/hub/checkpoints/<file_name>)
    sha256_prefix: str | None  # leading hex digits of the file's SHA-256 (verified on download)
    num_params: int
    preprocess: Preprocess
    url: str | None = None  # where the file is published (None: shipped by a package)
    package: str | None = None  # Python package that ships the file, for offline use
    package_file: str | None = None  # path of the file inside that package
    is_default: bool = False
    categories: tuple[str, ...] | None = field(default=None, compare=False, repr=False)
    dataset: str | None = "ImageNet-1K"  # what the metrics were measured on
    metrics: Mapping[str, float | None] = field(default_factory=lambda: MappingProxyType({}))  # acc@1, miou, ...
    gflops: float | None = None  # multiply-adds at the preprocessing's crop size, in billions
    file_size_mb: float | None = None  # MiB
    min_size: tuple[int, int] = (1, 1)  # smallest (height, width) the model accepts
    recipe: str | None = None  # link to the training recipe
    license: str | None = None
    layout: str = "native"  # state-dict layout of the file ("native" or a name in weights.remap)
    keypoint_names: tuple[str, ...] | None = None  # keypoint detectors: what each keypoint is
    builder_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def num_classes(self) -> int:
        """Outputs of the class head the weights were trained with (0: a task without classes)."""
        if self.categories is not None:
            return len(self.categories)
        # an ImageNet head without names (vgg16's IMAGENET1K_FEATURES), or no classes at all (optical flow)
        return 1000 if self.preprocess.kind == "ImageClassification" else 0

    @property
    def headline(self) -> tuple[str, float | None] | None:
        """The first reported metric (acc@1 for classifiers, miou, box_map, epe, ...)."""
        return next(iter(self.metrics.items()), None)

    @property
    def acc1(self) -> float | None:
        """ImageNet (or Kinetics) top-1 accuracy, for classifiers."""
        return self.metrics.get("acc@1")

    @property
    def acc5(self) -> float | None:
        return self.metrics.get("acc@5")

    def transforms(self):
        """The evaluation preprocessing that goes with these weights."""
        return self.preprocess.transforms()

    def __str__(self) -> str:
        return self.name
