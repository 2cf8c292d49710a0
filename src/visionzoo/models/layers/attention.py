"""Multi-head attention for the transformer families, fused or explicit.

Every attention module here computes `softmax(scale * q @ k^T + bias) @ v` in one of two
ways, chosen by its `fused` attribute: PyTorch's `scaled_dot_product_attention` (one
kernel, no materialised attention matrix where the backend allows it) or the explicit
matmul-softmax-matmul. Both give the same result to rounding; the explicit path is the
reference and what the benchmark (`benchmarks/vit_attention.py`) compares against.
Switch a whole model with `set_fused_attention(model, enabled)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              scale: float | None = None, dropout_p: float = 0.0, fused: bool = True) -> torch.Tensor:
    """`softmax(scale * q @ k^T + bias) @ v` over the last two dimensions.

    `q`, `k`, `v`: (..., tokens, head_dim); `bias`: additive, broadcastable to the attention
    matrix (..., tokens, tokens); `scale` defaults to `head_dim ** -0.5`.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def set_fused_attention(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every attention module of `model` to the fused (`True`) or explicit path."""
    for m in model.modules():
        if hasattr(m, "fused") and isinstance(m.fused, bool):
            m.fused = bool(enabled)
    return model


def relative_position_index(*window: int) -> torch.Tensor:
    """For a window of the given sides (2-D: height, width; 3-D: time, height, width), the
    (N, N) index, N = product of the sides, into a table of prod(2s - 1) relative offsets:
    entry (i, j) is the row of offset(token i - token j), offsets enumerated row-major."""
    grids = torch.meshgrid(*(torch.arange(s) for s in window), indexing="ij")
    coords = torch.stack(grids).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (dims, N, N), offsets in [-(s-1), s-1] per side
    index = torch.zeros_like(rel[0])
    for d, side in enumerate(window):
        index = index * (2 * side - 1) + rel[d] + side - 1
    return index


class MultiheadSelfAttention(nn.Module):
    """Self-attention with `nn.MultiheadAttention`'s parameter names (`in_proj_weight`,
    `in_proj_bias`, `out_proj`), so torchvision ViT checkpoints load unchanged; batch first."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.0, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.fused = fused
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention's initialisation
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attention_dropout if self.training else 0.0
        out = attention(q, k, v, dropout_p=drop, fused=self.fused)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, fused={self.fused}"
