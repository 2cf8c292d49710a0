"""VGG 11/13/16/19, with and without batch normalisation.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (2014). State-dict names match torchvision's (`features.N`,
`classifier.{0,3,6}`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import FeatureInfo, ZooModel, init_weights_torchvision

M = 0  # a max-pool in the layer list
_LAYERS = {
    11: (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),
    13: (64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),
    16: (64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M),
    19: (64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512, M),
}


@dataclass(frozen=True)
class VGGConfig:
    depth: int
    batch_norm: bool


VARIANTS: dict[str, VGGConfig] = {
    f"vgg{depth}{'_bn' if bn else ''}": VGGConfig(depth, bn) for depth in _LAYERS for bn in (False, True)
}


def vgg_features(cfg: VGGConfig, in_chans: int = 3) -> tuple[nn.Sequential, list[FeatureInfo]]:
    """The convolutional part (`features`) and its stages (one per max-pool); SSD's trunk uses it alone."""
    layers: list[nn.Module] = []
    channels, reduction = in_chans, 1
    feature_info = []
    for v in _LAYERS[cfg.depth]:
        if v == M:
            layers.append(nn.MaxPool2d(2, 2))
            reduction *= 2
            feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", channels, reduction))
            continue
        layers.append(nn.Conv2d(channels, v, 3, padding=1))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        channels = v
    return nn.Sequential(*layers), feature_info


class VGG(ZooModel):
    classifier_name = "classifier.6"
    first_conv = "features.0"

    def __init__(self, cfg: VGGConfig, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5):
        super().__init__()
        self.features, self.feature_info = vgg_features(cfg, in_chans)
        channels = self.feature_info[-1].num_chs
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.num_features = channels
        self.num_classes = num_classes
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes) if num_classes > 0 else nn.Identity(),
        )
        init_weights_torchvision(self)

    @property
    def head_hidden_size(self) -> int:
        return 4096

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        x = self.classifier[:-1](x)
        return x if pre_logits else self.classifier[-1](x)


MODEL_CLASS = VGG
