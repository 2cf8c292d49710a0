"""ResNet, ResNeXt and Wide ResNet.

He et al., "Deep Residual Learning for Image Recognition" (2015); Xie et al.,
"Aggregated Residual Transformations" (ResNeXt, 2016); Zagoruyko & Komodakis, "Wide
Residual Networks" (2016). The "v1.5" variant torchvision publishes: the stride of a
bottleneck sits on its 3x3 convolution. State-dict names match torchvision's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import cast

import torch
from torch import nn

from .base import FeatureInfo, LinearInit, ZooModel, init_weights_torchvision


class BlockType(Enum):
    BASIC = "basic"
    BOTTLENECK = "bottleneck"


@dataclass(frozen=True)
class ResNetConfig:
    block: BlockType
    layers: tuple[int, int, int, int]  # blocks per stage
    groups: int = 1  # cardinality (ResNeXt)
    width_per_group: int = 64  # 128 for Wide ResNet


B, BN = BlockType.BASIC, BlockType.BOTTLENECK
VARIANTS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(B, (2, 2, 2, 2)),
    "resnet34": ResNetConfig(B, (3, 4, 6, 3)),
    "resnet50": ResNetConfig(BN, (3, 4, 6, 3)),
    "resnet101": ResNetConfig(BN, (3, 4, 23, 3)),
    "resnet152": ResNetConfig(BN, (3, 8, 36, 3)),
    "resnext50_32x4d": ResNetConfig(BN, (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetConfig(BN, (3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": ResNetConfig(BN, (3, 4, 23, 3), groups=64, width_per_group=4),
    "wide_resnet50_2": ResNetConfig(BN, (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetConfig(BN, (3, 4, 23, 3), width_per_group=128),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        if dilation > 1:
            raise ValueError("BasicBlock does not support dilation (replace_stride_with_dilation needs ResNet-50+)")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation=dilation, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


_BLOCKS: dict[BlockType, type[BasicBlock] | type[Bottleneck]] = {BlockType.BASIC: BasicBlock,
                                                                BlockType.BOTTLENECK: Bottleneck}


class ResNet(ZooModel):
    classifier_name = "fc"
    first_conv = "conv1"
    layer1: nn.Sequential  # the four stages, added by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, cfg: ResNetConfig, num_classes: int = 1000, in_chans: int = 3,
                 zero_init_residual: bool = False,
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        """`replace_stride_with_dilation[i]` keeps the resolution of stage i + 2 and dilates its
        convolutions instead (segmentation backbones: output stride 8 with (False, True, True));
        `norm_layer` replaces BatchNorm2d (detection backbones use FrozenBatchNorm2d)."""
        super().__init__()
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"replace_stride_with_dilation needs 3 values, got {replace_stride_with_dilation!r}")
        block = _BLOCKS[cfg.block]
        self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, dilation, reduction = 64, 1, 4
        self.feature_info = [FeatureInfo("relu", 64, 2)]
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), cfg.layers, strict=True)):
            stride = 1 if i == 0 else 2
            first_dilation = dilation
            if i > 0 and replace_stride_with_dilation[i - 1]:
                dilation, stride = dilation * stride, 1
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                        norm_layer(planes * block.expansion),
                    )
                blocks.append(block(inplanes, planes, stride if j == 0 else 1, downsample, cfg.groups,
                                    cfg.width_per_group, first_dilation if j == 0 else dilation, norm_layer))
                inplanes = planes * block.expansion
            reduction *= stride
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"layer{i + 1}", inplanes, reduction))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = inplanes
        self.num_classes = num_classes
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()

        init_weights_torchvision(self, LinearInit.DEFAULT)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(cast(torch.Tensor, m.bn3.weight))  # any norm_layer has a weight
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(cast(torch.Tensor, m.bn2.weight))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


MODEL_CLASS = ResNet
