"""GoogLeNet (Inception v1).

Szegedy et al., "Going Deeper with Convolutions" (2014), with batch normalisation after
every convolution as torchvision trains it (and its 3x3 where the paper has a 5x5 in
the third branch, which the published weights need). State-dict names match
torchvision's (`conv1.conv`, `inception3a.branch2.0`, `aux1`, `fc`).

Auxiliary classifiers: the published checkpoint carries two (`aux1.*`, `aux2.*`).
With `aux_logits=False` (the default, and what the published weights use) they are
not built and `adapt_state_dict` drops them from a checkpoint. With `aux_logits=True`
they are built, but `forward` still returns only the main logits, in training too;
a training loop that wants the auxiliary losses calls `forward_with_aux(x)`, which
returns `(logits, (aux1_logits, aux2_logits))`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import FeatureInfo, ZooModel
from .layers import BasicConv2d, transform_input

log = logging.getLogger("visionzoo")


@dataclass(frozen=True)
class InceptionSpec:
    """Output channels of the four branches: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1."""

    ch1x1: int
    ch3x3_reduce: int
    ch3x3: int
    ch5x5_reduce: int  # named after the paper's 5x5 branch
    ch5x5: int
    pool_proj: int

    @property
    def out_chs(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj


@dataclass(frozen=True)
class GoogLeNetConfig:
    # the nine inception modules, 3a..5b; a max-pool precedes 4a and 5a
    modules: tuple[InceptionSpec, ...] = (
        InceptionSpec(64, 96, 128, 16, 32, 32), InceptionSpec(128, 128, 192, 32, 96, 64),
        InceptionSpec(192, 96, 208, 16, 48, 64), InceptionSpec(160, 112, 224, 24, 64, 64),
        InceptionSpec(128, 128, 256, 24, 64, 64), InceptionSpec(112, 144, 288, 32, 64, 64),
        InceptionSpec(256, 160, 320, 32, 128, 128),
        InceptionSpec(256, 160, 320, 32, 128, 128), InceptionSpec(384, 192, 384, 48, 128, 128),
    )


_MODULE_NAMES = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")
VARIANTS: dict[str, GoogLeNetConfig] = {"googlenet": GoogLeNetConfig()}


class Inception(nn.Module):
    def __init__(self, in_chs: int, spec: InceptionSpec):
        super().__init__()
        self.branch1 = BasicConv2d(in_chs, spec.ch1x1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(in_chs, spec.ch3x3_reduce, 1),
                                     BasicConv2d(spec.ch3x3_reduce, spec.ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_chs, spec.ch5x5_reduce, 1),
                                     BasicConv2d(spec.ch5x5_reduce, spec.ch5x5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(in_chs, spec.pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """The auxiliary classifier: 4x4 average pool, 1x1 conv, two fully connected layers."""

    def __init__(self, in_chs: int, num_classes: int, dropout: float = 0.7):
        super().__init__()
        self.conv = BasicConv2d(in_chs, 128, 1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes) if num_classes > 0 else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(F.adaptive_avg_pool2d(x, (4, 4))), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class GoogLeNet(ZooModel):
    classifier_name = "fc"
    first_conv = "conv1.conv"
    aux1: InceptionAux | None
    aux2: InceptionAux | None
    # the nine inception modules, added by name in __init__
    inception3a: Inception
    inception3b: Inception
    inception4a: Inception
    inception4b: Inception
    inception4c: Inception
    inception4d: Inception
    inception4e: Inception
    inception5a: Inception
    inception5b: Inception

    def __init__(self, cfg: GoogLeNetConfig = GoogLeNetConfig(), num_classes: int = 1000, in_chans: int = 3,
                 aux_logits: bool = False, transform_input: bool = False, init_weights: bool = True,
                 dropout: float = 0.2, dropout_aux: float = 0.7):
        super().__init__()
        if transform_input and in_chans != 3:
            raise InputError(f"transform_input converts 3-channel ImageNet inputs; got in_chans={in_chans}, "
                             f"pass transform_input=False")
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(in_chans, 64, 7, 2, 3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        channels, specs = 192, dict(zip(_MODULE_NAMES, cfg.modules, strict=True))
        for name, spec in specs.items():
            if name == "4a":
                self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
            elif name == "5a":
                self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.add_module(f"inception{name}", Inception(channels, spec))
            channels = spec.out_chs
        self.feature_info = [FeatureInfo("conv1", 64, 2), FeatureInfo("conv3", 192, 4),
                             FeatureInfo("inception3b", specs["3b"].out_chs, 8),
                             FeatureInfo("inception4e", specs["4e"].out_chs, 16),
                             FeatureInfo("inception5b", channels, 32)]
        if aux_logits:  # fed by 4a and 4d
            self.aux1 = InceptionAux(specs["4a"].out_chs, num_classes, dropout_aux)
            self.aux2 = InceptionAux(specs["4d"].out_chs, num_classes, dropout_aux)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.num_features = channels
        self.num_classes = num_classes
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        if init_weights:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def _forward_trunk(self, x: torch.Tensor, with_aux: bool
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if self.transform_input:
            x = transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if with_aux and self.aux1 is not None else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if with_aux and self.aux2 is not None else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        return x, ((aux1, aux2) if aux1 is not None and aux2 is not None else None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_trunk(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(self.dropout(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`(logits, (aux1_logits, aux2_logits))`, for training with the auxiliary losses
        (the paper weights each by 0.3)."""
        if not self.aux_logits:
            raise InputError("this GoogLeNet has no auxiliary classifiers; build it with aux_logits=True")
        features, aux = self._forward_trunk(x, with_aux=True)
        assert aux is not None  # aux_logits: the trunk ran both auxiliary heads
        return self.forward_head(features), aux

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        # auxiliary heads predict the same classes as the main one
        for head in (self.aux1, self.aux2):
            if head is not None:
                head.fc2 = _new_linear_like(head.fc1, num_classes)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.aux_logits:
            return state_dict
        dropped = [k for k in state_dict if k.startswith(("aux1.", "aux2."))]
        if dropped:
            log.info("googlenet: dropped the auxiliary classifiers of the checkpoint (%d tensors: aux1.*, aux2.*); "
                     "pass aux_logits=True to keep them", len(dropped))
        return {k: v for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2."))}


def _new_linear_like(prev: nn.Linear, num_classes: int) -> nn.Linear | nn.Identity:
    """A new `num_classes` layer after `prev` (Identity for 0), on `prev`'s device and dtype."""
    if num_classes == 0:
        return nn.Identity()
    return nn.Linear(prev.out_features, num_classes).to(device=prev.weight.device, dtype=prev.weight.dtype)


MODEL_CLASS = GoogLeNet
