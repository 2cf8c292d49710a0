"""EfficientNet B0-B7, EfficientNetV2 S/M/L and EfficientNet-Lite0-4.

Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs" (2019) and "EfficientNetV2:
Smaller Models and Faster Training" (2021); EfficientNet-Lite from the TensorFlow TPU
repository (no squeeze-excitation, ReLU6, fixed stem and head, TF "SAME" padding).

Every variant is one row: a base stage table scaled by width/depth factors. State-dict
names follow torchvision's EfficientNet (`features.S.I.block.K`, `classifier.1`); the
Lite models use the same names, minus the squeeze-excitation modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum
from functools import partial
from typing import TypedDict

import torch
from torch import nn

from .base import FeatureInfo, LinearInit, ZooModel, init_weights_torchvision
from .layers import ConvNormAct, SqueezeExcitation, StochasticDepth, make_divisible


class Block(Enum):
    MB = "mbconv"  # inverted residual: 1x1 expand, depthwise kxk, (SE), 1x1 project
    FUSED = "fused"  # expand and depthwise fused into one kxk convolution (EfficientNetV2)


@dataclass(frozen=True)
class Stage:
    block: Block
    expand: int
    kernel: int
    stride: int
    in_chs: int
    out_chs: int
    repeats: int


MB, FU = Block.MB, Block.FUSED
_B0_STAGES = (
    Stage(MB, 1, 3, 1, 32, 16, 1), Stage(MB, 6, 3, 2, 16, 24, 2), Stage(MB, 6, 5, 2, 24, 40, 2),
    Stage(MB, 6, 3, 2, 40, 80, 3), Stage(MB, 6, 5, 1, 80, 112, 3), Stage(MB, 6, 5, 2, 112, 192, 4),
    Stage(MB, 6, 3, 1, 192, 320, 1),
)
_V2_S_STAGES = (
    Stage(FU, 1, 3, 1, 24, 24, 2), Stage(FU, 4, 3, 2, 24, 48, 4), Stage(FU, 4, 3, 2, 48, 64, 4),
    Stage(MB, 4, 3, 2, 64, 128, 6), Stage(MB, 6, 3, 1, 128, 160, 9), Stage(MB, 6, 3, 2, 160, 256, 15),
)
_V2_M_STAGES = (
    Stage(FU, 1, 3, 1, 24, 24, 3), Stage(FU, 4, 3, 2, 24, 48, 5), Stage(FU, 4, 3, 2, 48, 80, 5),
    Stage(MB, 4, 3, 2, 80, 160, 7), Stage(MB, 6, 3, 1, 160, 176, 14), Stage(MB, 6, 3, 2, 176, 304, 18),
    Stage(MB, 6, 3, 1, 304, 512, 5),
)
_V2_L_STAGES = (
    Stage(FU, 1, 3, 1, 32, 32, 4), Stage(FU, 4, 3, 2, 32, 64, 7), Stage(FU, 4, 3, 2, 64, 96, 7),
    Stage(MB, 4, 3, 2, 96, 192, 10), Stage(MB, 6, 3, 1, 192, 224, 19), Stage(MB, 6, 3, 2, 224, 384, 25),
    Stage(MB, 6, 3, 1, 384, 640, 7),
)


@dataclass(frozen=True)
class EfficientNetConfig:
    stages: tuple[Stage, ...]
    width_mult: float = 1.0
    depth_mult: float = 1.0
    dropout: float = 0.2
    stochastic_depth: float = 0.2  # drop probability of the last block, linear from 0
    act_layer: type[nn.Module] = nn.SiLU
    squeeze_excite: bool = True
    same_padding: bool = False  # TensorFlow "SAME" padding (Lite checkpoints)
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    last_chs: int | None = None  # None: 4x the last stage's width
    fixed_stem_head: bool = False  # Lite: stem, head and first/last stage depth not scaled


_B = partial(EfficientNetConfig, _B0_STAGES)


class _BatchNormArgs(TypedDict):
    bn_eps: float
    bn_momentum: float


_TF_BN: _BatchNormArgs = {"bn_eps": 1e-3, "bn_momentum": 0.01}  # b5-b7 were ported from TensorFlow
_LITE = partial(EfficientNetConfig, _B0_STAGES, act_layer=nn.ReLU6, squeeze_excite=False,
                same_padding=True, bn_eps=1e-3, last_chs=1280, fixed_stem_head=True)
VARIANTS: dict[str, EfficientNetConfig] = {
    "efficientnet_b0": _B(1.0, 1.0, 0.2),
    "efficientnet_b1": _B(1.0, 1.1, 0.2),
    "efficientnet_b2": _B(1.1, 1.2, 0.3),
    "efficientnet_b3": _B(1.2, 1.4, 0.3),
    "efficientnet_b4": _B(1.4, 1.8, 0.4),
    "efficientnet_b5": _B(1.6, 2.2, 0.4, **_TF_BN),
    "efficientnet_b6": _B(1.8, 2.6, 0.5, **_TF_BN),
    "efficientnet_b7": _B(2.0, 3.1, 0.5, **_TF_BN),
    "efficientnet_v2_s": EfficientNetConfig(_V2_S_STAGES, dropout=0.2, bn_eps=1e-3, last_chs=1280),
    "efficientnet_v2_m": EfficientNetConfig(_V2_M_STAGES, dropout=0.3, bn_eps=1e-3, last_chs=1280),
    "efficientnet_v2_l": EfficientNetConfig(_V2_L_STAGES, dropout=0.4, bn_eps=1e-3, last_chs=1280),
    "efficientnet_lite0": _LITE(1.0, 1.0, 0.2),
    "efficientnet_lite1": _LITE(1.0, 1.1, 0.2),
    "efficientnet_lite2": _LITE(1.1, 1.2, 0.3),
    "efficientnet_lite3": _LITE(1.2, 1.4, 0.3),
    "efficientnet_lite4": _LITE(1.4, 1.8, 0.3),
}


class MBConv(nn.Module):
    """Inverted residual block (`Block.MB`) or its fused variant (`Block.FUSED`)."""

    def __init__(self, kind: Block, in_chs: int, out_chs: int, expand: int, kernel: int, stride: int,
                 cfg: EfficientNetConfig, norm_layer, drop_prob: float):
        super().__init__()
        self.use_res_connect = stride == 1 and in_chs == out_chs
        hidden = make_divisible(in_chs * expand)
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=cfg.act_layer,
                       same_padding=cfg.same_padding)
        layers: list[nn.Module] = []
        if kind is Block.FUSED:
            if hidden != in_chs:
                layers += [conv(in_chs, hidden, kernel, stride), conv(hidden, out_chs, 1, act_layer=None)]
            else:
                layers.append(conv(in_chs, out_chs, kernel, stride))
        else:
            if hidden != in_chs:
                layers.append(conv(in_chs, hidden, 1))
            layers.append(conv(hidden, hidden, kernel, stride, groups=hidden))
            if cfg.squeeze_excite:
                layers.append(SqueezeExcitation(hidden, max(1, in_chs // 4), act_layer=nn.SiLU))
            layers.append(conv(hidden, out_chs, 1, act_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop_prob)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


class EfficientNet(ZooModel):
    classifier_name = "classifier.1"
    first_conv = "features.0.0"

    def __init__(self, cfg: EfficientNetConfig, num_classes: int = 1000, in_chans: int = 3,
                 dropout: float | None = None, stochastic_depth: float | None = None):
        super().__init__()
        if dropout is not None:
            cfg = replace(cfg, dropout=dropout)
        if stochastic_depth is not None:
            cfg = replace(cfg, stochastic_depth=stochastic_depth)
        norm_layer = partial(nn.BatchNorm2d, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        width = partial(_scale_width, mult=cfg.width_mult)
        stem = cfg.stages[0].in_chs if cfg.fixed_stem_head else width(cfg.stages[0].in_chs)
        depths = [self._depth(cfg, i) for i in range(len(cfg.stages))]
        total = sum(depths)
        layers: list[nn.Module] = [ConvNormAct(in_chans, stem, 3, 2, norm_layer=norm_layer,
                                               act_layer=cfg.act_layer, same_padding=cfg.same_padding)]
        self.feature_info = []
        channels, reduction, block_id = stem, 2, 0
        for stage, depth in zip(cfg.stages, depths, strict=True):
            if stage.stride == 2:  # a stage ends where the next downsampling begins
                self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", channels, reduction))
                reduction *= 2
            out = width(stage.out_chs)
            blocks = []
            for i in range(depth):
                drop = cfg.stochastic_depth * block_id / total
                blocks.append(MBConv(stage.block, channels, out, stage.expand, stage.kernel,
                                     stage.stride if i == 0 else 1, cfg, norm_layer, drop))
                channels, block_id = out, block_id + 1
            layers.append(nn.Sequential(*blocks))
        last = cfg.last_chs if cfg.last_chs is not None else 4 * channels
        layers.append(ConvNormAct(channels, last, 1, norm_layer=norm_layer, act_layer=cfg.act_layer))
        self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", last, reduction))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = last
        self.num_classes = num_classes
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout, inplace=True),
                                        nn.Linear(last, num_classes) if num_classes > 0 else nn.Identity())
        init_weights_torchvision(self, LinearInit.UNIFORM_FAN_OUT)

    @staticmethod
    def _depth(cfg: EfficientNetConfig, index: int) -> int:
        repeats = cfg.stages[index].repeats
        if cfg.fixed_stem_head and index in (0, len(cfg.stages) - 1):
            return repeats
        return int(math.ceil(repeats * cfg.depth_mult))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)


def _scale_width(channels: int, mult: float) -> int:
    return make_divisible(channels * mult)


MODEL_CLASS = EfficientNet
