"""Input checks shared by the video families."""
from __future__ import annotations

import torch

from ...errors import InputError


def check_clip(x: torch.Tensor, model: str, size: tuple[int, int, int] | None = None) -> None:
    """Raise `InputError` unless `x` is a batch of clips (N, C, T, H, W), of exactly `size`
    = (T, H, W) frames x height x width when the model takes only one size."""
    if x.ndim != 5:
        raise InputError(f"{model} takes a batch of clips shaped (N, C, T, H, W), got shape {tuple(x.shape)}; "
                         f"add the missing batch or time dimension")
    if size is not None and tuple(x.shape[2:]) != tuple(size):
        t, h, w = size
        raise InputError(f"{model} is built for clips of {t} frames of {h}x{w} pixels, got "
                         f"{x.shape[2]} frames of {x.shape[3]}x{x.shape[4]}; resample and crop the clip to that size")
