"""Decoding: EXIF orientation, transparency, 16-bit, and per-file errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visionzoo.data.images import load_image
from visionzoo.data.inputs import expand_inputs
from visionzoo.errors import ImageError

from .conftest import sample_image


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.open(sample_image("chelsea.png")).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright.save(tmp_path / "upright.jpg", quality=95)
    a = np.asarray(load_image(tmp_path / "rotated.jpg"), dtype=np.float32)
    b = np.asarray(load_image(tmp_path / "upright.jpg"), dtype=np.float32)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 3


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :] = (255, 0, 0, 255)  # opaque red top, transparent bottom
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((0, 7)) == (255, 255, 255)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    img = np.asarray(load_image(tmp_path / "deep.png"))
    assert img.dtype == np.uint8 and img[0, 0, 0] == 0 and img[-1, -1, 0] == 255
    assert len(np.unique(img[:, :, 0])) > 50


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"hello world" * 5, "not an image")])
def test_bad_files_raise_image_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as e:
        load_image(path)
    assert e.value.path == str(path) and str(path) in str(e.value)


def test_expand_inputs_reports_what_matched_nothing(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.txt").write_bytes(b"x")
    files, failures = expand_inputs([tmp_path, tmp_path / "nope.jpg", str(tmp_path / "*.gif")])
    assert [f.name for f in files] == ["a.png"]
    assert [f.reason for f in failures] == ["no such file or directory; check the path", "pattern matches no files"]
