"""Squeeze-and-excitation (Hu et al., 2017), named like torchvision's (`fc1`, `fc2`)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze_channels: int,
                 act_layer: Callable[..., nn.Module] = nn.ReLU,
                 gate_layer: Callable[..., nn.Module] = nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = act_layer()
        self.scale_activation = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return x * scale
