"""MobileNetV2.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (2018).
State-dict names match torchvision's (`features.N.conv.*`, `classifier.1`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import FeatureInfo, ZooModel, init_weights_torchvision
from .layers import ConvNormAct, make_divisible


@dataclass(frozen=True)
class MobileNetV2Config:
    width_mult: float = 1.0
    # (expand ratio t, output channels c, repeats n, first stride s) per stage
    stages: tuple = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


VARIANTS = {"mobilenet_v2": MobileNetV2Config()}


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(inp, hidden, 1, act_layer=nn.ReLU6))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act_layer=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(ZooModel):
    classifier_name = "classifier.1"
    first_conv = "features.0.0"

    def __init__(self, cfg: MobileNetV2Config = MobileNetV2Config(), num_classes: int = 1000,
                 in_chans: int = 3, dropout: float = 0.2):
        super().__init__()
        channels = make_divisible(32 * cfg.width_mult)
        last = make_divisible(1280 * max(1.0, cfg.width_mult))
        layers: list[nn.Module] = [ConvNormAct(in_chans, channels, 3, 2, act_layer=nn.ReLU6)]
        self.feature_info = []
        reduction = 2
        for t, c, n, s in cfg.stages:
            out = make_divisible(c * cfg.width_mult)
            if s == 2:  # a stage ends where the next downsampling begins
                self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", channels, reduction))
                reduction *= 2
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(ConvNormAct(channels, last, 1, act_layer=nn.ReLU6))
        self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", last, reduction))
        self.features = nn.Sequential(*layers)
        self.num_features = last
        self.num_classes = num_classes
        self.classifier = nn.Sequential(nn.Dropout(dropout),
                                        nn.Linear(last, num_classes) if num_classes > 0 else nn.Identity())
        init_weights_torchvision(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)


MODEL_CLASS = MobileNetV2
