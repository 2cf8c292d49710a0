"""The transformer feed-forward block, named like torchvision's `MLP` (`0` and `3` are the
linear layers), so ViT and Swin checkpoints load unchanged."""
from __future__ import annotations

from torch import nn


class Mlp(nn.Sequential):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden_dim, dim), nn.Dropout(dropout))
