"""scikit-learn's digits (1797 8x8 images, 10 classes) written as an ImageFolder of PNGs.

The fine-tuning tests and benchmark train on it: small enough for a CPU, hard enough
that the strategies differ. Each 8x8 image (ink 0..16) is drawn as dark ink on white
paper and upscaled to 64x64 with bicubic interpolation, like a scanned digit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64


def write_digits(root: str | Path, size: int = SIZE, limit: int | None = None) -> Path:
    """Write `root/<digit>/<index>.png` and return `root`; `limit` keeps the first images only."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    images, targets = digits.images, digits.target
    if limit is not None:
        images, targets = images[:limit], targets[:limit]
    for i, (img, label) in enumerate(zip(images, targets, strict=True)):
        paper = (255 - img * (255 / 16)).clip(0, 255).astype(np.uint8)
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(paper).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
    return root
