"""Video ResNet-18s: R3D, MC3 and R(2+1)D.

Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition" (2018).
One 18-layer residual network of basic blocks over clips (N, C, T, H, W); the variants differ
only in the convolution of each stage: full 3x3x3 (R3D), 3x3x3 in the first stage and purely
spatial 1x3x3 after it (MC3, "mixed convolutions"), or factorised into 1x3x3 spatial and 3x1x1
temporal convolutions (R(2+1)D). State-dict names match torchvision's `VideoResNet`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from ..enums import Task
from .base import FeatureInfo, LinearInit, ZooModel, init_weights_torchvision
from .layers import ConvNormAct, check_clip


class ConvKind(Enum):
    FULL = "3x3x3"
    SPATIAL = "1x3x3"  # no temporal extent: a stage of MC3 that no longer mixes frames
    FACTORISED = "(2+1)d"  # 1x3x3 to a middle width, BatchNorm + ReLU, then 3x1x1


@dataclass(frozen=True)
class VideoResNetConfig:
    convs: tuple[ConvKind, ConvKind, ConvKind, ConvKind]  # the convolution of each stage
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)  # basic blocks per stage
    factorised_stem: bool = False  # R(2+1)D's stem: 1x7x7 to 45 channels, then 3x1x1 to 64


F, S, F21 = ConvKind.FULL, ConvKind.SPATIAL, ConvKind.FACTORISED
VARIANTS: dict[str, VideoResNetConfig] = {
    "r3d_18": VideoResNetConfig((F, F, F, F)),
    "mc3_18": VideoResNetConfig((F, S, S, S)),
    "r2plus1d_18": VideoResNetConfig((F21, F21, F21, F21), factorised_stem=True),
}


def make_conv(kind: ConvKind, in_chs: int, out_chs: int, mid_chs: int, stride: int) -> nn.Module:
    """A 3x3(x3) convolution of the given kind; `stride` applies to time too unless it is SPATIAL."""
    if kind is ConvKind.FULL:
        return nn.Conv3d(in_chs, out_chs, 3, stride, 1, bias=False)
    if kind is ConvKind.SPATIAL:
        return nn.Conv3d(in_chs, out_chs, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False)
    return nn.Sequential(
        nn.Conv3d(in_chs, mid_chs, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
        nn.BatchNorm3d(mid_chs), nn.ReLU(inplace=True),
        nn.Conv3d(mid_chs, out_chs, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False))


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kind: ConvKind, stride: int = 1):
        super().__init__()
        # the factorised pair's middle width that gives it the parameters of one 3x3x3 convolution
        mid = in_chs * out_chs * 27 // (in_chs * 9 + 3 * out_chs)
        self.conv1 = nn.Sequential(make_conv(kind, in_chs, out_chs, mid, stride), nn.BatchNorm3d(out_chs),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(make_conv(kind, out_chs, out_chs, mid, 1), nn.BatchNorm3d(out_chs))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            # the shortcut strides like the block's convolution: SPATIAL stages keep the frames
            t_stride = 1 if kind is ConvKind.SPATIAL else stride
            self.downsample = nn.Sequential(nn.Conv3d(in_chs, out_chs, 1, (t_stride, stride, stride), bias=False),
                                            nn.BatchNorm3d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + shortcut)


class VideoResNet(ZooModel):
    task: ClassVar[Task] = Task.VIDEO
    classifier_name = "fc"
    first_conv = "stem.0"

    def __init__(self, cfg: VideoResNetConfig, num_classes: int = 400, in_chans: int = 3):
        super().__init__()
        conv3d = partial(ConvNormAct, conv_layer=nn.Conv3d, norm_layer=nn.BatchNorm3d, bias=False)
        if cfg.factorised_stem:
            self.stem = nn.Sequential(*conv3d(in_chans, 45, (1, 7, 7), (1, 2, 2)), *conv3d(45, 64, (3, 1, 1)))
        else:
            self.stem = nn.Sequential(*conv3d(in_chans, 64, (3, 7, 7), (1, 2, 2)))
        self.feature_info = [FeatureInfo("stem", 64, 2)]
        in_chs, reduction = 64, 2
        for i, (kind, depth, out_chs) in enumerate(zip(cfg.convs, cfg.layers, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_chs if j == 0 else out_chs, out_chs, kind, stride if j == 0 else 1)
                      for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_chs, reduction = out_chs, reduction * stride
            self.feature_info.append(FeatureInfo(f"layer{i + 1}", out_chs, reduction))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.num_features = in_chs
        self.num_classes = num_classes
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        init_weights_torchvision(self, LinearInit.NORMAL)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_clip(x, self.arch or type(self).__name__)
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


MODEL_CLASS = VideoResNet
