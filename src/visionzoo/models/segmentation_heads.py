"""Semantic-segmentation heads: per-pixel class scores from backbone feature maps.

- FCN: Long et al., "Fully Convolutional Networks for Semantic Segmentation" (2015), the
  simple head torchvision puts on a dilated ResNet (a 3x3 convolution to a quarter of the
  channels, then a 1x1 classifier); also the auxiliary head of the FCN and DeepLabV3 models.
- DeepLabV3: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation"
  (2017): Atrous Spatial Pyramid Pooling (a 1x1 branch, three dilated 3x3 branches and an
  image-pooling branch, concatenated and projected) before the classifier.
- LR-ASPP: Howard et al., "Searching for MobileNetV3" (2019): a lite head that gates the
  high-level features with their global average (a sigmoid attention) and adds a classifier
  of low-level (stride 8) features.

Heads return logits at the resolution of their input features; the model upsamples them.
Submodule names follow torchvision's, so its published checkpoints load unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a score map to `size` (H, W), without corner alignment (torchvision's choice)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FCNHead(nn.Sequential):
    """3x3 conv-BN-ReLU to `in_channels // 4`, dropout 0.1, 1x1 classifier (flat: `0`...`4`)."""

    def __init__(self, in_channels: int, num_classes: int):
        hidden = in_channels // 4
        super().__init__(*ConvNormAct(in_channels, hidden, 3), nn.Dropout(0.1), nn.Conv2d(hidden, num_classes, 1))

    @property
    def class_layers(self) -> tuple[str, ...]:
        return ("4",)


class ASPPPooling(nn.Sequential):
    """Image-level features: global average, 1x1 conv-BN-ReLU, spread over the whole map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *ConvNormAct(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = super().forward(x)
        # bilinear upsampling of a 1x1 map is a broadcast (up to the last bit); expanding is free
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: parallel 1x1, dilated 3x3 and image-pooling branches,
    concatenated and projected back to `out_channels` (dropout 0.5)."""

    def __init__(self, in_channels: int, rates: Sequence[int] = (12, 24, 36), out_channels: int = 256):
        super().__init__()
        branches: list[nn.Module] = [ConvNormAct(in_channels, out_channels, 1)]
        branches += [ConvNormAct(in_channels, out_channels, 3, dilation=rate) for rate in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*ConvNormAct(len(branches) * out_channels, out_channels, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP, 3x3 conv-BN-ReLU, 1x1 classifier (flat: `0` is the ASPP, `4` the classifier)."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (12, 24, 36), width: int = 256):
        super().__init__(ASPP(in_channels, rates, width), *ConvNormAct(width, width, 3),
                         nn.Conv2d(width, num_classes, 1))

    @property
    def class_layers(self) -> tuple[str, ...]:
        return ("4",)


class LRASPPHead(nn.Module):
    """Lite R-ASPP: `high` through 1x1 conv-BN-ReLU, gated by a sigmoid of its own global
    average, upsampled to `low`'s size and classified; plus a 1x1 classifier of `low`."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, width: int = 128):
        super().__init__()
        self.cbr = ConvNormAct(high_channels, width, 1)
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, width, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(width, num_classes, 1)

    @property
    def class_layers(self) -> tuple[str, ...]:
        return ("low_classifier", "high_classifier")

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = upsample_to(self.cbr(high) * self.scale(high), low.shape[-2:])
        return self.low_classifier(low) + self.high_classifier(x)
