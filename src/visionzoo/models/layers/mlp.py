"""The transformer feed-forward block, named like torchvision's `MLP` (`0` and `3` are the
linear layers), so ViT, Swin and MViT checkpoints load unchanged."""
from __future__ import annotations

from torch import nn


class Mlp(nn.Sequential):
    """Linear -> GELU -> Dropout -> Linear -> Dropout; the output width is `out_dim` (default:
    `dim`; MViT widens the stream inside the block that changes its channels)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, out_dim: int | None = None):
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden_dim, dim if out_dim is None else out_dim), nn.Dropout(dropout))
