"""Sample photos packaged with visionzoo, and augmented copies of them made on demand.

Five freely licensed photographs of everyday scenes (`samples/README.md`) are part of the
package, so that a check that needs real images (`auto`'s agreement check,
`runtime/autotune.py`) runs offline, on any machine. `augmented_photos` turns them into as
many images as needed: random crops, flips, small rotations, light and colour changes,
drawn from a seeded generator so that every run (and every machine) sees the same images.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from .images import load_image

SAMPLES = Path(__file__).parent / "samples"


def sample_photos() -> list[Path]:
    """The packaged photos (JPEGs, shorter side 320 px), in a fixed order."""
    return sorted(SAMPLES.glob("*.jpg"))


def augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """Another plausible shot of the same scene: a crop of 60-100% of each side, a flip, a rotation
    of up to 12 degrees, brightness, contrast and colour within about +-25%."""
    w, h = img.size
    scale = rng.uniform(0.6, 1.0)
    cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = img.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))


def augmented_photos(count: int, seed: int = 0) -> Iterator[Image.Image]:
    """`count` RGB images: the packaged photos themselves first, then augmented copies, cycling
    through the photos. The same `seed` gives the same images."""
    originals = [load_image(p) for p in sample_photos()]
    rng = random.Random(seed)
    for i in range(count):
        source = originals[i % len(originals)]
        yield source if i < len(originals) else augment(source, rng)
