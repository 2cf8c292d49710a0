"""Blocks shared by GoogLeNet and Inception v3 (Szegedy et al., 2014 and 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as trained) -> ReLU, named `conv` and `bn`."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def transform_input(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation -> the `(x - 0.5) / 0.5` one.

    torchvision's GoogLeNet and Inception v3 weights were trained (ported) on inputs in
    [-1, 1]; with `transform_input=True` the models take the usual ImageNet-normalised
    input and convert it here, so the published preprocessing stays the same for all.
    """
    scale = x.new_tensor([s / 0.5 for s in _IMAGENET_STD]).view(1, 3, 1, 1)
    shift = x.new_tensor([(m - 0.5) / 0.5 for m in _IMAGENET_MEAN]).view(1, 3, 1, 1)
    return x * scale + shift
