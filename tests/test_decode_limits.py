"""The decode budget (issue 13): every limit refuses from the header, conversions never widen the whole
image, extreme aspect ratios never materialise, and a refused image is one failure line in a run
that goes on, under a 2 GB memory limit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visionzoo.data.images as images
import visionzoo.data.transforms as transforms
from visionzoo import cli
from visionzoo.data.images import DecodeLimits, decode_bytes, load_image, probe_image, to_rgb
from visionzoo.data.preprocess import Preprocess
from visionzoo.errors import ImageError, InputError
from visionzoo.runtime.options import InferenceOptions

from .hostile import (
    GREY,
    GREY_ALPHA,
    MEMORY_LIMIT,
    SRC,
    issue_files,
    one_line_errors,
    png,
    run_limited,
    write_issue_files,
)
from .photos import sample_image


def test_limits_parse_validate_and_describe():
    limits = DecodeLimits.parse("pixels=200M, bytes=1GiB,frames=none")
    assert (limits.max_pixels, limits.max_bytes, limits.max_frames) == (200_000_000, 1 << 30, None)
    assert limits.max_resized_pixels == DecodeLimits().max_resized_pixels  # untouched keys keep the default
    assert DecodeLimits.parse(limits.describe()) == limits
    assert DecodeLimits.parse("resized=0", limits).max_resized_pixels is None
    for text in ("pixels", "colours=3", "pixels=-4", "bytes=lots", "frames=1e999"):
        with pytest.raises(InputError, match="decode limit"):
            DecodeLimits.parse(text)
    with pytest.raises(InputError, match="max_frames"):
        DecodeLimits(max_frames=0)


def test_inference_options_keep_max_pixels():
    options = InferenceOptions.of(max_pixels=1000)
    assert options.max_pixels == options.limits.max_pixels == 1000
    assert InferenceOptions.of(options, max_pixels=None).limits.max_pixels is None
    assert InferenceOptions(limits="bytes=1M").limits.max_bytes == 1_000_000
    with pytest.raises(InputError, match="max_pixels"):
        InferenceOptions.of(max_pixels=0)


@pytest.mark.parametrize("name", sorted(issue_files()))
def test_every_issue_file_is_refused_from_its_header(tmp_path, name):
    data, words = issue_files()[name]
    path = tmp_path / name
    path.write_bytes(data)
    for check in (lambda: load_image(path, resize_to=256), lambda: probe_image(path, resize_to=256)):
        with pytest.raises(ImageError, match=words) as e:
            check()
        assert e.value.path == str(path) and "\n" not in str(e.value)


def test_each_limit_can_be_raised_or_lifted(tmp_path):
    wide = tmp_path / "wide.png"
    wide.write_bytes(png(2000, 1))
    with pytest.raises(ImageError, match="resize limit"):
        load_image(wide, resize_to=256)  # 512000 x 256 once resized
    assert load_image(wide, resize_to=256, limits=DecodeLimits(max_resized_pixels=None)).size == (2000, 1)
    assert load_image(wide).size == (2000, 1)  # no resize announced, nothing to check
    deep = tmp_path / "deep.png"
    deep.write_bytes(png(1000, 1000, 16))
    assert decode_bytes("I;16", (1000, 1000)) == 6_000_000  # 2 bytes stored + 4 of RGB per pixel
    with pytest.raises(ImageError, match="memory limit"):
        load_image(deep, limits=DecodeLimits(max_bytes=5_999_999))
    assert load_image(deep, limits=DecodeLimits(max_bytes=6_000_000)).size == (1000, 1000)


def test_sixteen_bit_conversion_is_the_float_formula_exactly():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.clip(values.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    for mode_array in (values, values.astype(">u2")):
        got = np.asarray(to_rgb(Image.fromarray(mode_array)))[:, :, 0]
        assert np.array_equal(got, expected)


def _old_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """The whole-image float64 conversion this project used before issue 13, as the reference."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if mode == "F" and lo >= 0 and hi <= 1:
        low, high = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        low, high = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        low, high = 0.0, 65535.0
    else:
        low, high = lo, max(hi, lo + 1e-12)
    return np.clip((arr - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def test_strip_conversions_equal_whole_image_ones(monkeypatch):
    rng = np.random.default_rng(0)
    floats = rng.random((97, 61)).astype(np.float32)
    floats[3, 4], floats[5, 6], floats[7, 8] = np.nan, np.inf, -np.inf
    deep = {"I": rng.integers(-5000, 90000, (97, 61)).astype(np.int32),
            "F": floats, "F wide": (rng.random((97, 61)) * 1000 - 3).astype(np.float32)}
    rgba = Image.fromarray(rng.integers(0, 256, (97, 61, 4), dtype=np.uint8), "RGBA")
    palette = rgba.convert("RGB").quantize(64)
    palette.info["transparency"] = 3
    whole = {name: to_rgb(img) for name, img in (("RGBA", rgba), ("LA", rgba.convert("LA")), ("P", palette))}
    monkeypatch.setattr(images, "STRIP_PIXELS", 7 * 61)  # 7 rows per strip, the last one partial
    for name, arr in deep.items():
        got = np.asarray(to_rgb(Image.fromarray(arr)))
        assert np.array_equal(got[:, :, 0], _old_to_uint8(arr, name.split()[0])), name
    for name, expected in whole.items():
        img = {"RGBA": rgba, "LA": rgba.convert("LA"), "P": palette}[name]
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(expected)), name


def test_extreme_aspect_ratio_resizes_only_the_crop(monkeypatch):
    pp = Preprocess(256, 224, "bicubic")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (3, 20000, 3), dtype=np.uint8))
    x = pp.transforms()(img)  # resized whole, it would be 1,706,666 x 256 (1.7 GB as RGB)
    assert tuple(x.shape) == (3, 224, 224) and bool(x.isfinite().all())
    # below the threshold the two ways agree, up to rounding
    rng = np.random.default_rng(2)
    for size in ((700, 100), (100, 700), (5, 2000)):
        small = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for interpolation in ("bilinear", "bicubic"):
            transform = Preprocess(232, 224, interpolation).transforms()
            monkeypatch.setattr(transforms, "MATERIALIZE_LIMIT", 1 << 40)
            whole = transform(small)
            monkeypatch.setattr(transforms, "MATERIALIZE_LIMIT", 0)
            area = transform(small)
            assert float((whole - area).abs().max()) * 0.229 <= 2.5 / 255, (size, interpolation)


