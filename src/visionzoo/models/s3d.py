"""S3D, the separable 3-D Inception network.

Xie et al., "Rethinking Spatiotemporal Feature Learning: Speed-Accuracy Trade-offs in Video
Classification" (2018). Inception-v1 (GoogLeNet) inflated to clips, with every k x k
convolution replaced by a 1 x k x k spatial and a k x 1 x 1 temporal one. State-dict names match
torchvision's `S3D` (`features.N`, `branchN`, `classifier.1`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from ..enums import Task
from ..errors import InputError
from .base import FeatureInfo, ZooModel
from .layers import ConvNormAct, check_clip

# (in, branch0, branch1 middle, branch1, branch2 middle, branch2, branch3) channels of one block
Inception = tuple[int, int, int, int, int, int, int]


@dataclass(frozen=True)
class S3DConfig:
    # the Inception blocks by resolution (strides 8, 16 and 32), as in GoogLeNet's 3a-3b, 4a-4e, 5a-5b
    stages: tuple[tuple[Inception, ...], ...]
    stem_channels: tuple[int, int, int] = (64, 64, 192)
    head_pool: tuple[int, int, int] = (2, 7, 7)  # the head's average pooling window (frames, height, width)


VARIANTS: dict[str, S3DConfig] = {
    "s3d": S3DConfig((
        ((192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64)),
        ((480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64), (512, 128, 128, 256, 24, 64, 64),
         (512, 112, 144, 288, 32, 64, 64), (528, 256, 160, 320, 32, 128, 128)),
        ((832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128)),
    )),
}

# the reference's BatchNorm settings (ported from the TensorFlow original)
NormLayer = Callable[[int], nn.Module]
_NORM: NormLayer = partial(nn.BatchNorm3d, eps=0.001, momentum=0.001)


def _conv(in_chs: int, out_chs: int, kernel: int | tuple[int, int, int] = 1, stride: int | tuple[int, int, int] = 1,
          norm_layer: NormLayer = _NORM) -> ConvNormAct:
    return ConvNormAct(in_chs, out_chs, kernel, stride, norm_layer=norm_layer, conv_layer=nn.Conv3d)


class SeparableConv3d(nn.Sequential):
    """A k x k x k convolution factorised: 1 x k x k (spatial stride), then k x 1 x 1 (temporal
    stride), each followed by BatchNorm and ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, norm_layer: NormLayer = _NORM):
        super().__init__(_conv(in_chs, out_chs, (1, kernel, kernel), (1, stride, stride), norm_layer),
                         _conv(out_chs, out_chs, (kernel, 1, 1), (stride, 1, 1), norm_layer))


class SepInception3d(nn.Module):
    """Four parallel branches concatenated: 1x1x1; 1x1x1 then separable 3x3x3 (twice, with
    different widths); 3x3x3 max pooling then 1x1x1."""

    def __init__(self, block: Inception, norm_layer: NormLayer = _NORM):
        super().__init__()
        in_chs, b0, b1_mid, b1, b2_mid, b2, b3 = block
        self.branch0 = _conv(in_chs, b0, norm_layer=norm_layer)
        self.branch1 = nn.Sequential(_conv(in_chs, b1_mid, norm_layer=norm_layer),
                                     SeparableConv3d(b1_mid, b1, 3, 1, norm_layer))
        self.branch2 = nn.Sequential(_conv(in_chs, b2_mid, norm_layer=norm_layer),
                                     SeparableConv3d(b2_mid, b2, 3, 1, norm_layer))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), _conv(in_chs, b3, norm_layer=norm_layer))
        self.out_channels = b0 + b1 + b2 + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)


class S3D(ZooModel):
    """`features` holds the stem, the Inception blocks and the poolings between them; the head
    averages 2x7x7 windows, classifies each with a 1x1x1 convolution and averages the scores."""

    task: ClassVar[Task] = Task.VIDEO
    classifier_name = "classifier.1"
    first_conv = "features.0.0.0"

    def __init__(self, cfg: S3DConfig, num_classes: int = 400, dropout: float = 0.2, in_chans: int = 3,
                 norm_layer: NormLayer | None = None):
        super().__init__()
        norm = _NORM if norm_layer is None else norm_layer
        c0, c1, c2 = cfg.stem_channels
        spatial_pool = partial(nn.MaxPool3d, (1, 3, 3), (1, 2, 2), (0, 1, 1))
        layers: list[nn.Module] = [SeparableConv3d(in_chans, c0, 7, 2, norm), spatial_pool(), _conv(c0, c1, 1, 1, norm),
                                   SeparableConv3d(c1, c2, 3, 1, norm)]
        self.feature_info = [FeatureInfo("features.0", c0, 2), FeatureInfo("features.3", c2, 4)]
        # between the stages: pool space only, then time too (3x3x3), then 2x2x2 windows
        pools = (spatial_pool, partial(nn.MaxPool3d, 3, 2, 1), partial(nn.MaxPool3d, 2, 2, 0))
        chs, reduction = c2, 4
        for pool, blocks in zip(pools, cfg.stages, strict=True):
            layers.append(pool())
            reduction *= 2
            for block in blocks:
                if block[0] != chs:
                    raise ValueError(f"S3D block {block} takes {block[0]} channels, the previous one gives {chs}")
                inception = SepInception3d(block, norm)
                layers.append(inception)
                chs = inception.out_channels
            self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", chs, reduction))
        self.features = nn.Sequential(*layers)
        self.head_pool = cfg.head_pool
        self.avgpool = nn.AvgPool3d(cfg.head_pool, stride=1)
        self.num_features = chs
        self.num_classes = num_classes
        self.classifier = nn.Sequential(nn.Dropout(dropout), self._new_classifier(num_classes) if num_classes > 0
                                        else nn.Identity())

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Conv3d(self.num_features, num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_clip(x, self.arch or type(self).__name__)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if any(s < k for s, k in zip(x.shape[2:], self.head_pool, strict=True)):
            t, h, w = self.head_pool
            # the last map has ceil(T / 4) // 2 frames and ceil(H / 16) // 2 rows and columns
            raise InputError(f"{self.arch or 'S3D'}'s head pools {t}x{h}x{w} windows of its last feature map, which is "
                             f"{'x'.join(map(str, x.shape[2:]))} here; give clips of at least {8 * t - 3} frames "
                             f"of {32 * h - 15}x{32 * w - 15} pixels (the weights were trained on 16 of 224x224)")
        x = self.avgpool(x)
        if pre_logits:
            return x.mean(dim=(2, 3, 4))
        # classify every pooled window, then average the scores (the reference's order)
        return self.classifier(x).mean(dim=(2, 3, 4))


MODEL_CLASS = S3D
