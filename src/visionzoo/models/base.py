"""The interfaces every visionzoo model exposes.

`VisionModel` is the root of every architecture, whatever its task: it declares the task,
the number of classes, a way to resize the class head, and the hooks the weight loader
calls. `ZooModel` is the interface of classifiers (images, and video clips):
`forward_features` gives the last feature map, `forward_head` pools and classifies (or stops
at the pooled embedding with `pre_logits=True`), `reset_classifier` swaps the head for a
correctly sized new one, and `feature_info` describes each stage. Workflows (predict, embed,
fine-tune, export) are written against these classes only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..enums import Task
from ..errors import InputError

if TYPE_CHECKING:
    from ..card import ModelCard
    from ..data.preprocess import Preprocess
    from ..weights.adapt import LoadReport
    from ..weights.records import Weights


@dataclass(frozen=True)
class FeatureInfo:
    """One stage of a network: where its output comes from and what it looks like."""

    module: str  # qualified name of the submodule whose output is the stage's output
    num_chs: int  # channels of that output
    reduction: int  # input size / output size (the stage's total stride)


class VisionModel(nn.Module):
    """Root of every architecture: subclasses declare `task` and set `num_classes` in `__init__`.

    `create_model` sets `card` (what the model is: task, weights, classes, preprocessing) and
    `load_report` (what loading its weights did). The read-only properties below are views of
    the card, kept for the familiar spelling (`model.preprocess`, `model.categories`).
    """

    task: ClassVar[Task]
    num_classes: int  # size of the class output (0 when the head was removed)
    card: ModelCard | None = None
    load_report: LoadReport | None = None

    def require_card(self) -> ModelCard:
        """The card, for workflows that need one: a model built without `create_model` has none.
        (A method, not a property: `hasattr` and tracers probe properties and expect only
        AttributeError, so a missing card must not raise from an attribute.)"""
        if self.card is None:
            raise InputError(f"this {type(self).__name__} has no description (task, classes, preprocessing); "
                             f"build it with visionzoo.create_model")
        return self.card

    @property
    def arch(self) -> str | None:
        return self.card.architecture if self.card is not None else None

    @property
    def preprocess(self) -> Preprocess | None:
        return self.card.preprocess if self.card is not None else None

    @property
    def categories(self) -> tuple[str, ...] | None:
        return self.card.classes if self.card is not None else None

    @property
    def pretrained_weights(self) -> Weights | None:
        return self.card.weights if self.card is not None else None

    @property
    def weights_source(self) -> str | None:
        return self.card.source if self.card is not None else None

    @property
    def class_layers(self) -> tuple[str, ...]:
        """Dotted names of the layers that map to the classes (the ones `reset_classifier` replaces)."""
        return ()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the class head(s) with new ones of `num_classes` outputs."""
        raise NotImplementedError

    def _forget_classes_unless(self, num_classes: int) -> None:
        """After a head change: the card's class names no longer apply unless there are as many."""
        if self.card is not None and self.card.classes is not None and len(self.card.classes) != num_classes:
            self.card = self.card.replace(classes=None)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fit a checkpoint of this architecture to this instance before strict loading.

        Called by `create_model` after foreign layouts are renamed. Families override it
        for what only they know (resampling position embeddings for another image size,
        dropping auxiliary heads that are switched off) and log what they changed.
        The default returns the state dict unchanged. It runs on a model whose
        parameters may be on the meta device (see `weights/lean.py`): use shapes and
        attributes, not parameter values. Shape changes are reported in `load_report`.
        """
        return state_dict

    def init_computed_buffers(self) -> None:
        """(Re)compute the buffers the model derives from its architecture instead of
        learning them (Swin/MaxViT relative-position indices, Swin v2 coordinate tables).

        Constructors call this; call it again after building on the meta device and
        materialising with `to_empty` (which leaves buffers uninitialised). Each submodule
        that owns such buffers implements `init_computed_buffers`; the default visits them.
        """
        for m in self.modules():
            init = getattr(m, "init_computed_buffers", None)
            if m is not self and callable(init):
                init()


class ZooModel(VisionModel):
    """Base of classifiers (images and video clips). Subclasses set the attributes below in `__init__`.

    Attributes:
        num_classes: size of the classifier output (0 when the head was removed).
        num_features: channels of `forward_features`' output.
        head_hidden_size: width of `forward_head(x, pre_logits=True)`; equals
            `num_features` unless the head has hidden layers (VGG, AlexNet).
        feature_info: one `FeatureInfo` per stage, shallow to deep.
        classifier_name: dotted path of the final classifier layer.
        first_conv: dotted path of the first convolution (for input-channel adaptation).
    """

    task: ClassVar[Task] = Task.CLASSIFICATION
    num_features: int
    feature_info: list[FeatureInfo]
    classifier_name: str
    first_conv: str
    # the one (square) input size a model is built for (ViT), or None when any size it
    # can tile works (convolutional families, Swin, MaxViT)
    image_size: int | None = None

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    @property
    def class_layers(self) -> tuple[str, ...]:
        return (self.classifier_name,)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_name)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        """A freshly initialised final layer mapping the pre-logits to `num_classes`."""
        return nn.Linear(self.head_hidden_size, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer with a new one of `num_classes` outputs (0 removes it).

        The new layer gets the old one's device and dtype, so this is safe on a
        model already moved to a GPU or converted to another precision.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise InputError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        old = self.get_classifier()
        ref = next(iter(old.parameters()), None)
        new = self._new_classifier(num_classes) if num_classes > 0 else nn.Identity()
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        parent_name, _, leaf = self.classifier_name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        setattr(parent, leaf, new)
        self.num_classes = num_classes
        self._forget_classes_unless(num_classes)

    def format_stage_output(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """Turn the raw output of `feature_info[index].module` into an NCHW feature map.

        Convolutional families return it unchanged; token-based families (ViT, Swin)
        override this to reshape tokens or channels-last maps.
        """
        return output


class LinearInit(Enum):
    """How `init_weights_torchvision` initialises Linear layers (it differs by family)."""

    NORMAL = "normal"  # N(0, 0.01), zero bias: VGG, MobileNet, RegNet
    UNIFORM_FAN_OUT = "uniform_fan_out"  # U(+-1/sqrt(out_features)), zero bias: EfficientNet
    DEFAULT = "default"  # PyTorch's own Linear init: ResNet


def init_weights_torchvision(model: nn.Module, linear: LinearInit = LinearInit.NORMAL) -> None:
    """The initialisation torchvision gives its CNNs (image and video): He-normal (fan-out)
    convolutions, unit normalisation layers, zero biases, and the family's choice for Linear layers."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear is LinearInit.DEFAULT:
                m.reset_parameters()
                continue
            if linear is LinearInit.UNIFORM_FAN_OUT:
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