def test_out_of_memory_is_one_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(png(64, 64, color_type=GREY_ALPHA))

    def exhausted(img):
        raise MemoryError

    monkeypatch.setattr(images, "to_rgb", exhausted)
    with pytest.raises(ImageError, match="not enough memory"):
        load_image(path)


# found by fuzzing (2026-12-01): a 202-byte PNG whose IDAT chunk claims 1.9 GB. Pillow reads the rest
# of the chunk by its declared length, and a buffered file read allocates that length up front.
LYING_IDAT = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000021000000021000000000a32736687400009149444154789c01860079ff"
    "00b0017385fc969c4377c44577acfa6b1a0c8494e29173ec111660e2fd7e87baf575898baaade32a5186702f14f9874a"
    "03cd6ef556407e9e68b770652e3c11523f88a6020d92d3deea147f7379c112dc12bde0c95aa754455bf9ed2dda2fe379"
    "f788af7e0b1a7522dd7286e2e43ea64e52445043822d4b79a13bce3a4b25bbdbd42b3e6e45dc7ec241779c56862b0000"
    "000049454e44ae426082")


def test_a_chunk_length_that_lies_costs_no_memory(tmp_path):
    path = tmp_path / "lying.png"
    path.write_bytes(LYING_IDAT)
    script = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: the claimed chunk does not fit
        from visionzoo.data.images import load_image
        from visionzoo.data.masks import read_mask
        print(load_image(sys.argv[1]).size, read_mask(sys.argv[1], 65536).shape)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(33,", "2)", "(2,", "33)"]


