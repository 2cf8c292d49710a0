"""Hostile files for the tests: tiny files that claim huge images, written without ever holding the image.

`png` streams a PNG of any size whose rows are all the same (zeros by default) through zlib,
so a 13000 x 13000 16-bit image (338 MB of pixels) is written in a second as 328 KB.
"""
from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types: grey, RGB, palette, grey + alpha, RGBA; and their channels
GREY, RGB, PALETTE, GREY_ALPHA, RGBA = 0, 2, 3, 4, 6
CHANNELS = {GREY: 1, RGB: 3, PALETTE: 1, GREY_ALPHA: 2, RGBA: 4}


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, bit_depth: int = 8, color_type: int = GREY, *, rows: int | None = None,
        fill: int = 0, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A PNG whose header says `width` x `height`; `rows` rows of pixel data follow (default: all),
    every byte `fill`. Fewer rows than the height make a truncated image."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    count = height if rows is None else rows
    row = b"\x00" + bytes([fill]) * ((width * CHANNELS[color_type] * bit_depth + 7) // 8) if count else b""
    z = zlib.compressobj(6)
    data = []
    for _ in range(count):
        data.append(z.compress(row))
    data.append(z.flush())
    out = [PNG_SIGNATURE, chunk(b"IHDR", ihdr)]
    if color_type == PALETTE:
        out.append(chunk(b"PLTE", b"\x00\x00\x00" * 256))
    out += [chunk(kind, body) for kind, body in extra]
    out += [chunk(b"IDAT", b"".join(data)), chunk(b"IEND", b"")]
    return b"".join(out)


def apng_frames(frames: int) -> bytes:
    """A 1x1 PNG whose animation control chunk declares `frames` frames."""
    return png(1, 1, extra=((b"acTL", struct.pack(">II", frames, 0)),))


# the image files of issue 13: file name -> (bytes, words its failure must contain)
@functools.cache
def issue_files() -> dict[str, tuple[bytes, str]]:
    return {
        "wide_100000x1.png": (png(100_000, 1), "resize limit"),  # 178 bytes that grew predict to 19.8 GB
        "wide_20000x1.png": (png(20_000, 1), "resize limit"),  # 101 bytes that took serve to 5.5 GB
        "deep_13000x13000.png": (png(13_000, 13_000, 16), "memory limit"),  # 328 KB of 16-bit pixels: 4.7 GB
        "frames.png": (apng_frames(2**31 - 1), "frame limit"),
        "bomb_65535.png": (png(65_535, 65_535, rows=1), "decompression bomb"),
    }


def write_issue_files(folder: Path) -> dict[str, str]:
    """Write `issue_files()` into `folder`; returns {path: words its failure must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, (data, words) in issue_files().items():
        (folder / name).write_bytes(data)
        found[str(folder / name)] = words
    return found


# -- running code under a memory limit ------------------------------------------------------------

MEMORY_LIMIT = 2 << 30  # the acceptance limit of issue 13: every reproduction runs within 2 GB
_BOOT = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ["visionzoo", *sys.argv[2:]]
from visionzoo.cli import main
main()
"""


def run_limited(*args: object, memory: int = MEMORY_LIMIT, timeout: float = 600, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `visionzoo` command line in a fresh process whose address space is capped at `memory`
    bytes (every process it forks inherits the cap): an allocation beyond it fails instead of
    taking the machine."""
    run_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, "-c", _BOOT, str(memory), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=run_env, errors="replace")


SRC = Path(__file__).resolve().parents[1] / "src"


def one_line_errors(stderr: str) -> list[str]:
    """The lines of `stderr`; fails on a traceback, so that every error is known to be one clean line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.strip()]


_HOLDER = """
import sys, time
from visionzoo.fileutil import exclusive
with exclusive(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(target: Path, seconds: float) -> subprocess.Popen:
    """Another process that owns `target` (`fileutil.exclusive`) for `seconds` once this returns."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc
