"""MobileNetV3 Large and Small.

Howard et al., "Searching for MobileNetV3" (2019): inverted residuals with optional
squeeze-excitation (hard-sigmoid gate) and hard-swish activations, found by
architecture search. State-dict names match torchvision's (`features.N.block.K`,
`classifier.0`/`classifier.3`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeatureInfo, ZooModel, init_weights_torchvision
from .layers import ConvNormAct, SqueezeExcitation, make_divisible

RE, HS = nn.ReLU, nn.Hardswish


@dataclass(frozen=True)
class Bneck:
    """One inverted residual block of the searched architecture."""

    kernel: int
    expanded: int  # channels of the depthwise convolution
    out_chs: int
    squeeze_excite: bool
    act_layer: type[nn.Module]
    stride: int
    dilation: int = 1  # >1: the stride is replaced by this dilation of the depthwise convolution


@dataclass(frozen=True)
class MobileNetV3Config:
    stem_chs: int
    blocks: tuple[Bneck, ...]
    last_chs: int  # width of the hidden layer of the classifier
    width_mult: float = 1.0


VARIANTS: dict[str, MobileNetV3Config] = {
    "mobilenet_v3_large": MobileNetV3Config(16, (
        Bneck(3, 16, 16, False, RE, 1), Bneck(3, 64, 24, False, RE, 2), Bneck(3, 72, 24, False, RE, 1),
        Bneck(5, 72, 40, True, RE, 2), Bneck(5, 120, 40, True, RE, 1), Bneck(5, 120, 40, True, RE, 1),
        Bneck(3, 240, 80, False, HS, 2), Bneck(3, 200, 80, False, HS, 1), Bneck(3, 184, 80, False, HS, 1),
        Bneck(3, 184, 80, False, HS, 1), Bneck(3, 480, 112, True, HS, 1), Bneck(3, 672, 112, True, HS, 1),
        Bneck(5, 672, 160, True, HS, 2), Bneck(5, 960, 160, True, HS, 1), Bneck(5, 960, 160, True, HS, 1),
    ), last_chs=1280),
    "mobilenet_v3_small": MobileNetV3Config(16, (
        Bneck(3, 16, 16, True, RE, 2), Bneck(3, 72, 24, False, RE, 2), Bneck(3, 88, 24, False, RE, 1),
        Bneck(5, 96, 40, True, HS, 2), Bneck(5, 240, 40, True, HS, 1), Bneck(5, 240, 40, True, HS, 1),
        Bneck(5, 120, 48, True, HS, 1), Bneck(5, 144, 48, True, HS, 1), Bneck(5, 288, 96, True, HS, 2),
        Bneck(5, 576, 96, True, HS, 1), Bneck(5, 576, 96, True, HS, 1),
    ), last_chs=1024),
}


class InvertedResidual(nn.Module):
    def __init__(self, in_chs: int, cfg: Bneck, width_mult: float, norm_layer):
        super().__init__()
        expanded = make_divisible(cfg.expanded * width_mult)
        out_chs = make_divisible(cfg.out_chs * width_mult)
        self.use_res_connect = cfg.stride == 1 and in_chs == out_chs
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=cfg.act_layer)
        layers: list[nn.Module] = []
        if expanded != in_chs:
            layers.append(conv(in_chs, expanded, 1))
        stride = 1 if cfg.dilation > 1 else cfg.stride
        layers.append(conv(expanded, expanded, cfg.kernel, stride, groups=expanded, dilation=cfg.dilation))
        if cfg.squeeze_excite:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), gate_layer=nn.Hardsigmoid))
        layers.append(conv(expanded, out_chs, 1, act_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(ZooModel):
    classifier_name = "classifier.3"
    first_conv = "features.0.0"

    def __init__(self, cfg: MobileNetV3Config, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.2,
                 dilated: bool = False, reduced_tail: bool = False,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        """`dilated` keeps the last stage at stride 16 with dilated depthwise convolutions
        (segmentation backbones); `reduced_tail` halves the last stage's channels (as torchvision's
        builder does on request); `norm_layer` replaces the BatchNorm (eps 1e-3) of the published
        classifiers (detection backbones use FrozenBatchNorm2d)."""
        super().__init__()
        # the TensorFlow-trained defaults: BN eps 1e-3, momentum 0.01
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        blocks = _tail_adjusted(cfg.blocks, dilated, reduced_tail)
        channels = make_divisible(cfg.stem_chs * cfg.width_mult)
        layers: list[nn.Module] = [ConvNormAct(in_chans, channels, 3, 2, norm_layer=norm_layer, act_layer=HS)]
        self.feature_info = []
        reduction = 2
        for block in blocks:
            if block.stride == 2:  # a stage ends where the next downsampling begins
                self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", channels, reduction))
                reduction *= 2 if block.dilation == 1 else 1
            layer = InvertedResidual(channels, block, cfg.width_mult, norm_layer)
            layers.append(layer)
            channels = layer.out_channels
        last_conv = 6 * channels
        layers.append(ConvNormAct(channels, last_conv, 1, norm_layer=norm_layer, act_layer=HS))
        self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", last_conv, reduction))
        self.features = nn.Sequential(*layers)
        self.num_features = last_conv
        self._hidden = make_divisible(cfg.last_chs // (2 if reduced_tail else 1) * cfg.width_mult)
        self.num_classes = num_classes
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, self._hidden), nn.Hardswish(inplace=True), nn.Dropout(dropout, inplace=True),
            nn.Linear(self._hidden, num_classes) if num_classes > 0 else nn.Identity(),
        )
        init_weights_torchvision(self)

    @property
    def head_hidden_size(self) -> int:
        return self._hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.classifier[:3](torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return x if pre_logits else self.classifier[3](x)


def _tail_adjusted(blocks: tuple[Bneck, ...], dilated: bool, reduced_tail: bool) -> tuple[Bneck, ...]:
    """The blocks with the last stage (from its stride-2 block on) dilated and/or halved in width."""
    if not (dilated or reduced_tail):
        return blocks
    start = max(i for i, b in enumerate(blocks) if b.stride == 2)
    divider = 2 if reduced_tail else 1
    out = list(blocks[:start])
    for i, b in enumerate(blocks[start:]):
        # the first tail block still expands its (unreduced) input
        out.append(replace(b, expanded=b.expanded if i == 0 else b.expanded // divider,
                           out_chs=b.out_chs // divider, dilation=2 if dilated else 1))
    return tuple(out)


MODEL_CLASS = MobileNetV3
