"""ConvNeXt Tiny, Small, Base and Large.

Liu et al., "A ConvNet for the 2020s" (2022): a ResNet modernised step by step toward a
vision transformer (patchify stem, 7x7 depthwise convolutions, LayerNorm, inverted
MLP with GELU, layer scale, stochastic depth). State-dict names match torchvision's
(`features.0` stem, odd `features.N` stages, even ones downsampling, `classifier.2`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeatureInfo, ZooModel
from .layers import StochasticDepth


@dataclass(frozen=True)
class ConvNeXtConfig:
    dims: tuple[int, int, int, int]  # channels of the four stages
    depths: tuple[int, int, int, int]  # blocks per stage
    stochastic_depth: float  # drop probability of the last block, linear from 0
    layer_scale: float = 1e-6  # initial value of the per-channel residual scale


VARIANTS: dict[str, ConvNeXtConfig] = {
    "convnext_tiny": ConvNeXtConfig((96, 192, 384, 768), (3, 3, 9, 3), 0.1),
    "convnext_small": ConvNeXtConfig((96, 192, 384, 768), (3, 3, 27, 3), 0.4),
    "convnext_base": ConvNeXtConfig((128, 256, 512, 1024), (3, 3, 27, 3), 0.5),
    "convnext_large": ConvNeXtConfig((192, 384, 768, 1536), (3, 3, 27, 3), 0.5),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, drop_prob: float):
        super().__init__()
        # the pointwise MLP runs channels-last, where it is a pair of Linear layers
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute((0, 2, 3, 1)), nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Permute((0, 3, 1, 2)),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.stochastic_depth = StochasticDepth(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXt(ZooModel):
    classifier_name = "classifier.2"
    first_conv = "features.0.0"

    def __init__(self, cfg: ConvNeXtConfig, num_classes: int = 1000, in_chans: int = 3,
                 stochastic_depth: float | None = None):
        super().__init__()
        drop = cfg.stochastic_depth if stochastic_depth is None else stochastic_depth
        total = sum(cfg.depths)
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_chans, cfg.dims[0], 4, 4),
                                                 LayerNorm2d(cfg.dims[0], eps=1e-6))]
        self.feature_info = []
        block_id = 0
        for i, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths, strict=True)):
            if i > 0:
                layers.append(nn.Sequential(LayerNorm2d(cfg.dims[i - 1], eps=1e-6),
                                            nn.Conv2d(cfg.dims[i - 1], dim, 2, 2)))
            blocks = []
            for _ in range(depth):
                blocks.append(CNBlock(dim, cfg.layer_scale, drop * block_id / (total - 1.0)))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", dim, 4 * 2**i))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = cfg.dims[-1]
        self.num_features = last
        self.num_classes = num_classes
        self.classifier = nn.Sequential(LayerNorm2d(last, eps=1e-6), nn.Flatten(1),
                                        nn.Linear(last, num_classes) if num_classes > 0 else nn.Identity())
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        fc = nn.Linear(self.num_features, num_classes)
        nn.init.trunc_normal_(fc.weight, std=0.02)
        nn.init.zeros_(fc.bias)
        return fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.classifier[:2](self.avgpool(x))
        return x if pre_logits else self.classifier[2](x)


MODEL_CLASS = ConvNeXt
