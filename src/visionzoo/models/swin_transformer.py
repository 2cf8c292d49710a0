"""Swin Transformer T/S/B (v1) and Swin Transformer V2 T/S/B.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(2021) and "Swin Transformer V2: Scaling Up Capacity and Resolution" (2022). V2 differs
in three places, all switched by `SwinConfig.v2`: cosine attention with a learned
per-head temperature, a relative-position bias produced by a small MLP from log-spaced
coordinates, and normalisation after (not before) attention, MLP and patch merging.

State-dict names follow torchvision's `SwinTransformer` (`features.S.B.attn.qkv`, ...).
Stages work on channels-last maps (B, H, W, C). Any input whose sides are multiples of
the patch size (4) works: like torchvision, each stage pads its map to a multiple of the
window size and patch merging pads odd sizes; the relative-position index and coordinate
table are computed from the window size (`init_computed_buffers`), never from the input.
The window machinery (partition, merge, shift mask, attention) takes channels-last maps with
any number of sides: the video model (`swin3d.py`) reuses it, with the blocks and patch
merging, on (B, T, H, W, C) maps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import FeatureInfo, ZooModel
from .layers import Mlp, StochasticDepth, attention, relative_position_index


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    stochastic_depth: float
    v2: bool = False
    patch_size: int = 4
    mlp_ratio: float = 4.0


VARIANTS: dict[str, SwinConfig] = {
    "swin_t": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 0.2),
    "swin_s": SwinConfig(96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 0.3),
    "swin_b": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 0.5),
    "swin_v2_t": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), 8, 0.2, v2=True),
    "swin_v2_s": SwinConfig(96, (2, 2, 18, 2), (3, 6, 12, 24), 8, 0.3, v2=True),
    "swin_v2_b": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), 8, 0.5, v2=True),
}


def window_partition(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """(B, *sides, C) -> (B, windows, prod(window), C); every side a multiple of its window side."""
    b, *sides, c = x.shape
    n = len(window)
    x = x.view(b, *(v for s, w in zip(sides, window, strict=True) for v in (s // w, w)), c)
    order = (0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)  # window counts, then window sides
    return x.permute(order).reshape(b, -1, math.prod(window), c)


def window_merge(x: torch.Tensor, window: tuple[int, ...], sides: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `window_partition`: (B, windows, prod(window), C) -> (B, *sides, C)."""
    b, c, n = x.shape[0], x.shape[-1], len(window)
    x = x.view(b, *(s // w for s, w in zip(sides, window, strict=True)), *window, c)
    order = (0, *(v for d in range(n) for v in (1 + d, 1 + n + d)), 2 * n + 1)
    return x.permute(order).reshape(b, *sides, c)


def shift_mask(sides: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
               like: torch.Tensor) -> torch.Tensor:
    """(windows, 1, N, N) mask: -100 between tokens that the cyclic shift brought together from
    different regions of the (padded) map (the value the published weights were trained with).
    Along each side the regions are [0, s-w), [s-w, s-shift), [s-shift, s); a side that is not
    shifted is one window wide, so it is one region."""
    label = like.new_zeros(sides)
    for d, (s, w, sh) in enumerate(zip(sides, window, shift, strict=True)):
        part = like.new_zeros(s)
        part[s - w:] = 1
        part[s - sh:] = 2  # empty when the side is not shifted
        label = label * 3 + part.view((s,) + (1,) * (len(sides) - 1 - d))
    label = window_partition(label[None, ..., None], window)[0, ..., 0]  # (windows, N)
    diff = label.unsqueeze(1) - label.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0).unsqueeze(1)


class ShiftedWindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows of a channels-last map (B, *sides, C):
    2-D for images; `swin3d.py` subclasses it for (time, height, width) maps.

    `window_size` and `shift_size` are an int (a square window) or one value per side. The
    relative-position index is stored flattened, torchvision's layout for images.
    """

    relative_position_index: torch.Tensor  # computed buffers (the table only with v2)
    relative_coords_table: torch.Tensor

    def __init__(self, dim: int, window_size: int | tuple[int, ...], shift_size: int | tuple[int, ...],
                 num_heads: int, v2: bool = False, attention_dropout: float = 0.0, dropout: float = 0.0,
                 fused: bool = True):
        super().__init__()
        self.window_size = (window_size,) * 2 if isinstance(window_size, int) else tuple(window_size)
        self.shift_size = (shift_size,) * len(self.window_size) if isinstance(shift_size, int) else tuple(shift_size)
        if len(self.shift_size) != len(self.window_size):
            raise ValueError(f"window {self.window_size} and shift {self.shift_size} differ in dimensions")
        if v2 and len(self.window_size) != 2:
            raise ValueError("Swin v2 attention is defined for 2-D windows only")
        self.num_heads = num_heads
        self.v2 = v2
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        offsets = tuple(2 * w - 1 for w in self.window_size)
        if v2:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
            # continuous position bias: an MLP from (dy, dx) to one bias per head
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True),
                                         nn.Linear(512, num_heads, bias=False))
            self.register_buffer("relative_coords_table", torch.empty(1, *offsets, 2))
        else:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(math.prod(offsets), num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", torch.empty(math.prod(self.window_size) ** 2,
                                                                    dtype=torch.long))
        self.init_computed_buffers()

    @torch.no_grad()
    def init_computed_buffers(self) -> None:
        """Compute the index buffer (and v2's coordinate table) from the window size, on the
        buffers' current device and dtype."""
        index = self.relative_position_index
        self.relative_position_index = relative_position_index(*self.window_size).flatten().to(index.device)
        if self.v2:
            old = self.relative_coords_table
            # in float32 whatever the model's dtype, as the reference does before any .double()
            axes = [torch.arange(-(w - 1), w, dtype=torch.float32, device=old.device) / (w - 1) * 8
                    for w in self.window_size]
            coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)  # in [-8, 8]
            coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / 3.0
            self.relative_coords_table = coords.to(old.dtype)

    def fit_window(self, sides: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The window and shift used on a map of these sides: a window covering a whole side
        has nothing to shift into along it. Images keep the window (the map is padded to it)."""
        shift = tuple(0 if s <= w else sh for s, w, sh in zip(sides, self.window_size, self.shift_size, strict=True))
        return self.window_size, shift

    def relative_position_bias(self, window: tuple[int, ...] | None = None) -> torch.Tensor:
        """(heads, N, N) additive attention bias for the N tokens of a window. A window smaller
        than the configured one (video) takes the top-left block of the full index, as the
        reference does."""
        full = math.prod(self.window_size)
        n = full if window is None else math.prod(window)
        if self.v2:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        index = self.relative_position_index.view(full, full)[:n, :n].reshape(-1)
        bias = table[index].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias) if self.v2 else bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *sides, c = x.shape
        dims = tuple(range(1, len(sides) + 1))
        window, shift = self.fit_window(tuple(sides))
        heads, n = self.num_heads, math.prod(window)
        # pad to whole windows; the padded (zero) tokens take part in attention, as in the reference
        pads = [(w - s % w) % w for s, w in zip(sides, window, strict=True)]
        x = F.pad(x, [0, 0] + [v for p in reversed(pads) for v in (0, p)])
        padded = tuple(x.shape[1:-1])
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=dims)
        x = window_partition(x, window)  # (B, windows, N, C)
        windows = x.shape[1]

        qkv_bias: torch.Tensor = self.qkv.bias
        if self.v2:  # v2 has no key bias: the middle third is ignored
            q_b, _, v_b = qkv_bias.chunk(3)
            qkv_bias = torch.cat([q_b, torch.zeros_like(q_b), v_b])
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(b, windows, n, 3, heads, c // heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, windows, heads, N, head_dim)
        bias = self.relative_position_bias(window)
        if any(shift):
            bias = bias + shift_mask(padded, window, shift, bias)  # (windows, heads, N, N)
        if self.v2:  # cosine similarity times a learned per-head temperature (at most 100)
            temperature = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            q, k, scale = F.normalize(q, dim=-1) * temperature, F.normalize(k, dim=-1), 1.0
        else:
            scale = None
        drop = self.attention_dropout if self.training else 0.0
        x = attention(q, k, v, bias, scale=scale, dropout_p=drop, fused=self.fused)
        x = x.transpose(2, 3).reshape(b, windows, n, c)
        x = F.dropout(self.proj(x), self.dropout, self.training)

        x = window_merge(x, window, padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=dims)
        unpadded = (slice(None),) + tuple(slice(0, s) for s in sides)
        return x[unpadded].contiguous()

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}, " \
               f"v2={self.v2}, fused={self.fused}"


class SwinBlock(nn.Module):
    """Attention and MLP, each residual with stochastic depth; normalised before (v1) or
    after (v2, `post_norm`) each branch."""

    def __init__(self, dim: int, attn: ShiftedWindowAttention, mlp_ratio: float, post_norm: bool,
                 drop_prob: float, dropout: float):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.stochastic_depth = StochasticDepth(drop_prob)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.stochastic_depth(self.norm1(self.attn(x)))
            return x + self.stochastic_depth(self.norm2(self.mlp(x)))
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods of the last two sides -> one token: concatenate (4C), then LayerNorm +
    Linear to 2C (v2: Linear, then LayerNorm). Odd sides are zero-padded. Works on (B, H, W, C)
    and, merging only height and width as the video model does, on (B, T, H, W, C)."""

    def __init__(self, dim: int, v2: bool):
        super().__init__()
        self.v2 = v2
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if v2 else 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # the reference's order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]],
                      dim=-1)
        return self.norm(self.reduction(x)) if self.v2 else self.reduction(self.norm(x))


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class SwinTransformer(ZooModel):
    """Swin v1/v2. `features` alternates stages (odd indices, channels-last outputs) and patch
    merging; `forward_features` returns the normalised last map as (B, C, H, W)."""

    classifier_name = "head"
    first_conv = "features.0.0"

    def __init__(self, cfg: SwinConfig, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.0,
                 attention_dropout: float = 0.0, stochastic_depth: float | None = None,
                 fused_attention: bool = True):
        super().__init__()
        self.patch_size = cfg.patch_size
        sd = cfg.stochastic_depth if stochastic_depth is None else stochastic_depth
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size),
            Permute(0, 2, 3, 1), nn.LayerNorm(cfg.embed_dim))]
        total, block_id = sum(cfg.depths), 0
        self.feature_info = []
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
            dim = cfg.embed_dim * 2 ** i
            blocks = []
            for j in range(depth):
                shift = 0 if j % 2 == 0 else cfg.window_size // 2
                attn = ShiftedWindowAttention(dim, cfg.window_size, shift, heads, cfg.v2, attention_dropout, dropout,
                                              fused_attention)
                blocks.append(SwinBlock(dim, attn, cfg.mlp_ratio, cfg.v2, sd * block_id / (total - 1), dropout))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", dim, cfg.patch_size * 2 ** i))
            if i < len(cfg.depths) - 1:
                layers.append(PatchMerging(dim, cfg.v2))
        self.features = nn.Sequential(*layers)
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p or h < p or w < p:
            raise InputError(f"Swin needs height and width that are positive multiples of its patch size {p}, "
                             f"got {h}x{w} (the patch embedding would drop the remaining pixels); "
                             f"resize or crop to e.g. {max(p, h // p * p)}x{max(p, w // p * p)}")
        x = self.norm(self.features(x))
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.head(x)

    def format_stage_output(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """Stages work channels-last: (B, H, W, C) -> (B, C, H, W)."""
        return output.permute(0, 3, 1, 2)


MODEL_CLASS = SwinTransformer
