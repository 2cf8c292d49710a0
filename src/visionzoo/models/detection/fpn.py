"""Feature pyramid network and its extra top levels.

Lin et al., "Feature Pyramid Networks for Object Detection" (2017): 1x1 lateral convolutions
bring every backbone stage to one width, a top-down pass adds each level's nearest-upsampled
coarser neighbour, and a 3x3 convolution smooths each sum. Extra levels above the last:
`LastLevelMaxPool` (Faster R-CNN's P6, a stride-2 subsampling) and `LastLevelP6P7` (RetinaNet's
and FCOS's P6 and P7, two stride-2 convolutions). State-dict names match torchvision's
(`inner_blocks.i.0`, `layer_blocks.i.0`, `extra_blocks.p6`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvNormAct


class LastLevelMaxPool(nn.Module):
    """One more level: the last level subsampled by 2."""

    num_levels = 1

    def forward(self, results: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [*results, F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """Two more levels: P6 a stride-2 convolution of P5 (or of the backbone's last stage C5 when its
    width differs from the pyramid's), P7 a stride-2 convolution of ReLU(P6)."""

    num_levels = 2

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.use_p5 = in_channels == out_channels

    def forward(self, results: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        p6 = self.p6(results[-1] if self.use_p5 else inputs[-1])
        return [*results, p6, self.p7(F.relu(p6))]


ExtraLevels = LastLevelMaxPool | LastLevelP6P7  # the levels a pyramid may add after its last stage


class FeaturePyramidNetwork(nn.Module):
    """Pyramid of `out_channels` maps from backbone stages of `in_channels` (finest first).

    `forward(features)` takes the stage outputs finest first and returns the pyramid levels finest
    first, followed by the extra block's levels.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, extra_blocks: ExtraLevels | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.inner_blocks = nn.ModuleList(
            ConvNormAct(c, out_channels, 1, padding=0, norm_layer=norm_layer, act_layer=None) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            ConvNormAct(out_channels, out_channels, 3, norm_layer=norm_layer, act_layer=None) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.extra_blocks = extra_blocks
        self.out_channels = out_channels

    @property
    def num_levels(self) -> int:
        extra = self.extra_blocks
        extra_levels = extra.num_levels if isinstance(extra, (LastLevelMaxPool, LastLevelP6P7)) else 0
        return len(self.inner_blocks) + extra_levels

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        last_inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[idx](last_inner))
        if self.extra_blocks is not None:
            results = self.extra_blocks(results, features)
        return results
