"""Fuzzing as a habit (issue 13): Hypothesis generates hostile image files, safetensors headers and
bundle.json descriptions, and a worker process (`fuzz_worker.py`) reads each inside a memory cap.

Every file must be read, or refused with the reader's one-line error; nothing may raise another
exception, print a multi-line error, or run out of memory (the cap is what the worker uses
after warming up plus `HEADROOM`, with a decode budget of 128 MiB: a decode that ignores its
budget fails instead of taking the machine). safetensors files are also read by the reference
reader: we accept exactly what it accepts (except the documented differences: the dtypes torch
lacks, duplicate names) and read the same bytes.

The unmarked tests run a few hundred examples each, the `slow` ones a few thousand; both are
derandomized (the same examples every run), so a CI failure reproduces.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from .hostile import CHANNELS, GREY, GREY_ALPHA, PALETTE, RGB, RGBA, SRC, chunk, png

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

HEADROOM = 640 << 20  # the worker's memory cap above what it uses when idle
QUICK = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# derandomized too, so that CI is reproducible: a random run on 2026-11-30 once found an image header
# that broke `_images`' expectations, not reproduced since (see the closing note of that day)
LONG = settings(max_examples=2000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Worker:
    """A `fuzz_worker.py` process; restarted when a file kills it (which the test reports)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fuzz_worker.py")),
                                      str(HEADROOM)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        ready = json.loads(self.proc.stdout.readline() or b"{}")
        assert ready.get("ready"), "the fuzz worker did not start"
        self.bundle_json = json.loads(ready["bundle_json"])

    def ask(self, target: str, data: bytes) -> dict:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"target": target, "size": len(data)}).encode() + b"\n" + data)
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = b""
        if not line:
            code = self.proc.wait()
            self.start()
            return {"outcome": "crash", "error": "worker died", "message": f"exit status {code}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _check(result: dict, data: bytes, worker: Worker | None = None) -> None:
    if result["outcome"] != "crash":
        return
    again = ""
    if worker is not None and "not enough memory" in str(result.get("message")):
        # out of memory: is it this file, or a state the worker was left in by an earlier one?
        fresh = Worker()
        try:
            again = f"\nthe same file in a fresh worker: {fresh.ask('image', data)}"
        finally:
            fresh.close()
    raise AssertionError(f"{result.get('error')}: {result.get('message')}\n{result.get('traceback', '')}\n"
                         f"address space {result.get('vm')} bytes, peak {result.get('vm_peak')}{again}\n"
                         f"input ({len(data)} bytes): {data[:200]!r}")


# -- image files ----------------------------------------------------------------------------------

MODES = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "JPEG": ("L", "RGB", "CMYK"),
         "GIF": ("P", "L"), "BMP": ("1", "L", "P", "RGB"), "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK",
                                                                    "I;16", "I", "F"),
         "WEBP": ("RGB", "RGBA")}
# sizes a header may claim: mostly plausible, some at the edges of what the formats can say
CLAIMED = st.one_of(st.integers(1, 5000), st.integers(5000, 70000),
                    st.sampled_from([0, 65535, 65536, 2**31 - 1, 2**32 - 1]))


@st.composite
def pillow_files(draw) -> bytes:
    """A small image saved by Pillow in a random format and mode, then maybe given other dimensions
    in its header, truncated, or with bytes overwritten."""
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    rnd = draw(st.randoms(use_true_random=False))
    img = Image.frombytes(mode, size, rnd.randbytes(len(Image.new(mode, size).tobytes())))
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = bytearray(buf.getvalue())
    if draw(st.booleans()):
        _claim(data, fmt, draw(CLAIMED), draw(CLAIMED))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def _claim(data: bytearray, fmt: str, width: int, height: int) -> None:
    """Write other dimensions into the header of `data` (PNG, JPEG, GIF, BMP), as far as the field holds."""
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", width % 2**32, height % 2**32)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)  # a valid chunk CRC
    elif fmt == "JPEG":
        at = next((i for i in range(len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2)), None)
        if at is not None:
            data[at + 5:at + 9] = struct.pack(">HH", height % 65536, width % 65536)
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", width % 65536, height % 65536)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width % 2**31, -(height % 2**31) if height % 2 else height % 2**31)


