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


class ShiftedWindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows of a channels-last map."""

    def __init__(self, dim: int, window_size: int, shift_size: int, num_heads: int, v2: bool,
                 attention_dropout: float = 0.0, dropout: float = 0.0, fused: bool = True):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.num_heads = num_heads
        self.v2 = v2
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        table = (2 * window_size - 1) ** 2
        if v2:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
            # continuous position bias: an MLP from (dy, dx) to one bias per head
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True),
                                         nn.Linear(512, num_heads, bias=False))
            self.register_buffer("relative_coords_table",
                                 torch.empty(1, 2 * window_size - 1, 2 * window_size - 1, 2))
        else:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", torch.empty(window_size ** 4, dtype=torch.long))
        self.init_computed_buffers()

    @torch.no_grad()
    def init_computed_buffers(self) -> None:
        """Compute the index buffer (and v2's coordinate table) from the window size, on the
        buffers' current device and dtype."""
        w = self.window_size
        index = self.relative_position_index
        self.relative_position_index = relative_position_index(w, w).flatten().to(index.device)
        if self.v2:
            old = self.relative_coords_table
            # in float32 whatever the model's dtype, as the reference does before any .double()
            offsets = torch.arange(-(w - 1), w, dtype=torch.float32, device=old.device) / (w - 1) * 8
            dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
            coords = torch.stack([dy, dx], dim=-1).unsqueeze(0)  # (1, 2w-1, 2w-1, 2), in [-8, 8]
            coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / 3.0
            self.relative_coords_table = coords.to(old.dtype)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) additive attention bias for the N = window^2 tokens of a window."""
        n = self.window_size ** 2
        if self.v2:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias) if self.v2 else bias

    def _shift_mask(self, height: int, width: int, shift: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """(windows, 1, N, N) mask: -100 between tokens that the cyclic shift brought together
        from different regions of the map (the value the published weights were trained with)."""
        w = self.window_size
        region = like.new_zeros(height, width)
        for i, (h0, h1) in enumerate(((0, height - w), (height - w, height - shift[0]), (height - shift[0], height))):
            for j, (w0, w1) in enumerate(((0, width - w), (width - w, width - shift[1]), (width - shift[1], width))):
                region[h0:h1, w0:w1] = 3 * i + j
        region = region.view(height // w, w, width // w, w).transpose(1, 2).reshape(-1, w * w)
        diff = region.unsqueeze(1) - region.unsqueeze(2)
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, heads = self.window_size, self.num_heads
        # pad to whole windows; the padded (zero) tokens take part in attention, as in the reference
        x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        ph, pw = x.shape[1:3]
        # a window covering the whole map has nothing to shift into
        shift = (self.shift_size if ws < ph else 0, self.shift_size if ws < pw else 0)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b, nh * nw, ws * ws, c)

        qkv_bias = self.qkv.bias
        if self.v2:  # v2 has no key bias: the middle third is ignored
            q_b, _, v_b = qkv_bias.chunk(3)
            qkv_bias = torch.cat([q_b, torch.zeros_like(q_b), v_b])
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(b, nh * nw, ws * ws, 3, heads, c // heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, windows, heads, N, head_dim)
        bias = self.relative_position_bias()
        if any(shift):
            bias = bias + self._shift_mask(ph, pw, shift, bias)  # (windows, heads, N, N)
        if self.v2:  # cosine similarity times a learned per-head temperature (at most 100)
            temperature = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            q, k, scale = F.normalize(q, dim=-1) * temperature, F.normalize(k, dim=-1), 1.0
        else:
            scale = None
        drop = self.attention_dropout if self.training else 0.0
        x = attention(q, k, v, bias, scale=scale, dropout_p=drop, fused=self.fused)
        x = x.transpose(2, 3).reshape(b, nh * nw, ws * ws, c)
        x = F.dropout(self.proj(x), self.dropout, self.training)

        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :h, :w].contiguous()

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}, " \
               f"v2={self.v2}, fused={self.fused}"


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, cfg: SwinConfig,
                 drop_prob: float, dropout: float, attention_dropout: float, fused: bool):
        super().__init__()
        self.post_norm = cfg.v2
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, window_size, shift_size, num_heads, cfg.v2, attention_dropout,
                                           dropout, fused)
        self.stochastic_depth = StochasticDepth(drop_prob)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.stochastic_depth(self.norm1(self.attn(x)))
            return x + self.stochastic_depth(self.norm2(self.mlp(x)))
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: concatenate (4C), then LayerNorm + Linear to 2C
    (v2: Linear, then LayerNorm). Odd sides are zero-padded."""

    def __init__(self, dim: int, v2: bool):
        super().__init__()
        self.v2 = v2
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if v2 else 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # the reference's order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
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
                blocks.append(SwinBlock(dim, heads, cfg.window_size, 0 if j % 2 == 0 else cfg.window_size // 2,
                                        cfg, sd * block_id / (total - 1), dropout, attention_dropout,
                                        fused_attention))
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
