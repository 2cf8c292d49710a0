"""MaxViT-T.

Tu et al., "MaxViT: Multi-Axis Vision Transformer" (2022). Each layer is an MBConv block
followed by two attention layers over fixed-size partitions of the map: "window"
attention inside local P x P windows and "grid" attention across a sparse P x P grid
spanning the whole map. Both use a learned relative-position bias.

State-dict names follow torchvision's `MaxVit` (`stem`, `blocks.B.layers.L.layers.MBconv`,
`window_attention`, `grid_attention`, `classifier`). Every stage's map must divide into
P x P partitions (P = 7), which the model checks for each input (`InputError`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import InputError
from .base import FeatureInfo, ZooModel
from .layers import ConvNormAct, SqueezeExcitation, StochasticDepth, attention, relative_position_index


@dataclass(frozen=True)
class MaxViTConfig:
    stem_channels: int
    block_channels: tuple[int, ...]
    block_layers: tuple[int, ...]
    head_dim: int = 32
    partition_size: int = 7
    stochastic_depth: float = 0.2
    expansion_ratio: int = 4
    squeeze_ratio: float = 0.25
    mlp_ratio: int = 4


VARIANTS: dict[str, MaxViTConfig] = {
    "maxvit_t": MaxViTConfig(64, (64, 128, 256, 512), (2, 2, 5, 2)),
}

# the published weights were trained with TensorFlow's batch-norm settings
_BatchNorm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Pre-norm inverted residual with squeeze-excitation; a strided one downsamples the
    shortcut by 3x3 average pooling and a 1x1 convolution."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: MaxViTConfig, drop_prob: float):
        super().__init__()
        if stride != 1 or in_chs != out_chs:
            proj: list[nn.Module] = [nn.Conv2d(in_chs, out_chs, 1)]
            if stride == 2:
                proj.insert(0, nn.AvgPool2d(3, stride=2, padding=1))
            self.proj: nn.Module = nn.Sequential(*proj)
        else:
            self.proj = nn.Identity()
        mid = int(out_chs * cfg.expansion_ratio)
        self.stochastic_depth = StochasticDepth(drop_prob) if drop_prob else nn.Identity()
        self.layers = nn.Sequential(OrderedDict(
            pre_norm=_BatchNorm(in_chs),
            conv_a=ConvNormAct(in_chs, mid, 1, norm_layer=_BatchNorm, act_layer=nn.GELU),
            conv_b=ConvNormAct(mid, mid, 3, stride, groups=mid, norm_layer=_BatchNorm, act_layer=nn.GELU),
            squeeze_excitation=SqueezeExcitation(mid, int(out_chs * cfg.squeeze_ratio), act_layer=nn.SiLU),
            conv_c=nn.Conv2d(mid, out_chs, 1),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.stochastic_depth(self.layers(x))


class RelativePositionalMultiHeadAttention(nn.Module):
    """Self-attention over the P*P tokens of each partition, plus a learned relative-position bias."""

    relative_position_index: torch.Tensor  # a computed buffer

    def __init__(self, dim: int, head_dim: int, partition_size: int, fused: bool = True):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"channels {dim} are not divisible by head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.size = partition_size
        self.fused = fused
        self.to_qkv = nn.Linear(dim, 3 * dim)
        # 1/sqrt(channels), not 1/sqrt(head_dim): what the published weights were trained with
        self.scale = dim ** -0.5
        self.merge = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * partition_size - 1) ** 2, self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        n = partition_size ** 2
        self.register_buffer("relative_position_index", torch.empty(n, n, dtype=torch.long))
        self.init_computed_buffers()

    @torch.no_grad()
    def init_computed_buffers(self) -> None:
        """Compute the index buffer from the partition size, on the buffer's current device."""
        index = self.relative_position_index
        self.relative_position_index = relative_position_index(self.size, self.size).to(index.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, n, c = x.shape  # batch, partitions, tokens per partition, channels
        qkv = self.to_qkv(x).view(b, g, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, G, heads, N, head_dim)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        out = attention(q, k, v, bias, scale=self.scale, fused=self.fused)
        return self.merge(out.transpose(2, 3).reshape(b, g, n, c))


def _partition(x: torch.Tensor, p: int, grid: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, groups, P*P, C). Window: each group is a P x P block of neighbours.
    Grid: each group is P x P pixels spaced (H/P, W/P) apart, one from every block."""
    b, c, h, w = x.shape
    if grid:  # position (i * H/P + r, j * W/P + s): group (r, s), token (i, j)
        x = x.view(b, c, p, h // p, p, w // p).permute(0, 3, 5, 2, 4, 1)
    else:  # position (r * P + i, s * P + j): group (r, s), token (i, j)
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, -1, p * p, c)


def _departition(x: torch.Tensor, p: int, grid: bool, h: int, w: int) -> torch.Tensor:
    b, _, _, c = x.shape
    if grid:
        x = x.view(b, h // p, w // p, p, p, c).permute(0, 5, 3, 1, 4, 2)
    else:
        x = x.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)


class PartitionAttentionLayer(nn.Module):
    """Pre-norm attention and MLP over window or grid partitions of an NCHW map."""

    def __init__(self, dim: int, cfg: MaxViTConfig, grid: bool, drop_prob: float, fused: bool,
                 attention_dropout: float = 0.0, mlp_dropout: float = 0.0):
        super().__init__()
        self.grid = grid
        self.partition_size = cfg.partition_size
        self.attn_layer = nn.Sequential(
            nn.LayerNorm(dim),
            RelativePositionalMultiHeadAttention(dim, cfg.head_dim, cfg.partition_size, fused),
            nn.Dropout(attention_dropout),
        )
        self.mlp_layer = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim * cfg.mlp_ratio), nn.GELU(),
            nn.Linear(dim * cfg.mlp_ratio, dim), nn.Dropout(mlp_dropout),
        )
        self.stochastic_dropout = StochasticDepth(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = _partition(x, self.partition_size, self.grid)
        x = x + self.stochastic_dropout(self.attn_layer(x))
        x = x + self.stochastic_dropout(self.mlp_layer(x))
        return _departition(x, self.partition_size, self.grid, h, w)


class MaxViTLayer(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: MaxViTConfig, drop_prob: float,
                 fused: bool, attention_dropout: float, mlp_dropout: float):
        super().__init__()
        attn = partial(PartitionAttentionLayer, out_chs, cfg, drop_prob=drop_prob, fused=fused,
                       attention_dropout=attention_dropout, mlp_dropout=mlp_dropout)
        self.layers = nn.Sequential(OrderedDict(
            MBconv=MBConv(in_chs, out_chs, stride, cfg, drop_prob),
            window_attention=attn(grid=False),
            grid_attention=attn(grid=True),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MaxViTBlock(nn.Module):
    """One stage: layers of which the first halves the resolution."""

    def __init__(self, in_chs: int, out_chs: int, num_layers: int, cfg: MaxViTConfig, drop_probs: list[float],
                 fused: bool, attention_dropout: float, mlp_dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            MaxViTLayer(in_chs if i == 0 else out_chs, out_chs, 2 if i == 0 else 1, cfg, drop_probs[i], fused,
                        attention_dropout, mlp_dropout)
            for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MaxViT(ZooModel):
    """`forward_features` returns the last stage's map (B, C, H/32, W/32); the head pools,
    normalises and applies Linear-Tanh (the pre-logits) before the final bias-free Linear."""

    classifier_name = "classifier.5"
    first_conv = "stem.0.0"

    def __init__(self, cfg: MaxViTConfig, num_classes: int = 1000, in_chans: int = 3,
                 stochastic_depth: float | None = None, attention_dropout: float = 0.0, mlp_dropout: float = 0.0,
                 fused_attention: bool = True):
        super().__init__()
        self.partition_size = cfg.partition_size
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, cfg.stem_channels, 3, 2, norm_layer=_BatchNorm, act_layer=nn.GELU),
            ConvNormAct(cfg.stem_channels, cfg.stem_channels, 3, 1, norm_layer=None, act_layer=None, bias=True),
        )
        sd = cfg.stochastic_depth if stochastic_depth is None else stochastic_depth
        total = sum(cfg.block_layers)
        probs = [sd * i / (total - 1) for i in range(total)]
        self.feature_info = [FeatureInfo("stem", cfg.stem_channels, 2)]
        blocks, start, in_chs = [], 0, cfg.stem_channels
        for i, (out_chs, n) in enumerate(zip(cfg.block_channels, cfg.block_layers, strict=True)):
            blocks.append(MaxViTBlock(in_chs, out_chs, n, cfg, probs[start:start + n], fused_attention,
                                      attention_dropout, mlp_dropout))
            self.feature_info.append(FeatureInfo(f"blocks.{i}", out_chs, 2 ** (i + 2)))
            start, in_chs = start + n, out_chs
        self.blocks = nn.ModuleList(blocks)
        self.num_features = in_chs
        self.num_classes = num_classes
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(in_chs), nn.Linear(in_chs, in_chs), nn.Tanh(),
            self._new_classifier(num_classes) if num_classes > 0 else nn.Identity(),
        )
        self._init_weights()

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes, bias=False)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_input(self, height: int, width: int) -> None:
        p, h, w = self.partition_size, height, width
        bad = []
        for i in range(len(self.blocks) + 1):  # the stem and every block halve (3x3, stride 2, padding 1)
            h, w = (h + 1) // 2, (w + 1) // 2
            if i > 0 and (h % p or w % p):
                bad.append(f"{h}x{w}")
        if bad:
            step = p * 2 ** (len(self.blocks) + 1)
            raise InputError(f"MaxViT's stage maps must divide into {p}x{p} partitions, but a {height}x{width} "
                             f"input gives {', '.join(bad)}; use height and width that are multiples of {step} "
                             f"(e.g. {max(1, round(height / step)) * step}x{max(1, round(width / step)) * step})")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(*x.shape[-2:])
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.classifier[:5](x)
        return x if pre_logits else self.classifier[5](x)


MODEL_CLASS = MaxViT