def test_decoding_a_deep_png_costs_what_the_budget_says(tmp_path):
    """A 4000 x 4000 16-bit PNG: the peak is the decoded pixels plus the RGB copy (96 MB), not the
    float64 copies of the whole image (128 MB each) that the conversion used to make."""
    path = tmp_path / "deep.png"
    path.write_bytes(png(4000, 4000, 16, GREY, fill=0x7F))
    (tmp_path / "small.png").write_bytes(png(8, 8, 16))
    script = textwrap.dedent(f"""
        import resource
        from visionzoo.data.images import load_image
        load_image({str(tmp_path / "small.png")!r})  # imports and first-use allocations before measuring
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        img = load_image({str(path)!r})
        print(img.getpixel((0, 0))[0], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}).stdout.split()
    pixel, grown = int(out[0]), int(out[1])
    assert pixel == round(0x7F7F / 65535 * 255)
    budget = decode_bytes("I;16", (4000, 4000))
    assert grown <= 1.15 * budget, f"grew by {grown / 2**20:.0f} MiB for a budget of {budget / 2**20:.0f} MiB"


# -- in a run: one failure line each, the rest predicted, under a 2 GB memory limit ----------------

@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("hostile")
    expected = write_issue_files(folder)
    for name in ("coffee.png", "chelsea.png"):
        (folder / name).write_bytes(sample_image(name).read_bytes())
    return folder, expected


def test_predict_reports_each_hostile_file_and_predicts_the_rest_under_2gb(hostile_folder):
    folder, expected = hostile_folder
    run = run_limited("predict", folder, "--format", "jsonl", "--topk", "1", "--workers", "1")
    assert run.returncode == cli.EXIT_PARTIAL, run.stderr[-2000:]
    assert sorted(Path(json.loads(line)["path"]).name for line in run.stdout.splitlines()) == \
        ["chelsea.png", "coffee.png"]
    lines = one_line_errors(run.stderr)
    for path, words in expected.items():
        assert [line for line in lines if path in line and words in line], (path, words, lines)
    assert f"2 predicted, {len(expected)} failed" in run.stderr


def test_raised_limits_are_used_by_every_command(hostile_folder, tmp_path):
    folder, _ = hostile_folder
    (tmp_path / "espresso").mkdir()
    (tmp_path / "espresso" / "coffee.png").write_bytes((folder / "coffee.png").read_bytes())
    (tmp_path / "espresso" / "wide.png").write_bytes(png(2000, 1))
    from visionzoo.tasks.evaluate import evaluate

    ev = evaluate("efficientnet_lite0", tmp_path, num_workers=0)
    assert [Path(f.path).name for f in ev.failures] == ["wide.png"] and "resize limit" in ev.failures[0].reason
    ev = evaluate("efficientnet_lite0", tmp_path, num_workers=0, limits="resized=none")
    assert not ev.failures and ev.num_images == 2


@pytest.mark.slow
def test_the_deep_png_decodes_under_2gb_when_its_limit_is_raised(hostile_folder):
    folder, _ = hostile_folder
    run = run_limited("predict", folder / "deep_13000x13000.png", "--format", "jsonl", "--workers", "0",
                      "--decode-limits", "bytes=1200MiB")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["predictions"][0]["probability"] > 0


# -- the same budget for bytes in memory and for the server's decode ---------------------------------

@pytest.mark.parametrize("name", sorted(issue_files()))
def test_encoded_bytes_are_held_to_the_same_budget(name):
    """`decode_image` (uploads, Ray's readers) refuses the issue's files from their headers too."""
    from visionzoo.data.images import decode_image

    data, words = issue_files()[name]
    with pytest.raises(ImageError, match=words) as e:
        decode_image(data, f"upload/{name}", resize_to=256)
    assert e.value.path == f"upload/{name}" and "\n" not in str(e.value)


def test_the_servers_decode_of_the_issue_files_stays_under_2gb(tmp_path):
    """The server's classification handler decodes an upload with `load_image(path, max_pixels=...,
    reduce_to=...)` (None for an exact request) and then its model's transform: every file of the
    issue is refused or costs little, in a process capped at 2 GB (it took serve to 5.5 GB)."""
    expected = write_issue_files(tmp_path)
    script = textwrap.dedent(f"""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
        from visionzoo.data.images import DEFAULT_MAX_PIXELS, load_image
        from visionzoo.data.preprocess import Preprocess
        from visionzoo.errors import ImageError
        transform = Preprocess(256, 224).transforms()
        out = {{}}
        for path in {sorted(expected)!r}:
            for reduce_to in (256, None):
                try:
                    out[path + str(reduce_to)] = list(transform(load_image(path, max_pixels=DEFAULT_MAX_PIXELS,
                                                                           reduce_to=reduce_to)).shape)
                except ImageError as e:
                    out[path + str(reduce_to)] = e.reason
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    for path, words in expected.items():
        assert words in results[path + "256"], (path, results[path + "256"])
        exact = results[path + "None"]  # no resize limit without a target: refused by another, or cheap
        assert exact == [3, 224, 224] or isinstance(exact, str), (path, exact)
