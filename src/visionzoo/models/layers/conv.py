"""Convolution blocks: conv-norm-activation and TensorFlow-style "SAME" padding."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping more than 10%.

    The rule of the MobileNet/EfficientNet papers (and of the published checkpoints).
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class Conv2dSame(nn.Conv2d):
    """A Conv2d with TensorFlow's "SAME" padding, computed from the actual input size.

    TF pads so that `out = ceil(in / stride)`, putting the odd pixel at the bottom/right.
    That differs from PyTorch's symmetric padding only for strided convolutions, and
    depends on the input size, so it is computed in `forward`, with arithmetic that the ONNX
    tracer records (sizes are tensors there) and torch.export keeps symbolic: an exported graph
    pads each input size as eager PyTorch does, not as the traced size needed.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    @staticmethod
    def _pad_amount(size, kernel: int, stride: int, dilation: int):
        """Total padding of one axis; `size` is an int, a traced size (a tensor) or a symbolic int."""
        total = ((size + stride - 1) // stride - 1) * stride + (kernel - 1) * dilation + 1 - size  # ceil division
        if isinstance(total, torch.Tensor):
            return total.clamp(min=0)
        return torch.sym_max(total, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = self._pad_amount(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = self._pad_amount(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if not (isinstance(pad_h, int) and isinstance(pad_w, int)) or pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def same_padding_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                      groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A convolution with TF "SAME" padding; static (and export-friendly) when stride is 1."""
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, 1, (kernel_size - 1) // 2,
                         groups=groups, bias=bias)
    return Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation, named `0`, `1`, `2` like torchvision's Conv2dNormActivation
    (and Conv3dNormActivation with `conv_layer=nn.Conv3d`), so checkpoints that use that block
    load unchanged. Sizes are an int or one value per spatial dimension."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...] = 3,
                 stride: int | tuple[int, ...] = 1, groups: int = 1,
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] | None = nn.ReLU, padding: int | tuple[int, ...] | None = None,
                 same_padding: bool = False, bias: bool | None = None, dilation: int | tuple[int, ...] = 1,
                 conv_layer: Callable[..., nn.Conv2d | nn.Conv3d] = nn.Conv2d):
        bias = norm_layer is None if bias is None else bias
        conv: nn.Conv2d | nn.Conv3d
        if same_padding:
            if conv_layer is not nn.Conv2d or not isinstance(kernel_size, int) or not isinstance(stride, int):
                raise ValueError("same_padding needs a Conv2d with an int kernel size and stride")
            conv = same_padding_conv(in_channels, out_channels, kernel_size, stride, groups, bias)
        else:
            if padding is None:
                padding = _centred_padding(kernel_size, dilation)
            conv = conv_layer(in_channels, out_channels, kernel_size, stride, padding,
                              dilation=dilation, groups=groups, bias=bias)
        layers: list[nn.Module] = [conv]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if act_layer is not None:
            layers.append(act_layer(inplace=True) if _accepts_inplace(act_layer) else act_layer())
        super().__init__(*layers)
        self.out_channels = out_channels


def _centred_padding(kernel_size: int | tuple[int, ...], dilation: int | tuple[int, ...]) -> int | tuple[int, ...]:
    """The padding that keeps a stride-1 convolution's output the size of its input (odd kernels)."""
    if isinstance(kernel_size, int) and isinstance(dilation, int):
        return (kernel_size - 1) // 2 * dilation
    sides = len(kernel_size) if isinstance(kernel_size, tuple) else len(dilation) if isinstance(dilation, tuple) else 1
    kernels = (kernel_size,) * sides if isinstance(kernel_size, int) else kernel_size
    dilations = (dilation,) * sides if isinstance(dilation, int) else dilation
    return tuple((k - 1) // 2 * d for k, d in zip(kernels, dilations, strict=True))


def _accepts_inplace(act_layer: Callable[..., nn.Module]) -> bool:
    return act_layer in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU)
