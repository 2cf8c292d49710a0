"""The one typed description every model carries: what it computes, with which weights, for which classes.

`create_model` (and a bundle or an exported file) produce a `ModelCard`; every workflow reads it,
never loose attributes. `model.card` on a network, `runner.card` on a runtime backend.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .data.preprocess import Preprocess
from .enums import Task
from .weights.records import Weights

if TYPE_CHECKING:
    from .bundle import BundleInfo


@dataclass(frozen=True)
class ModelCard:
    """What a model is. Immutable: derive a changed card with `card.replace(...)`."""

    task: Task
    architecture: str  # registry name, e.g. "efficientnet_lite0"
    preprocess: Preprocess  # the evaluation preprocessing its inputs need
    classes: tuple[str, ...] | None = None  # classes[i] names output i; None when unknown
    weights: Weights | None = None  # the published weights record, when the weights are one
    source: str | None = None  # where the weights were read from (a file, a bundle); None: random init
    bundle: BundleInfo | None = None  # the bundle it was loaded from
    # the architecture arguments that rebuild this network (JSON types: what a bundle records), e.g.
    # `image_size` of a ViT or `backbone` of a composed head
    builder_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def weights_name(self) -> str | None:
        """How the weights are named to a user: the record (`arch.TAG`), the bundle, or the file."""
        if self.bundle is not None:
            return f"bundle {self.bundle.path}"
        if self.weights is not None:
            return self.weights.name
        return self.source

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """The card as plain JSON types (for `info`, servers and exported files)."""
        return {"task": self.task.value, "architecture": self.architecture, "weights": self.weights_name,
                "classes": len(self.classes) if self.classes is not None else None,
                "preprocess": self.preprocess.to_dict()}
