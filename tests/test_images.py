"""Decoding: EXIF orientation, every mode and format, bad files, decompression bombs, the fast path;
input discovery."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionzoo.data.images import draft_info, load_image
from visionzoo.data.inputs import expand_inputs
from visionzoo.errors import ImageError
from visionzoo.weights.records import Preprocess

from .imagezoo import BAD, BOMB_PIXELS, FAITHFUL, LOWERED_LIMIT, good_names, make_image_zoo, photo
from .photos import sample_image


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


# -- every mode and format, bad files, decompression bombs, the fast JPEG path -------------------

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    make_image_zoo(folder)
    return folder


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def test_every_good_file_decodes_to_an_upright_rgb_image(zoo):
    for name in good_names(zoo):
        img = load_image(zoo / name)
        assert img.mode == "RGB" and img.size == photo().size, name


def test_faithful_formats_keep_the_photo(zoo):
    original = _arr(photo())
    for name in FAITHFUL:
        diff = np.abs(_arr(load_image(zoo / name)) - original).mean()
        assert diff < (4 if name.endswith(".jpg") else 0.5), (name, diff)


def test_gray_deep_and_float_modes_are_scaled_to_the_gray_photo(zoo):
    gray = _arr(photo().convert("L"))
    for name in ("gray.png", "gray16.png", "int32.tif", "float32.tif", "gray.jpg"):
        img = _arr(load_image(zoo / name))
        assert np.abs(img[:, :, 0] - gray).max() <= (12 if name.endswith(".jpg") else 1), name
        assert np.array_equal(img[:, :, 0], img[:, :, 2]), name


def test_bilevel_is_black_and_white(zoo):
    assert set(np.unique(_arr(load_image(zoo / "bilevel.png")))) <= {0.0, 255.0}


def test_alpha_modes_are_composited_on_white(zoo):
    # the alpha gradient runs from transparent (top row) to opaque (bottom row)
    for name in ("rgba.png", "gray_alpha.png"):
        img = _arr(load_image(zoo / name))
        assert (img[0] == 255).all(), name
        reference = _arr(photo() if name == "rgba.png" else photo().convert("L").convert("RGB"))
        assert np.abs(img[-1] - reference[-1]).max() <= 2, name
    palette = Image.open(zoo / "palette_transparent.png")
    transparent = np.asarray(palette) == 0
    assert transparent.any()
    assert (_arr(load_image(zoo / "palette_transparent.png"))[transparent] == 255).all()


def test_animations_give_their_first_frame(zoo):
    first = _arr(photo())
    for name in ("animated.gif", "animated.webp"):
        assert np.abs(_arr(load_image(zoo / name)) - first).mean() < 8, name


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_are_reported_with_their_reason(zoo, name):
    with pytest.raises(ImageError, match=BAD[name]) as e:
        load_image(zoo / name, max_pixels=LOWERED_LIMIT)
    assert e.value.path == str(zoo / name)


def test_decompression_bomb_limit_is_configurable(zoo, monkeypatch):
    bomb = zoo / "bomb.png"
    assert load_image(bomb).size == (3000, 3000)  # 9 MP is under the default limit
    with pytest.raises(ImageError, match="9,000,000 pixels, over the limit of 2,000,000"):
        load_image(bomb, max_pixels=LOWERED_LIMIT)
    # a limit above Pillow's own module-wide one wins, and Pillow's is left as it was
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    assert load_image(bomb, max_pixels=BOMB_PIXELS).size == (3000, 3000)
    assert load_image(bomb, max_pixels=None).size == (3000, 3000)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb, max_pixels=BOMB_PIXELS - 1)


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory):
    """A 2400x1600 JPEG and the same photo stored sideways with an EXIF orientation."""
    folder = tmp_path_factory.mktemp("large")
    big = photo().resize((2400, 1600), Image.Resampling.BICUBIC)
    big.save(folder / "big.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    big.transpose(Image.Transpose.ROTATE_90).save(folder / "big_rotated.jpg", quality=90, exif=exif)
    big.save(folder / "big.png")
    return folder


def test_fast_path_decodes_large_jpegs_at_a_reduced_scale(large_jpegs):
    assert load_image(large_jpegs / "big.jpg").size == (2400, 1600)  # exact path: full size
    # resize target 256: the reduced image keeps a shorter side >= 2 x 256, here 1/2 scale
    assert load_image(large_jpegs / "big.jpg", reduce_to=256).size == (1200, 800)
    assert load_image(large_jpegs / "big.jpg", reduce_to=150).size == (600, 400)  # 1/4: 400 >= 2 x 150
    assert load_image(large_jpegs / "big.jpg", reduce_to=100).size == (300, 200)  # 1/8: 200 >= 2 x 100
    assert load_image(large_jpegs / "big.jpg", reduce_to=500).size == (2400, 1600)  # 1/2 would be < 1000
    assert load_image(large_jpegs / "big_rotated.jpg", reduce_to=256).size == (1200, 800)  # then upright
    assert load_image(large_jpegs / "big.png", reduce_to=256).size == (2400, 1600)  # only JPEGs
    reduced = load_image(large_jpegs / "big.jpg", reduce_to=256).resize((600, 400), Image.Resampling.BILINEAR)
    full = load_image(large_jpegs / "big.jpg").resize((600, 400), Image.Resampling.BILINEAR)
    assert np.abs(_arr(reduced) - _arr(full)).mean() < 2


def test_fast_path_leaves_small_images_untouched(zoo):
    for name in ("rgb.jpg", "cmyk.jpg", "exif_rotated.jpg"):
        assert np.array_equal(_arr(load_image(zoo / name, reduce_to=256)), _arr(load_image(zoo / name)))


def test_expand_inputs_lists_and_csv(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.png", "a/2.jpg", "3.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# my picks\n3.png\n\na\nmissing.png\n")
    (tmp_path / "data.csv").write_text("path,label\na/1.png,cat\n3.png,dog\ngone.jpg,dog\n")
    files, failures = expand_inputs([f"@{tmp_path / 'list.txt'}", tmp_path / "data.csv", "@nolist.txt"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["3.png", "a/1.png", "a/2.jpg"]
    assert [(Path(f.path).name, f.reason.split(";")[0]) for f in failures] == [
        ("missing.png", "no such file or directory"), ("gone.jpg", "no such file (listed in data.csv)"),
        ("@nolist.txt", "list file not found")]
    files, failures = expand_inputs(str(tmp_path / "a"))  # a single input needs no list
    assert [f.name for f in files] == ["1.png", "2.jpg"] and not failures


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_keeps_the_exact_geometry_in_every_orientation(tmp_path, orientation):
    """An odd-sized JPEG (its reduced decode ends in partial blocks) stored in each EXIF orientation:
    the fast path's tensor stays within a hair of the exact path's (a half-pixel shift would not)."""
    upright = photo().resize((3003, 1997), Image.Resampling.BICUBIC)
    to_stored = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    (upright if to_stored is None else upright.transpose(to_stored)).save(path, quality=92, exif=exif)
    transform = Preprocess(256, 224, "bicubic").transforms()
    reduced = load_image(path, reduce_to=256)
    assert reduced.size == (1502, 999) and draft_info(reduced).full_size == (3003, 1997)
    exact = transform(load_image(path))
    fast = transform(reduced)
    assert float((fast - exact).abs().mean()) < 0.003
    # a cropped copy no longer matches its draft geometry and is preprocessed as a plain image
    assert draft_info(reduced.crop((0, 0, 1000, 900))) is None


# -- folder walks and symbolic links (issue 13) -------------------------------------------------

@pytest.fixture
def linked(tmp_path):
    """A tree with two links that loop (`sub/up -> ..`, `sub/deeper/top -> ../..`), a second name for
    a folder (`alias -> sub`), a link out of the tree and a broken link."""
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for p in (root / "a.png", root / "sub" / "b.png", root / "sub" / "deeper" / "c.png", outside / "d.png"):
        p.write_bytes(b"x")
    (root / "sub" / "up").symlink_to("..")
    (root / "sub" / "deeper" / "top").symlink_to("../..")
    (root / "alias").symlink_to("sub")
    (root / "elsewhere").symlink_to(outside)
    (root / "broken").symlink_to("nowhere")
    return root


def test_folder_walks_follow_each_linked_folder_once_and_report_loops(linked):
    files, failures = expand_inputs([linked])
    assert sorted(str(p.relative_to(linked)) for p in files) == [
        "a.png", "elsewhere/d.png", "sub/b.png", "sub/deeper/c.png"]  # each image once, under its own path
    assert sorted((Path(f.path).relative_to(linked).as_posix(), f.reason.split(" (")[0]) for f in failures) == [
        ("sub/deeper/top", "symbolic link loop"), ("sub/up", "symbolic link loop")]
    assert f"leads back to {linked}" in failures[0].reason


def test_globs_span_folders_without_looping(linked):
    files, failures = expand_inputs([str(linked / "**" / "*.png")])
    assert sorted(str(p.relative_to(linked)) for p in files) == [
        "a.png", "elsewhere/d.png", "sub/b.png", "sub/deeper/c.png"]
    assert len(failures) == 2 and all("symbolic link loop" in f.reason for f in failures)
    files, _ = expand_inputs([str(linked / "sub" / "*.png")])
    assert [p.name for p in files] == ["b.png"]


def test_predict_reports_a_loop_once_under_2gb(tmp_path):
    """`sub/loop -> ..` made predict run the same image 41 times; two such links never ended."""
    from .hostile import one_line_errors, run_limited

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    photo().save(root / "coffee.png")
    (root / "sub" / "loop").symlink_to("..")
    (root / "sub" / "loop2").symlink_to("..")
    run = run_limited("predict", root, "--format", "jsonl", "--workers", "0", timeout=300)
    assert run.returncode == 3, run.stderr[-2000:]
    assert [json.loads(line)["path"] for line in run.stdout.splitlines()] == [str(root / "coffee.png")]
    loops = [line for line in one_line_errors(run.stderr) if line.startswith("skipped")]
    assert len(loops) == 2 and all(str(root / "sub") in line for line in loops)