@st.composite
def crafted_pngs(draw) -> bytes:
    """PNGs written byte by byte: any size the header can claim, any bit depth the colour type
    allows, few rows of data (a truncated or lying image), animation chunks claiming any frame count."""
    color = draw(st.sampled_from([GREY, RGB, PALETTE, GREY_ALPHA, RGBA]))
    depth = draw(st.sampled_from({GREY: [1, 2, 4, 8, 16], PALETTE: [1, 2, 4, 8]}.get(color, [8, 16])))
    width = draw(st.one_of(st.integers(1, 300), CLAIMED))
    height = draw(st.one_of(st.integers(1, 300), CLAIMED))
    row_bytes = (max(width, 1) * CHANNELS[color] * depth + 7) // 8
    rows = draw(st.integers(0, max(0, min(height, (1 << 20) // row_bytes, 64))))  # at most 1 MB of rows
    extra = ()
    if draw(st.booleans()):
        extra = ((b"acTL", struct.pack(">II", draw(st.integers(0, 2**32 - 1)), 0)),)
    if width * height == 0 or width >= 2**31 or height >= 2**31:
        ihdr = struct.pack(">IIBBBBB", width % 2**32, height % 2**32, depth, color, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    return png(width, height, depth, color, rows=rows, fill=draw(st.integers(0, 255)), extra=extra)


def _images(worker, data: bytes) -> None:
    result = worker.ask("image", data)
    _check(result, data, worker)
    if result["outcome"] == "ok":
        width, height = result["size"]
        assert width * height <= 50_000_000  # the worker's pixel limit


@QUICK
@given(st.one_of(pillow_files(), crafted_pngs()))
def test_fuzz_image_headers(worker, data):
    _images(worker, data)


@pytest.mark.slow
@LONG
@given(st.one_of(pillow_files(), crafted_pngs()))
def test_fuzz_image_headers_long(worker, data):
    _images(worker, data)


# -- safetensors headers ----------------------------------------------------------------------------

ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
        "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=4)), max_leaves=12)


@st.composite
def safetensors_files(draw) -> bytes:
    """A well-formed file (random tensors laid out back to back, random metadata), then maybe one
    field replaced by any JSON value, the ranges shifted, the data cut or padded, or the header
    length or text tampered with."""
    header: dict = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(ITEM)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        end = offset + math.prod(shape) * ITEM[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    data = draw(st.binary(min_size=offset, max_size=offset))
    names = [k for k in header if k != "__metadata__"]
    change = draw(st.sampled_from(["none", "field", "offsets", "data", "length", "text"]))
    if change == "field" and header:
        name = draw(st.sampled_from(sorted(header)))
        if name == "__metadata__" or draw(st.booleans()):
            header[name] = draw(JSON_VALUES)
        else:
            header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUES)
    elif change == "offsets" and names:
        entry = header[draw(st.sampled_from(names))]
        entry["data_offsets"] = [o + draw(st.integers(-8, 8)) for o in entry["data_offsets"]]
    elif change == "data":
        data = data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data + draw(st.binary(max_size=9))
    raw = json.dumps(header).encode()
    if change == "text" and raw:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"1e999", b"NaN", b"-1", b"1.5", b'"a": 1, ', b"9" * 30, b"{",
                                               b"\xff"])) + raw[at:]
    length = len(raw) + (draw(st.integers(-4, 4)) if change == "length" else 0)
    return struct.pack("<Q", max(length, 0)) + raw + data


def _safetensors(worker, data: bytes) -> None:
    result = worker.ask("safetensors", data)
    _check(result, data)
    if result["outcome"] == "refused" and result.get("reference") == "accepted":
        # the only files the reference takes and we do not: names given twice, dtypes torch lacks
        assert "duplicate key" in result["message"] or "unsupported dtype" in result["message"], result


@QUICK
@given(safetensors_files())
def test_fuzz_safetensors_headers(worker, data):
    _safetensors(worker, data)


@pytest.mark.slow
@LONG
@given(safetensors_files())
def test_fuzz_safetensors_headers_long(worker, data):
    _safetensors(worker, data)


# -- bundle.json ----------------------------------------------------------------------------------

FIELDS = ("format", "format_version", "architecture", "classes", "num_classes", "preprocess", "builder_kwargs",
          "base_weights", "weights_file", "weights_sha256", "training", "metrics", "history", "structure",
          "visionzoo_version", "created")
PREPROCESS_FIELDS = ("resize_size", "crop_size", "interpolation", "mean", "std")
NUMBERS = st.one_of(st.integers(-5, 70000), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 4096, 4097, 60000, 2**63]))


@st.composite
def bundle_descriptions(draw, good: dict) -> bytes:
    """The worker's valid bundle.json with fields deleted or replaced by any JSON value, numbers
    in the preprocessing, builder arguments and structure, or its text cut short."""
    meta = json.loads(json.dumps(good))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "delete", "preprocess", "builder", "structure"]))
        if kind == "field":
            meta[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
        elif kind == "delete":
            meta.pop(draw(st.sampled_from(FIELDS)), None)
        elif kind == "preprocess" and isinstance(meta.get("preprocess"), dict):
            field = draw(st.sampled_from(PREPROCESS_FIELDS))
            meta["preprocess"][field] = draw(st.one_of(NUMBERS, JSON_VALUES, st.lists(NUMBERS, min_size=3,
                                                                                      max_size=3)))
        elif kind == "builder":
            meta["builder_kwargs"] = {draw(st.sampled_from(["in_chans", "dropout", "stochastic_depth", "bogus",
                                                            "num_classes"])): draw(st.one_of(NUMBERS, JSON_VALUES))}
        elif kind == "structure":
            meta["structure"] = {"modules": {draw(st.sampled_from(["features.0.0", "classifier.3", "nope", ""])): {
                draw(st.sampled_from(["out_channels", "in_features", "groups", "forward"])): draw(NUMBERS)}}}
    text = json.dumps(meta)
    if draw(st.integers(0, 9)) == 0:
        text = text[:draw(st.integers(0, len(text)))]
    return text.encode()


def _bundles(worker, data: bytes) -> None:
    _check(worker.ask("bundle", data), data)


@QUICK
@given(st.data())
def test_fuzz_bundle_descriptions(worker, data):
    _bundles(worker, data.draw(bundle_descriptions(worker.bundle_json)))


@pytest.mark.slow
@LONG
@given(st.data())
def test_fuzz_bundle_descriptions_long(worker, data):
    _bundles(worker, data.draw(bundle_descriptions(worker.bundle_json)))


def test_the_worker_catches_what_it_should(worker):
    """The net itself: a decode that breaks the cap is a crash, a refusal is not, and the reference
    reader's verdicts come back."""
    assert worker.ask("image", png(8, 8))["outcome"] == "ok"
    assert worker.ask("image", png(100_000, 1))["outcome"] == "refused"
    assert worker.ask("safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}")["outcome"] == "ok"
    assert worker.ask("bundle", json.dumps(worker.bundle_json).encode())["outcome"] == "ok"
    bomb = worker.ask("bundle", b"[" * 10**6)
    assert bomb["outcome"] == "refused", bomb
