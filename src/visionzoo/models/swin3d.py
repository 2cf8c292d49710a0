"""Video Swin Transformer T/S/B.

Liu et al., "Video Swin Transformer" (2022): the Swin Transformer of `swin_transformer.py`
with 3-D (time, height, width) windows, a 2x4x4 patch embedding, and patch merging over
height and width only. It reuses the image model's blocks, patch merging and window
machinery; two behaviours are the video reference's own (`ShiftedWindowAttention3d`): a window
longer than the map along a side shrinks to it (instead of the map being padded), and the
relative-position bias of a shrunk window is the top-left block of the full window's.

State-dict names follow torchvision's `SwinTransformer3d` (`patch_embed.proj`,
`features.S.B.attn.qkv`, ...). Any clip size works: the patch embedding pads the clip to whole
patches and each stage pads its map to whole windows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..enums import Task
from .base import FeatureInfo, ZooModel
from .layers import check_clip, relative_position_index
from .swin_transformer import PatchMerging, ShiftedWindowAttention, SwinBlock

THW = tuple[int, int, int]


@dataclass(frozen=True)
class Swin3dConfig:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: THW = (8, 7, 7)
    patch_size: THW = (2, 4, 4)
    stochastic_depth_prob: float = 0.1  # of the last block, linear from 0
    mlp_ratio: float = 4.0


VARIANTS: dict[str, Swin3dConfig] = {
    "swin3d_t": Swin3dConfig(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin3d_s": Swin3dConfig(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin3d_b": Swin3dConfig(128, (2, 2, 18, 2), (4, 8, 16, 32)),
}


class ShiftedWindowAttention3d(ShiftedWindowAttention):
    """Shifted-window attention over (B, T, H, W, C) maps, with the video reference's window fitting;
    the relative-position index is stored square, (N, N), as torchvision stores it for video."""

    def __init__(self, dim: int, window_size: THW, shift_size: THW, num_heads: int, attention_dropout: float = 0.0,
                 dropout: float = 0.0, fused: bool = True):
        super().__init__(dim, window_size, shift_size, num_heads, False, attention_dropout, dropout, fused)

    @torch.no_grad()
    def init_computed_buffers(self) -> None:
        index = self.relative_position_index
        self.relative_position_index = relative_position_index(*self.window_size).to(index.device)

    def fit_window(self, sides: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A side no longer than the window is one whole window, unshifted and unpadded."""
        fits = [s <= w for s, w in zip(sides, self.window_size, strict=True)]
        window = tuple(s if fit else w for s, w, fit in zip(sides, self.window_size, fits, strict=True))
        shift = tuple(0 if fit else sh for sh, fit in zip(self.shift_size, fits, strict=True))
        return window, shift


class PatchEmbed3d(nn.Module):
    """Non-overlapping space-time patches -> channels-last tokens (B, T', H', W', C), LayerNorm'd.
    The clip is zero-padded (end of each side) to whole patches."""

    def __init__(self, patch_size: THW, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [(p - s % p) % p for s, p in zip(x.shape[2:], self.patch_size, strict=True)]
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class SwinTransformer3d(ZooModel):
    """`features` alternates stages (even indices, channels-last outputs) and patch merging;
    `forward_features` returns the normalised last map as (B, C, T, H, W)."""

    task: ClassVar[Task] = Task.VIDEO
    classifier_name = "head"
    first_conv = "patch_embed.proj"

    def __init__(self, cfg: Swin3dConfig, num_classes: int = 400, dropout: float = 0.0,
                 attention_dropout: float = 0.0, stochastic_depth_prob: float | None = None, in_chans: int = 3,
                 fused_attention: bool = True):
        super().__init__()
        sd = cfg.stochastic_depth_prob if stochastic_depth_prob is None else stochastic_depth_prob
        self.patch_embed = PatchEmbed3d(cfg.patch_size, in_chans, cfg.embed_dim)
        self.pos_drop = nn.Dropout(dropout)
        layers: list[nn.Module] = []
        total, block_id = sum(cfg.depths), 0
        self.feature_info = []
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
            dim = cfg.embed_dim * 2 ** i
            blocks = []
            for j in range(depth):
                wt, wh, ww = cfg.window_size
                shift: THW = (0, 0, 0) if j % 2 == 0 else (wt // 2, wh // 2, ww // 2)
                attn = ShiftedWindowAttention3d(dim, cfg.window_size, shift, heads, attention_dropout, dropout,
                                                fused_attention)
                blocks.append(SwinBlock(dim, attn, cfg.mlp_ratio, False, sd * block_id / (total - 1), dropout))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", dim, cfg.patch_size[1] * 2 ** i))
            if i < len(cfg.depths) - 1:
                layers.append(PatchMerging(dim, v2=False))
        self.features = nn.Sequential(*layers)
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_clip(x, self.arch or type(self).__name__)
        x = self.features(self.pos_drop(self.patch_embed(x)))
        return self.norm(x).permute(0, 4, 1, 2, 3)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.head(x)

    def format_stage_output(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """Stages work channels-last: (B, T, H, W, C) -> (B, C, T, H, W)."""
        return output.permute(0, 4, 1, 2, 3)


MODEL_CLASS = SwinTransformer3d
