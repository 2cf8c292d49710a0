"""MNASNet 0.5, 0.75, 1.0 and 1.3.

Tan et al., "MnasNet: Platform-Aware Neural Architecture Search for Mobile" (2018),
the B1 network without squeeze-excitation, with every width (stem included, as in
torchvision's second version of the model) scaled by the depth multiplier `alpha`.
State-dict names match torchvision's flat `layers.N` sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import FeatureInfo, ZooModel
from .layers import make_divisible

# Keras' default BatchNorm momentum (0.9997 decay) under PyTorch's convention
_BN_MOMENTUM = 1 - 0.9997
_BASE_WIDTHS = (32, 16, 24, 40, 80, 96, 192, 320)  # stem, separable conv, then one per stack
# (kernel, first stride, expansion, repeats) of the six stacks of inverted residuals
_STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))


@dataclass(frozen=True)
class MNASNetConfig:
    alpha: float  # width multiplier


VARIANTS: dict[str, MNASNetConfig] = {
    "mnasnet0_5": MNASNetConfig(0.5),
    "mnasnet0_75": MNASNetConfig(0.75),
    "mnasnet1_0": MNASNetConfig(1.0),
    "mnasnet1_3": MNASNetConfig(1.3),
}


class InvertedResidual(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = in_chs * expansion
        self.apply_residual = in_chs == out_chs and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(in_chs, mid, 1, bias=False), nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs, momentum=_BN_MOMENTUM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + x if self.apply_residual else self.layers(x)


class MNASNet(ZooModel):
    classifier_name = "classifier.1"
    first_conv = "layers.0"

    def __init__(self, cfg: MNASNetConfig, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.2):
        super().__init__()
        widths = [make_divisible(w * cfg.alpha) for w in _BASE_WIDTHS]
        stem, sep = widths[0], widths[1]
        layers: list[nn.Module] = [
            nn.Conv2d(in_chans, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, 1, 1, groups=stem, bias=False), nn.BatchNorm2d(stem, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, sep, 1, bias=False), nn.BatchNorm2d(sep, momentum=_BN_MOMENTUM),
        ]
        self.feature_info = []
        channels, reduction = sep, 2
        for (kernel, stride, expansion, repeats), out in zip(_STACKS, widths[2:], strict=True):
            if stride == 2:  # a stage ends where the next downsampling begins
                self.feature_info.append(FeatureInfo(f"layers.{len(layers) - 1}", channels, reduction))
                reduction *= 2
            layers.append(nn.Sequential(*[
                InvertedResidual(channels if i == 0 else out, out, kernel, stride if i == 0 else 1, expansion)
                for i in range(repeats)
            ]))
            channels = out
        layers += [nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280, momentum=_BN_MOMENTUM),
                   nn.ReLU(inplace=True)]
        self.feature_info.append(FeatureInfo(f"layers.{len(layers) - 1}", 1280, reduction))
        self.layers = nn.Sequential(*layers)
        self.num_features = 1280
        self.num_classes = num_classes
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True),
                                        self._new_classifier(num_classes) if num_classes > 0 else nn.Identity())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        fc = nn.Linear(self.num_features, num_classes)
        nn.init.kaiming_uniform_(fc.weight, mode="fan_out", nonlinearity="sigmoid")
        nn.init.zeros_(fc.bias)
        return fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.classifier(x)


MODEL_CLASS = MNASNet
