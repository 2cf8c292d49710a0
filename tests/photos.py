"""Real photos for tests and benchmarks: the sample images shipped with scikit-image and
matplotlib, augmented copies of them, and camera-size JPEGs made from them."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from visionzoo.data import samples

# photographs of everyday scenes: a cat, a cup, people, a rocket, a motorbike, a cameraman
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "grace_hopper.jpg",
          "camera.png")


def sample_image(name: str) -> Path:
    """A real photo shipped by scikit-image (coffee.png, chelsea.png, ...) or matplotlib (grace_hopper.jpg)."""
    if name == "grace_hopper.jpg":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / name
    import skimage

    return Path(skimage.__file__).parent / "data" / name


def photos() -> list[Path]:
    """The sample photos that exist in the installed packages."""
    return [p for p in map(sample_image, PHOTOS) if p.is_file()]


def augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """A plausible other shot of the same scene (the package's own augmentation, on RGB)."""
    return samples.augment(img.convert("RGB"), rng)


def write_augmented(folder: Path, copies: int, seed: int = 0, *, originals: bool = True) -> list[Path]:
    """Each sample photo (with `originals`) and `copies` augmented versions of it, as JPEGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for src in photos():
        img = Image.open(src).convert("RGB")
        if originals:
            out.append(folder / f"{src.stem}.jpg")
            img.save(out[-1], quality=92)
        for i in range(copies):
            out.append(folder / f"{src.stem}_aug{i:03d}.jpg")
            augment(img, rng).save(out[-1], quality=rng.randint(75, 95))
    return out


def write_camera_jpegs(folder: Path, count: int, megapixels: float = 12.0, seed: int = 0,
                       noise: float = 5.0) -> list[Path]:
    """`count` camera-size JPEGs (about `megapixels`, quality 90): the sample photos, augmented and
    upscaled, cycling through them, with sensor-like noise (`noise`: its standard deviation in
    levels of 255 in brightness, half that per colour). An upscaled photo alone is smooth and
    compresses to a quarter of a camera file (0.76 MB at 12 MP), which decodes several times
    faster; with the noise a 12 MP file is about 3.3 MB, as a phone's or a camera's is."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in photos()]
    fields: dict[tuple[int, int], np.ndarray] = {}  # one noise field per image size, shifted for each image
    out = []
    for i in range(count):
        img = sources[i % len(sources)]
        img = augment(img, rng) if i >= len(sources) else img
        scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
        big = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        if noise > 0:
            if big.size not in fields:
                g = np.random.default_rng(seed)
                shape = (big.height, big.width)
                fields[big.size] = (g.normal(0, noise, (*shape, 1)) + g.normal(0, noise / 2, (*shape, 3))
                                    ).round().clip(-127, 127).astype(np.int16)
            shifted = np.roll(fields[big.size], (rng.randrange(big.height), rng.randrange(big.width)), axis=(0, 1))
            big = Image.fromarray((np.asarray(big, dtype=np.int16) + shifted).clip(0, 255).astype(np.uint8))
        out.append(folder / f"photo_{i:04d}.jpg")
        big.save(out[-1], quality=90)
    return out


def write_detect_folder(folder: Path) -> Path:
    """Two real photos of different sizes and a text file renamed .jpg (a bad input)."""
    import shutil

    shutil.copy(sample_image("coffee.png"), folder / "coffee.png")
    shutil.copy(sample_image("rocket.jpg"), folder / "rocket.jpg")
    (folder / "notes.jpg").write_text("not an image\n" * 20)
    return folder
