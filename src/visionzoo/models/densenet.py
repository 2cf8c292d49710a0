"""DenseNet-121/161/169/201.

Huang et al., "Densely Connected Convolutional Networks" (2016). Each layer of a dense
block sees the concatenation of all earlier outputs of the block; transitions halve
the channels and the resolution. State-dict names match torchvision's current layout
(`features.denseblockB.denselayerL.norm1`); the published files use the older names
(`...norm.1`), which `weights.remap`'s `densenet_legacy` layout renames.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from .base import FeatureInfo, ZooModel


@dataclass(frozen=True)
class DenseNetConfig:
    growth_rate: int  # channels each layer adds
    block_config: tuple[int, int, int, int]  # layers per dense block
    num_init_features: int  # channels of the stem
    bn_size: int = 4  # bottleneck width, in multiples of growth_rate


VARIANTS: dict[str, DenseNetConfig] = {
    "densenet121": DenseNetConfig(32, (6, 12, 24, 16), 64),
    "densenet161": DenseNetConfig(48, (6, 12, 36, 24), 96),
    "densenet169": DenseNetConfig(32, (6, 12, 32, 32), 64),
    "densenet201": DenseNetConfig(32, (6, 12, 48, 32), 64),
}


class DenseLayer(nn.Module):
    def __init__(self, in_chs: int, growth_rate: int, bn_size: int, drop_rate: float, memory_efficient: bool):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient

    def _bottleneck(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and self.training and any(t.requires_grad for t in inputs):
            # recompute the concatenation in backward instead of keeping one per layer
            out = cp.checkpoint(self._bottleneck, *inputs, use_reentrant=False)
        else:
            out = self._bottleneck(*inputs)
        out = self.conv2(self.relu2(self.norm2(out)))
        return F.dropout(out, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else out


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, in_chs: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_chs + i * growth_rate, growth_rate, bn_size,
                                                             drop_rate, memory_efficient))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_chs)), ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(in_chs, out_chs, 1, bias=False)), ("pool", nn.AvgPool2d(2, 2)),
        ]))


class DenseNet(ZooModel):
    classifier_name = "classifier"
    first_conv = "features.conv0"

    def __init__(self, cfg: DenseNetConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 memory_efficient: bool = False):
        super().__init__()
        channels = cfg.num_init_features
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_chans, channels, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(channels)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1)),
        ]))
        self.feature_info = [FeatureInfo("features.relu0", channels, 2)]
        reduction = 4
        for i, num_layers in enumerate(cfg.block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(
                num_layers, channels, cfg.growth_rate, cfg.bn_size, drop_rate, memory_efficient))
            channels += num_layers * cfg.growth_rate
            if i < len(cfg.block_config) - 1:
                self.feature_info.append(FeatureInfo(f"features.denseblock{i + 1}", channels, reduction))
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
                reduction *= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        # not in place: a hook on norm5 (or on relu5) must see its own output unchanged
        self.features.add_module("relu5", nn.ReLU())
        self.feature_info.append(FeatureInfo("features.relu5", channels, reduction))
        self.num_features = channels
        self.num_classes = num_classes
        self.classifier = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)


MODEL_CLASS = DenseNet
