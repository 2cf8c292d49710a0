"""Inception v3.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (2015):
factorised convolutions (5x5 as two 3x3, nxn as 1xn then nx1), grid reductions by
parallel strided branches, batch-normalised auxiliary classifier. Designed for 299x299
inputs (the stem uses unpadded convolutions, so inputs must be at least 75x75).
State-dict names match torchvision's (`Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, `AuxLogits`).

The auxiliary classifier (after `Mixed_6e`) is part of the published weights and is
kept by default (`aux_logits=True`). `forward` returns only the main logits, in
training too; a training loop that wants the auxiliary loss calls
`forward_with_aux(x)`, which returns `(logits, (aux_logits,))` (it needs inputs of
about 299x299: the head pools 17x17 maps). With `aux_logits=False` the head is not
built and `adapt_state_dict` drops `AuxLogits.*` from a checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import FeatureInfo, ZooModel
from .layers import BasicConv2d, transform_input

log = logging.getLogger("visionzoo")


class InceptionA(nn.Module):
    """35x35 grid: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool -> 1x1."""

    def __init__(self, in_chs: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_chs, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_chs, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_chs, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_chs, pool_features, 1)
        self.out_chs = 64 + 64 + 96 + pool_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(F.avg_pool2d(x, 3, 1, 1)),
        ], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: strided 3x3 | 1x1 -> 3x3 -> strided 3x3 | max-pool."""

    def __init__(self, in_chs: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_chs, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_chs, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)
        self.out_chs = 384 + 96 + in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, 2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 grid with 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, in_chs: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(in_chs, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_chs, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_chs, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_chs, 192, 1)
        self.out_chs = 4 * 192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1 -> strided 3x3 | 1x1 -> 1x7 -> 7x1 -> strided 3x3 | max-pool."""

    def __init__(self, in_chs: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_chs, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_chs, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)
        self.out_chs = 320 + 192 + in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """8x8 grid with the 3x3 outputs split into parallel 1x3 and 3x1 convolutions."""

    def __init__(self, in_chs: int):
        super().__init__()
        row, col = {"kernel_size": (1, 3), "padding": (0, 1)}, {"kernel_size": (3, 1), "padding": (1, 0)}
        self.branch1x1 = BasicConv2d(in_chs, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_chs, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(in_chs, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(in_chs, 192, 1)
        self.out_chs = 320 + 2 * 384 + 2 * 384 + 192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(F.avg_pool2d(x, 3, 1, 1)),
        ], 1)


class InceptionAux(nn.Module):
    def __init__(self, in_chs: int, num_classes: int):
        super().__init__()
        self.conv0 = BasicConv2d(in_chs, 128, 1)
        self.conv1 = BasicConv2d(128, 768, 5)
        self.fc = nn.Linear(768, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.conv0(F.avg_pool2d(x, 5, 3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass(frozen=True)
class InceptionV3Config:
    mixed_5_pool: tuple[int, int, int] = (32, 64, 64)  # pool-branch widths of Mixed_5b/c/d
    mixed_6_7x7: tuple[int, int, int, int] = (128, 160, 160, 192)  # 7x7-branch widths of Mixed_6b-e


VARIANTS: dict[str, InceptionV3Config] = {"inception_v3": InceptionV3Config()}


class InceptionV3(ZooModel):
    classifier_name = "fc"
    first_conv = "Conv2d_1a_3x3.conv"
    # blocks added by name in __init__ that are used by attribute
    Mixed_5d: InceptionA
    Mixed_6e: InceptionC
    Mixed_7a: InceptionD
    Mixed_7b: InceptionE
    Mixed_7c: InceptionE

    def __init__(self, cfg: InceptionV3Config = InceptionV3Config(), num_classes: int = 1000, in_chans: int = 3,
                 aux_logits: bool = True, transform_input: bool = False, init_weights: bool = True,
                 dropout: float = 0.5):
        super().__init__()
        if transform_input and in_chans != 3:
            raise InputError(f"transform_input converts 3-channel ImageNet inputs; got in_chans={in_chans}, "
                             f"pass transform_input=False")
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.Conv2d_1a_3x3 = BasicConv2d(in_chans, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, 2)
        channels = 192
        for suffix, pool in zip("bcd", cfg.mixed_5_pool, strict=True):
            channels = self._add(f"Mixed_5{suffix}", InceptionA(channels, pool))
        channels = self._add("Mixed_6a", InceptionB(channels))
        for suffix, c7 in zip("bcde", cfg.mixed_6_7x7, strict=True):
            channels = self._add(f"Mixed_6{suffix}", InceptionC(channels, c7))
        self.AuxLogits = InceptionAux(channels, num_classes) if aux_logits else None
        channels = self._add("Mixed_7a", InceptionD(channels))
        channels = self._add("Mixed_7b", InceptionE(channels))
        channels = self._add("Mixed_7c", InceptionE(channels))
        # nominal reductions: the unpadded stem makes the real ones a little larger (299 -> 8x8 at the end)
        self.feature_info = [FeatureInfo("Conv2d_2b_3x3", 64, 2), FeatureInfo("Conv2d_4a_3x3", 192, 4),
                             FeatureInfo("Mixed_5d", self.Mixed_5d.out_chs, 8),
                             FeatureInfo("Mixed_6e", self.Mixed_6e.out_chs, 16),
                             FeatureInfo("Mixed_7c", channels, 32)]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.num_features = channels
        self.num_classes = num_classes
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        if init_weights:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=_init_std(self, m), a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def _add(self, name: str, module: InceptionA | InceptionB | InceptionC | InceptionD | InceptionE) -> int:
        self.add_module(name, module)
        return module.out_chs

    def _forward_trunk(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, tuple[torch.Tensor] | None]:
        if self.transform_input:
            x = transform_input(x)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = getattr(self, name)(x)
        aux = (self.AuxLogits(x),) if with_aux and self.AuxLogits is not None else None
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x, aux

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_trunk(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(self.dropout(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        """`(logits, (aux_logits,))`, for training with the auxiliary loss (commonly weighted 0.4)."""
        if self.AuxLogits is None:
            raise InputError("this Inception v3 has no auxiliary classifier; build it with aux_logits=True")
        features, aux = self._forward_trunk(x, with_aux=True)
        assert aux is not None  # AuxLogits exists: the trunk ran it
        return self.forward_head(features), aux

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        if self.AuxLogits is not None:  # the auxiliary head predicts the same classes
            old = self.AuxLogits.conv1.conv.weight
            fc = nn.Linear(768, num_classes) if num_classes > 0 else nn.Identity()
            self.AuxLogits.fc = fc.to(device=old.device, dtype=old.dtype)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.AuxLogits is not None:
            return state_dict
        dropped = [k for k in state_dict if k.startswith("AuxLogits.")]
        if dropped:
            log.info("inception_v3: dropped the auxiliary classifier of the checkpoint (%d tensors: AuxLogits.*); "
                     "pass aux_logits=True to keep it", len(dropped))
        return {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}


def _init_std(model: InceptionV3, m: nn.Module) -> float:
    # torchvision's init: 0.1 everywhere except the auxiliary head's 5x5 conv and classifier
    aux = model.AuxLogits
    if aux is not None and m is aux.conv1.conv:
        return 0.01
    if aux is not None and m is aux.fc:
        return 0.001
    return 0.1


MODEL_CLASS = InceptionV3
