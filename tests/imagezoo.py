"""A generated folder holding every image mode and format the loader must handle, plus bad files.

Everything is made from one real photo (scikit-image's coffee.png, which the default model
sees as an espresso with a wide margin, so that lossless and near-lossless copies must keep
that top-1), 600x400, small enough to predict the whole folder in seconds.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .photos import sample_image

# images whose pixels are the photo's (lossless, or a faithful round trip): same top-1 as the photo
FAITHFUL = ("rgb.png", "rgb.jpg", "exif_rotated.jpg", "progressive.jpg", "cmyk.jpg", "rgb.webp", "rgb.bmp",
            "rgb.tif", "cmyk.tif", "opaque_rgba.png")
BOMB_PIXELS = 3000 * 3000  # bomb.png's size; the tests lower the limit below it
LOWERED_LIMIT = 2_000_000
# bad file -> the words its error must contain
BAD = {"truncated.jpg": "truncated", "truncated.png": "truncated", "empty.jpg": "empty",
       "text.jpg": "not an image", "bomb.png": "decompression bomb"}


def photo() -> Image.Image:
    return Image.open(sample_image("coffee.png")).convert("RGB")  # 600 x 400


def make_image_zoo(folder: Path) -> dict[str, Path]:
    """Write the zoo into `folder`; returns {file name: path} of every file written."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo()
    gray = rgb.convert("L")

    def save(name: str, img: Image.Image, **kwargs) -> None:
        img.save(folder / name, **kwargs)

    # JPEG: RGB, grayscale, CMYK, progressive, and a sideways photo with its EXIF orientation
    save("rgb.jpg", rgb, quality=95)
    save("gray.jpg", gray, quality=95)
    save("cmyk.jpg", rgb.convert("CMYK"), quality=95)
    save("progressive.jpg", rgb, quality=95, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as a phone held upright writes
    save("exif_rotated.jpg", rgb.transpose(Image.Transpose.ROTATE_90), quality=95, exif=exif)

    # PNG: every mode Pillow writes
    save("rgb.png", rgb)
    save("bilevel.png", gray.convert("1"))
    save("gray.png", gray)
    alpha = Image.linear_gradient("L").resize(rgb.size)
    la = gray.copy()
    la.putalpha(alpha)
    save("gray_alpha.png", la)
    save("palette.png", rgb.quantize(64))
    pal = rgb.quantize(64)
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, transparency=0)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    save("rgba.png", rgba)
    opaque = rgb.copy()
    opaque.putalpha(255)
    save("opaque_rgba.png", opaque)
    deep = (np.asarray(gray, np.uint16) * 257).astype(np.uint16)  # 16-bit, full range
    save("gray16.png", Image.fromarray(deep))

    # WebP, BMP, TIFF (RGB, CMYK, 32-bit integer, 32-bit float), GIF
    save("rgb.webp", rgb, lossless=True)
    save("rgb.bmp", rgb)
    save("rgb.tif", rgb)
    save("cmyk.tif", rgb.convert("CMYK"))
    save("int32.tif", Image.fromarray(deep.astype(np.int32)))
    save("float32.tif", Image.fromarray(np.asarray(gray, np.float32) / 255.0))
    save("palette.gif", rgb.quantize(256))

    # animations: the first frame is the photo, the second something else (a cat)
    other = Image.open(sample_image("chelsea.png")).convert("RGB").resize(rgb.size)
    rgb.save(folder / "animated.gif", save_all=True, append_images=[other], duration=100, loop=0)
    rgb.save(folder / "animated.webp", save_all=True, append_images=[other], duration=100, loop=0, lossless=True)

    # bad files
    good_jpeg = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    good_png = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("meeting notes: bring the coffee\n" * 10)
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG", optimize=True)  # a few KB that decode to 9 MP
    (folder / "bomb.png").write_bytes(buf.getvalue())
    return {p.name: p for p in sorted(folder.iterdir())}


def good_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in BAD)
