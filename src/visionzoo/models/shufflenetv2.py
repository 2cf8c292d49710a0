"""ShuffleNetV2 x0.5, x1.0, x1.5 and x2.0.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design"
(2018). A unit splits its channels in two, transforms one half (or, when it
downsamples, both branches see the whole input) and shuffles the concatenation.
State-dict names match torchvision's (`stageS.I.branch2.K`, `conv5`, `fc`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import FeatureInfo, ZooModel


@dataclass(frozen=True)
class ShuffleNetV2Config:
    stage_chs: tuple[int, int, int]  # output channels of stages 2-4
    last_chs: int  # channels of conv5, the last feature map
    stem_chs: int = 24
    repeats: tuple[int, int, int] = (4, 8, 4)


VARIANTS: dict[str, ShuffleNetV2Config] = {
    "shufflenet_v2_x0_5": ShuffleNetV2Config((48, 96, 192), 1024),
    "shufflenet_v2_x1_0": ShuffleNetV2Config((116, 232, 464), 1024),
    "shufflenet_v2_x1_5": ShuffleNetV2Config((176, 352, 704), 1024),
    "shufflenet_v2_x2_0": ShuffleNetV2Config((244, 488, 976), 2048),
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups, so that the next split mixes both branches."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class ShuffleUnit(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        if stride == 1 and in_chs != out_chs:
            raise ValueError("a ShuffleNetV2 unit keeps its width unless it downsamples")
        self.stride = stride
        half = out_chs // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(in_chs, stride), nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(in_chs if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            _depthwise(half, stride), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            kept, x2 = x.chunk(2, dim=1)
            out = torch.cat((kept, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(ZooModel):
    classifier_name = "fc"
    stage2: nn.Sequential  # the three stages, added by name in __init__
    stage3: nn.Sequential
    stage4: nn.Sequential
    first_conv = "conv1.0"

    def __init__(self, cfg: ShuffleNetV2Config, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        channels = cfg.stem_chs
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.feature_info = [FeatureInfo("conv1", channels, 2)]
        for i, (out, repeats) in enumerate(zip(cfg.stage_chs, cfg.repeats, strict=True)):
            units = [ShuffleUnit(channels if j == 0 else out, out, 2 if j == 0 else 1) for j in range(repeats)]
            self.add_module(f"stage{i + 2}", nn.Sequential(*units))
            self.feature_info.append(FeatureInfo(f"stage{i + 2}", out, 8 * 2**i))
            channels = out
        self.conv5 = nn.Sequential(nn.Conv2d(channels, cfg.last_chs, 1, bias=False), nn.BatchNorm2d(cfg.last_chs),
                                   nn.ReLU(inplace=True))
        # conv5 keeps stage4's resolution: the last stage is conv5, at stage4's reduction
        self.feature_info[-1] = FeatureInfo("conv5", cfg.last_chs, 32)
        self.num_features = cfg.last_chs
        self.num_classes = num_classes
        # torchvision leaves PyTorch's default initialisation in place for this family
        self.fc = nn.Linear(cfg.last_chs, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)


MODEL_CLASS = ShuffleNetV2
