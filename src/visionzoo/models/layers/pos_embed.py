"""Resampling learned absolute position embeddings for another patch grid."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample (1, prefix + H*W, C) position embeddings from an `old_grid` (H, W) of patches
    to `new_grid`, bicubically; the prefix tokens (the class token) are kept unchanged.

    Patch tokens are in row-major order (row * W + column), as a flattened conv output.
    The grid is treated as patch *centres* spread over the same image (`align_corners=False`):
    patch i of n covers [i/n, (i+1)/n) of the image at any resolution, so its embedding is
    read at the same relative position. Shrinking the grid low-pass filters first
    (`antialias`) so that it does not alias.
    """
    (oh, ow), (nh, nw) = old_grid, new_grid
    if pos_embed.ndim != 3 or pos_embed.shape[1] != num_prefix_tokens + oh * ow:
        raise ValueError(f"position embeddings of shape {tuple(pos_embed.shape)} do not hold "
                         f"{num_prefix_tokens} prefix tokens and a {oh}x{ow} grid")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = pos_embed.shape[-1]
    dtype = torch.promote_types(pos_embed.dtype, torch.float32)  # bicubic needs float32 or wider
    grid = grid.reshape(1, oh, ow, channels).permute(0, 3, 1, 2).to(dtype)
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False,
                         antialias=nh < oh or nw < ow)
    grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, channels).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
