"""Multiscale Vision Transformers for video: MViT v1 (B) and MViT v2 (S).

Fan et al., "Multiscale Vision Transformers" (2021) and Li et al., "MViTv2: Improved
Multiscale Vision Transformers for Classification and Detection" (2022). A transformer over
space-time patch tokens plus a class token whose resolution shrinks and width grows stage by
stage: *pooling attention* pools queries (to downsample) and keys/values (to save compute)
with depthwise 3x3x3 convolutions, each followed by LayerNorm. v2 differs in four places, all
switched by `MViTConfig.v2`: decomposed relative-position terms (time, height, width) added
to the attention logits instead of absolute position embeddings; a residual from the pooled
query to the attention output; queries pooled in every block; the width grows in the first
block of a stage (projecting the normalised input) instead of the last (projecting before
the MLP).

State-dict names follow torchvision's `MViT` (`blocks.N.attn.pool_q.pool`, `rel_pos_h`, ...).
A model takes clips of exactly the size it was built for (`temporal_size`, `spatial_size`):
position embeddings (v1) and relative-position tables (v2) are sized for it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..enums import Task
from ..errors import InputError
from .base import FeatureInfo, ZooModel
from .layers import Mlp, StochasticDepth, attention, check_clip

THW = tuple[int, int, int]
NormLayer = Callable[[int], nn.Module]


@dataclass(frozen=True)
class MViTConfig:
    depths: tuple[int, ...]  # blocks per stage
    dims: tuple[int, ...]  # channels per stage
    heads: tuple[int, ...]  # attention heads per stage
    v2: bool
    kv_stride: int = 8  # spatial stride of key/value pooling in the first stage, halved every stage (down to 1)
    stochastic_depth_prob: float = 0.2  # of the last block, linear from 0
    patch_kernel: THW = (3, 7, 7)
    patch_stride: THW = (2, 4, 4)
    patch_padding: THW = (1, 3, 3)


VARIANTS: dict[str, MViTConfig] = {
    "mvit_v1_b": MViTConfig((1, 2, 11, 2), (96, 192, 384, 768), (1, 2, 4, 8), v2=False),
    "mvit_v2_s": MViTConfig((1, 2, 11, 2), (96, 192, 384, 768), (1, 2, 4, 8), v2=True),
}


@dataclass(frozen=True)
class BlockSetting:
    heads: int
    in_chs: int
    out_chs: int
    pool_q: bool  # queries go through a pooling convolution (strided or not)
    stride_q: int  # spatial stride of the query (and the residual) pooling: 2 where a stage starts
    stride_kv: int  # spatial stride of the key/value pooling


def block_settings(cfg: MViTConfig) -> list[BlockSetting]:
    """The per-block table (torchvision's `MSBlockConfig` rows) derived from the stage description."""
    rows, last = [], len(cfg.depths) - 1
    for i, (depth, dim, heads) in enumerate(zip(cfg.depths, cfg.dims, cfg.heads, strict=True)):
        for j in range(depth):
            stride_q = 2 if i > 0 and j == 0 else 1
            if cfg.v2:  # widen in the first block of a stage
                in_chs, out_chs = (cfg.dims[i - 1] if i > 0 and j == 0 else dim), dim
            else:  # widen in the last block of a stage
                in_chs, out_chs = dim, (cfg.dims[i + 1] if i < last and j == depth - 1 else dim)
            rows.append(BlockSetting(heads, in_chs, out_chs, cfg.v2 or stride_q > 1, stride_q,
                                     max(cfg.kv_stride >> i, 1)))
    return rows


class Pool(nn.Module):
    """Pools the tokens of a (T, H, W) grid, leaving the class token (the first) as it is, then
    normalises all tokens (`norm_act`, when given). Takes (B, L, C) or per-head (B, heads, L, C)."""

    def __init__(self, pool: nn.Module, norm: nn.Module | None):
        super().__init__()
        self.pool = pool
        self.norm_act = nn.Sequential(norm) if norm is not None else None

    def forward(self, x: torch.Tensor, thw: THW) -> tuple[torch.Tensor, THW]:
        per_head = x.ndim == 4
        if not per_head:
            x = x.unsqueeze(1)
        b, n, _, c = x.shape
        cls, tokens = x[:, :, :1], x[:, :, 1:]
        tokens = self.pool(tokens.transpose(2, 3).reshape(b * n, c, *thw))
        thw = tuple(tokens.shape[2:])
        x = torch.cat([cls, tokens.reshape(b, n, c, -1).transpose(2, 3)], dim=2)
        if self.norm_act is not None:
            x = self.norm_act(x)
        return (x if per_head else x.squeeze(1)), thw


def _resample(table: torch.Tensor, length: int) -> torch.Tensor:
    """A relative-position table linearly resampled to `length` offsets (the reference's rule
    when a grid is not the one the table was sized for)."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()


def _offsets(q: int, k: int) -> torch.Tensor:
    """(q, k) row of each (query, key) pair in a table of 2 * max(q, k) - 1 offsets; a coarser
    grid's positions are scaled to the finer one's spacing first (as the reference does,
    in float32, truncated)."""
    q_ratio, k_ratio = max(k / q, 1.0), max(q / k, 1.0)
    return (torch.arange(q)[:, None] * q_ratio - (torch.arange(k)[None, :] + (1.0 - k)) * k_ratio).long()


def relative_position_logits(q: torch.Tensor, q_thw: THW, k_thw: THW, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """MViTv2's decomposed relative-position term of the attention logits, (B, heads, Lq, Lk)
    over the grid tokens (not the class token): q_i . (R_t[dt] + R_h[dh] + R_w[dw])."""
    b, heads, _, dim = q.shape
    q_grid = q[:, :, 1:].reshape(b, heads, *q_thw, dim)
    terms = []
    for axis, (table, nq, nk) in enumerate(zip(tables, q_thw, k_thw, strict=True)):
        rel = _resample(table, 2 * max(nq, nk) - 1)[_offsets(nq, nk).to(table.device)]  # (nq, nk, dim)
        # contract q's position along this axis with the key's: (B, heads, qt, qh, qw, nk)
        term = torch.einsum(f"bnthwc,{'thw'[axis]}kc->bnthwk", q_grid, rel)
        shape = [1, 1, 1]
        shape[axis] = nk
        terms.append(term.reshape(*term.shape[:-1], *shape))
    logits = terms[0] + terms[1] + terms[2]  # (B, heads, qt, qh, qw, kt, kh, kw)
    return logits.reshape(b, heads, math.prod(q_thw), math.prod(k_thw))


class MultiscaleAttention(nn.Module):
    """Pooling attention: queries, keys and values pooled by depthwise 3x3x3 convolutions
    (queries with stride 2 where a stage starts); v2 adds relative positions and a residual
    from the pooled query."""

    def __init__(self, in_dim: int, dim: int, setting: BlockSetting, grid: THW, v2: bool, dropout: float,
                 norm_layer: NormLayer, fused: bool = True):
        super().__init__()
        s = setting
        self.num_heads = s.heads
        self.head_dim = dim // s.heads
        self.v2 = v2
        self.fused = fused
        self.qkv = nn.Linear(in_dim, 3 * dim)
        self.project = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        hd = self.head_dim

        def pool(stride: int) -> Pool:
            conv = nn.Conv3d(hd, hd, 3, (1, stride, stride), 1, groups=hd, bias=False)
            return Pool(conv, norm_layer(hd))

        self.pool_q = pool(s.stride_q) if s.pool_q else None
        self.pool_k = pool(s.stride_kv)
        self.pool_v = pool(s.stride_kv)
        if v2:
            # tables sized from the grid this block sees; height and width share the longer side's size
            side = max(grid[1:])
            spatial = 2 * max(side // s.stride_q, side // s.stride_kv) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(spatial, hd))
            self.rel_pos_w = nn.Parameter(torch.zeros(spatial, hd))
            self.rel_pos_t = nn.Parameter(torch.zeros(2 * grid[0] - 1, hd))
            for table in (self.rel_pos_h, self.rel_pos_w, self.rel_pos_t):
                nn.init.trunc_normal_(table, std=0.02)

    def forward(self, x: torch.Tensor, thw: THW) -> tuple[torch.Tensor, THW]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k, k_thw = self.pool_k(k, thw)
        v, _ = self.pool_v(v, thw)
        if self.pool_q is not None:
            q, thw = self.pool_q(q, thw)
        bias = None
        if self.v2:
            logits = relative_position_logits(q, thw, k_thw, (self.rel_pos_t, self.rel_pos_h, self.rel_pos_w))
            bias = F.pad(logits, (1, 0, 1, 0))  # nothing for the class token's row and column
        x = attention(q, k, v, bias, fused=self.fused)
        if self.v2:  # residual pooling: the pooled query joins the output, except the class token's
            x = x + F.pad(q[:, :, 1:], (0, 0, 1, 0))
        x = x.transpose(1, 2).reshape(b, q.shape[2], -1)
        return self.project(x), thw

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, fused={self.fused}"


class MultiscaleBlock(nn.Module):
    def __init__(self, setting: BlockSetting, grid: THW, v2: bool, dropout: float, drop_prob: float,
                 norm_layer: NormLayer):
        super().__init__()
        s = setting
        self.proj_after_attn = v2
        dim = s.out_chs if v2 else s.in_chs  # the attention's width
        self.pool_skip = None
        if s.stride_q > 1:
            stride = (1, s.stride_q, s.stride_q)
            self.pool_skip = Pool(nn.MaxPool3d((1, s.stride_q + 1, s.stride_q + 1), stride,
                                               (0, (s.stride_q + 1) // 2, (s.stride_q + 1) // 2)), None)
        self.norm1 = norm_layer(s.in_chs)
        self.norm2 = norm_layer(dim)
        self.attn = MultiscaleAttention(s.in_chs, dim, s, grid, v2, dropout, norm_layer)
        self.mlp = Mlp(dim, 4 * dim, dropout, out_dim=s.out_chs)
        self.stochastic_depth = StochasticDepth(drop_prob)
        self.project = nn.Linear(s.in_chs, s.out_chs) if s.in_chs != s.out_chs else None

    def forward(self, x: torch.Tensor, thw: THW) -> tuple[torch.Tensor, THW]:
        x_norm = self.norm1(x)
        x_attn, new_thw = self.attn(x_norm, thw)
        if self.project is not None and self.proj_after_attn:  # v2 widens the shortcut here...
            x = self.project(x_norm)
        if self.pool_skip is not None:
            x, _ = self.pool_skip(x, thw)
        x = x + self.stochastic_depth(x_attn)
        x_norm = self.norm2(x)
        if self.project is not None and not self.proj_after_attn:  # ...v1 here, from the normalised stream
            x = self.project(x_norm)
        return x + self.stochastic_depth(self.mlp(x_norm)), new_thw


class PositionalEncoding(nn.Module):
    """Prepends the class token; v1 also adds absolute embeddings, a temporal and a spatial one
    summed per token (and one for the class token)."""

    def __init__(self, dim: int, grid: THW, absolute: bool):
        super().__init__()
        self.grid = grid
        self.class_token = nn.Parameter(torch.zeros(dim))
        self.absolute = absolute
        if absolute:
            self.spatial_pos = nn.Parameter(torch.zeros(grid[1] * grid[2], dim))
            self.temporal_pos = nn.Parameter(torch.zeros(grid[0], dim))
            self.class_pos = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.class_token.expand(x.shape[0], 1, -1), x], dim=1)
        if not self.absolute:
            return x
        grid_pos = (self.temporal_pos[:, None] + self.spatial_pos[None]).flatten(0, 1)  # token t*HW + hw
        return x + torch.cat([self.class_pos[None], grid_pos])[None]


class MViT(ZooModel):
    """`forward_features` gives the normalised tokens (B, 1 + T'H'W', C), the class token first;
    the head classifies the class token."""

    task: ClassVar[Task] = Task.VIDEO
    classifier_name = "head.1"
    first_conv = "conv_proj"

    def __init__(self, cfg: MViTConfig, num_classes: int = 400, dropout: float = 0.5, attention_dropout: float = 0.0,
                 stochastic_depth_prob: float | None = None, spatial_size: tuple[int, int] = (224, 224),
                 temporal_size: int = 16, in_chans: int = 3):
        super().__init__()
        if isinstance(spatial_size, int):
            spatial_size = (spatial_size, spatial_size)
        self.clip_size: THW = (temporal_size, *spatial_size)
        self.image_size = spatial_size[0] if spatial_size[0] == spatial_size[1] else None
        if any(s < p for s, p in zip(self.clip_size, cfg.patch_stride, strict=True)):
            raise InputError(f"MViT clip size {self.clip_size} is smaller than its patch {cfg.patch_stride}")
        sd = cfg.stochastic_depth_prob if stochastic_depth_prob is None else stochastic_depth_prob
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        settings = block_settings(cfg)
        self.conv_proj = nn.Conv3d(in_chans, cfg.dims[0], cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding)
        (t, h, w), (pt, ph, pw) = self.clip_size, cfg.patch_stride
        grid: THW = (t // pt, h // ph, w // pw)
        self.pos_encoding = PositionalEncoding(cfg.dims[0], grid, absolute=not cfg.v2)
        self.blocks = nn.ModuleList()
        self.feature_info = []
        stage_ends = {sum(cfg.depths[:i + 1]) - 1 for i in range(len(cfg.depths))}
        reduction = cfg.patch_stride[1]
        for i, s in enumerate(settings):
            self.blocks.append(MultiscaleBlock(s, grid, cfg.v2, attention_dropout, sd * i / (len(settings) - 1),
                                               norm_layer))
            grid = (grid[0], grid[1] // s.stride_q, grid[2] // s.stride_q)
            reduction *= s.stride_q
            if i in stage_ends:
                self.feature_info.append(FeatureInfo(f"blocks.{i}", s.out_chs, reduction))
        self.num_features = settings[-1].out_chs
        self.num_classes = num_classes
        self.norm = norm_layer(self.num_features)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes) if num_classes > 0
                                  else nn.Identity())
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in self.pos_encoding.parameters():
            nn.init.trunc_normal_(p, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_clip(x, self.arch or type(self).__name__, self.clip_size)
        x = self.pos_encoding(self.conv_proj(x).flatten(2).transpose(1, 2))
        thw = self.pos_encoding.grid
        for block in self.blocks:
            x, thw = block(x, thw)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def format_stage_output(self, index: int, output: torch.Tensor | tuple[torch.Tensor, THW]) -> torch.Tensor:
        """A block's (tokens, grid) -> (B, C, T, H, W), without the class token."""
        if isinstance(output, torch.Tensor):
            raise TypeError("MViT stages are blocks, whose output is (tokens, grid)")
        x, thw = output
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *thw)


MODEL_CLASS = MViT
