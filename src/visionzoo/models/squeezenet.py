"""SqueezeNet 1.0 and 1.1.

Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters"
(2016). The classifier is a 1x1 convolution followed by global pooling. State-dict
names match torchvision's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .base import FeatureInfo, ZooModel

P = None  # a max-pool in the layer list


@dataclass(frozen=True)
class SqueezeNetConfig:
    stem_channels: int
    stem_kernel: int
    # Fire modules as (squeeze, expand1x1, expand3x3), `P` for a max-pool
    layers: tuple


_F = lambda s, e: (s, e, e)  # noqa: E731 - the published Fire modules expand symmetrically
VARIANTS = {
    "squeezenet1_0": SqueezeNetConfig(96, 7, (P, _F(16, 64), _F(16, 64), _F(32, 128), P, _F(32, 128),
                                              _F(48, 192), _F(48, 192), _F(64, 256), P, _F(64, 256))),
    "squeezenet1_1": SqueezeNetConfig(64, 3, (P, _F(16, 64), _F(16, 64), P, _F(32, 128), _F(32, 128), P,
                                              _F(48, 192), _F(48, 192), _F(64, 256), _F(64, 256))),
}


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(ZooModel):
    classifier_name = "classifier.1"
    first_conv = "features.0"

    def __init__(self, cfg: SqueezeNetConfig, num_classes: int = 1000, in_chans: int = 3,
                 dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, cfg.stem_channels, cfg.stem_kernel, stride=2),
                                   nn.ReLU(inplace=True)]
        channels, reduction = cfg.stem_channels, 2
        self.feature_info = [FeatureInfo("features.1", channels, 2)]
        for item in cfg.layers:
            if item is P:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                reduction *= 2
            else:
                layers.append(Fire(channels, *item))
                channels = item[1] + item[2]
        # a stage ends at the last layer before each pool after the stem's, and at the end
        pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
        ends = [i - 1 for i in pools[1:]] + [len(layers) - 1]
        for k, end in enumerate(ends):
            self.feature_info.append(FeatureInfo(f"features.{end}", _out_channels(layers[end]), 4 * 2**k))
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.num_classes = num_classes
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), self._new_classifier(num_classes) if num_classes > 0 else nn.Identity(),
            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is self.classifier[1]:  # torchvision's init
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Conv2d(self.num_features, num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # with the head removed (Identity) the classifier reduces to pooling: features are >= 0
        return torch.flatten(self.classifier[3](x) if pre_logits else self.classifier(x), 1)


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, Fire):
        return layer.expand1x1.out_channels + layer.expand3x3.out_channels
    return cast(nn.Conv2d, layer).out_channels  # the stem: a stage ends at a Fire module or the stem conv


MODEL_CLASS = SqueezeNet
