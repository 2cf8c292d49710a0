"""AlexNet (the one-GPU variant torchvision publishes).

Krizhevsky, "One weird trick for parallelizing convolutional neural networks" (2014).
State-dict names match torchvision's (`features.N`, `classifier.{1,4,6}`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import FeatureInfo, ZooModel


@dataclass(frozen=True)
class AlexNetConfig:
    pass


VARIANTS = {"alexnet": AlexNetConfig()}


class AlexNet(ZooModel):
    classifier_name = "classifier.6"
    first_conv = "features.0"

    def __init__(self, cfg: AlexNetConfig = AlexNetConfig(), num_classes: int = 1000, in_chans: int = 3,
                 dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.feature_info = [FeatureInfo("features.1", 64, 4), FeatureInfo("features.4", 192, 8),
                             FeatureInfo("features.11", 256, 16), FeatureInfo("features.12", 256, 32)]
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.num_features = 256
        self.num_classes = num_classes
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes) if num_classes > 0 else nn.Identity(),
        )

    @property
    def head_hidden_size(self) -> int:
        return 4096

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        x = self.classifier[:-1](x)
        return x if pre_logits else self.classifier[-1](x)


MODEL_CLASS = AlexNet
