"""RegNet X and Y, 400MF to 128GF.

Radosavovic et al., "Designing Network Design Spaces" (2020). A RegNet is four numbers:
block widths grow linearly (`w_0 + w_a * i`) and are then quantised to powers of `w_m`,
which groups the blocks into stages. X uses plain bottleneck blocks with group
convolutions, Y adds squeeze-excitation. Every size is one row of `VARIANTS`, expanded
by `stage_plan`. State-dict names match torchvision's (`trunk_output.blockS.blockS-I`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypedDict

import torch
from torch import nn

from .base import FeatureInfo, ZooModel, init_weights_torchvision
from .layers import ConvNormAct, SqueezeExcitation, make_divisible


@dataclass(frozen=True)
class RegNetConfig:
    depth: int  # number of blocks
    w_0: int  # width of the first block
    w_a: float  # slope of the linear width progression
    w_m: float  # ratio between the widths of consecutive stages
    group_width: int  # channels per group of the 3x3 convolution
    se_ratio: float | None = None  # squeeze-excitation width / block input width (RegNetY)
    bottleneck_multiplier: float = 1.0
    stem_width: int = 32


class _YArgs(TypedDict):
    se_ratio: float


_Y: _YArgs = {"se_ratio": 0.25}
VARIANTS: dict[str, RegNetConfig] = {
    "regnet_x_400mf": RegNetConfig(22, 24, 24.48, 2.54, 16),
    "regnet_x_800mf": RegNetConfig(16, 56, 35.73, 2.28, 16),
    "regnet_x_1_6gf": RegNetConfig(18, 80, 34.01, 2.25, 24),
    "regnet_x_3_2gf": RegNetConfig(25, 88, 26.31, 2.25, 48),
    "regnet_x_8gf": RegNetConfig(23, 80, 49.56, 2.88, 120),
    "regnet_x_16gf": RegNetConfig(22, 216, 55.59, 2.1, 128),
    "regnet_x_32gf": RegNetConfig(23, 320, 69.86, 2.0, 168),
    "regnet_y_400mf": RegNetConfig(16, 48, 27.89, 2.09, 8, **_Y),
    "regnet_y_800mf": RegNetConfig(14, 56, 38.84, 2.4, 16, **_Y),
    "regnet_y_1_6gf": RegNetConfig(27, 48, 20.71, 2.65, 24, **_Y),
    "regnet_y_3_2gf": RegNetConfig(21, 80, 42.63, 2.66, 24, **_Y),
    "regnet_y_8gf": RegNetConfig(17, 192, 76.82, 2.19, 56, **_Y),
    "regnet_y_16gf": RegNetConfig(18, 200, 106.23, 2.48, 112, **_Y),
    "regnet_y_32gf": RegNetConfig(20, 232, 115.89, 2.53, 232, **_Y),
    "regnet_y_128gf": RegNetConfig(27, 456, 160.83, 2.52, 264, **_Y),
}

_QUANT = 8  # block widths are multiples of 8


@dataclass(frozen=True)
class StagePlan:
    width: int
    depth: int
    group_width: int


def stage_plan(cfg: RegNetConfig) -> list[StagePlan]:
    """The stages (width, depth, group width) that the four RegNet numbers describe."""
    # in float32 on the CPU, as the published models were sized: the roundings must land on the
    # same side, and a build under `torch.device("meta")` still needs real numbers here
    index = torch.arange(cfg.depth, dtype=torch.float32, device="cpu")
    exponent = torch.round(torch.log((index * cfg.w_a + cfg.w_0) / cfg.w_0) / math.log(cfg.w_m))
    widths = (torch.round(cfg.w_0 * torch.pow(cfg.w_m, exponent) / _QUANT) * _QUANT).int().tolist()
    stages: list[list[int]] = []  # consecutive runs of equal width
    for w in widths:
        if stages and stages[-1][0] == w:
            stages[-1][1] += 1
        else:
            stages.append([w, 1])
    plan = []
    for width, depth in stages:
        # the bottleneck width must be a multiple of the group width (which may shrink to fit)
        bottleneck = int(width * cfg.bottleneck_multiplier)
        group_width = min(cfg.group_width, bottleneck)
        bottleneck = make_divisible(bottleneck, group_width)
        plan.append(StagePlan(int(bottleneck / cfg.bottleneck_multiplier), depth, group_width))
    return plan


class BottleneckTransform(nn.Module):
    """1x1 -> grouped 3x3 (strided) -> (squeeze-excitation) -> 1x1, named `a`, `b`, `se`, `c`."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, group_width: int, bottleneck_multiplier: float,
                 se_ratio: float | None):
        super().__init__()
        mid = int(round(out_chs * bottleneck_multiplier))
        self.a = ConvNormAct(in_chs, mid, 1)
        self.b = ConvNormAct(mid, mid, 3, stride, groups=mid // group_width)
        # RegNetY squeezes relative to the block's input width, not the bottleneck's
        self.se = SqueezeExcitation(mid, int(round(se_ratio * in_chs))) if se_ratio else None
        self.c = ConvNormAct(mid, out_chs, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))
        if self.se is not None:
            x = self.se(x)
        return self.c(x)


class ResBottleneckBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, group_width: int, bottleneck_multiplier: float,
                 se_ratio: float | None):
        super().__init__()
        self.proj = ConvNormAct(in_chs, out_chs, 1, stride, act_layer=None) \
            if in_chs != out_chs or stride != 1 else None
        self.f = BottleneckTransform(in_chs, out_chs, stride, group_width, bottleneck_multiplier, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(ZooModel):
    classifier_name = "fc"
    first_conv = "stem.0"

    def __init__(self, cfg: RegNetConfig, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        self.stem = ConvNormAct(in_chans, cfg.stem_width, 3, 2)
        self.feature_info = [FeatureInfo("stem", cfg.stem_width, 2)]
        channels, stages = cfg.stem_width, OrderedDict[str, nn.Module]()
        for i, stage in enumerate(stage_plan(cfg)):
            name = f"block{i + 1}"
            stages[name] = nn.Sequential(OrderedDict(
                (f"{name}-{j}", ResBottleneckBlock(channels if j == 0 else stage.width, stage.width,
                                                   2 if j == 0 else 1, stage.group_width,
                                                   cfg.bottleneck_multiplier, cfg.se_ratio))
                for j in range(stage.depth)
            ))
            channels = stage.width
            self.feature_info.append(FeatureInfo(f"trunk_output.{name}", channels, 4 * 2**i))
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self.num_classes = num_classes
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

        init_weights_torchvision(self)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        fc = nn.Linear(self.num_features, num_classes)
        nn.init.normal_(fc.weight, 0.0, 0.01)
        nn.init.zeros_(fc.bias)
        return fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_output(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


MODEL_CLASS = RegNet
