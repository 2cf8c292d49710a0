"""Real videos for tests, written with the decoding library itself (PyAV): a bright square moving at
a known velocity over a real photo, in several codecs and containers, and the broken files a
reader must survive (corrupt, truncated, zero frames, audio only)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from .photos import sample_image

# (container suffix, codec, pixel format): what the tests write
FORMATS = (
    (".mp4", "libx264", "yuv420p"),
    (".webm", "libvpx-vp9", "yuv420p"),
    (".avi", "mpeg4", "yuv420p"),
    (".mkv", "ffv1", "yuv420p"),
)
SQUARE = 16  # side of the moving square, pixels
SQUARE_COLOR = (255, 40, 200)


def background(width: int, height: int, photo: str = "coffee.png",
               crop: tuple[float, float, float] | None = None) -> np.ndarray:
    """A real photo (or the part `crop` = (left, top, size) in fractions of it) resized to (height, width, 3)."""
    img = Image.open(sample_image(photo)).convert("RGB")
    if crop is not None:
        w, h = img.size
        left, top, side = crop
        img = img.crop((int(left * w), int(top * h), int((left + side) * w), int((top + side) * h)))
    return np.asarray(img.resize((width, height), Image.BILINEAR))


def square_position(t: int, width: int, height: int, velocity: tuple[float, float],
                    origin: tuple[float, float] | None = None, square: int = SQUARE) -> tuple[int, int]:
    """Top-left (x, y) of the square in frame `t`: from `origin` (default the centre) at `velocity`
    pixels per frame, bouncing off the edges so it stays inside."""
    ox, oy = origin if origin is not None else ((width - square) / 2, (height - square) / 2)

    def bounce(p: float, span: int) -> int:
        period = 2 * span
        q = p % period if span > 0 else 0
        return int(round(q if q <= span else period - q))

    return bounce(ox + velocity[0] * t, width - square), bounce(oy + velocity[1] * t, height - square)


def frame(t: int, bg: np.ndarray, velocity: tuple[float, float], origin=None, square: int = SQUARE) -> np.ndarray:
    h, w = bg.shape[:2]
    x, y = square_position(t, w, h, velocity, origin, square)
    out = bg.copy()
    out[y:y + square, x:x + square] = SQUARE_COLOR
    return out


def write_video(path: Path, frames: int = 48, *, size: tuple[int, int] = (160, 120), fps: int = 30,
                velocity: tuple[float, float] = (2.0, 1.0), codec: str = "libx264", pix_fmt: str = "yuv420p",
                photo: str = "coffee.png", origin=None, bit_rate: int | None = None, gop: int | None = None,
                options: dict | None = None, audio: bool = False, square: int = SQUARE,
                crop: tuple[float, float, float] | None = None) -> Path:
    """Write `frames` frames of a square moving at `velocity` (pixels per frame) over a photo."""
    import av

    width, height = size
    bg = background(width, height, photo, crop)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if bit_rate or codec == "mpeg4":  # mpeg4's default rate blurs the square by a pixel or two
            stream.bit_rate = bit_rate or 2_000_000
        if gop:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        sound = container.add_stream("aac", rate=16000) if audio else None
        for t in range(frames):
            image = av.VideoFrame.from_ndarray(frame(t, bg, velocity, origin, square), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            _write_tone(container, sound, seconds=frames / fps)
    return path


def _write_tone(container, stream, seconds: float) -> None:
    import av

    rate = stream.rate
    samples = np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate).astype(np.float32)
    pts = 0
    for start in range(0, len(samples), 1024):
        chunk = samples[start:start + 1024][None]
        audio = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        audio.sample_rate, audio.pts, audio.time_base = rate, pts, Fraction(1, rate)
        pts += chunk.shape[1]
        for packet in stream.encode(audio):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    import av

    with av.open(str(path), "w") as container:
        _write_tone(container, container.add_stream("aac", rate=16000), seconds)
    return path


def write_zero_frames(path: Path) -> Path:  # .mkv or .avi
    """A container with a video stream header and no frames."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # the header, with no packet after it
    return path


def truncate(path: Path, out: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[:int(len(data) * fraction)])
    return out


def corrupt(out: Path) -> Path:
    """Bytes that are no video at all, under a video's name."""
    out.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return out


def square_centre(rgb: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of the square's colour in a decoded frame (codecs blur its edges a little)."""
    diff = np.abs(rgb.astype(np.int16) - np.array(SQUARE_COLOR, np.int16)).sum(axis=2)
    ys, xs = np.nonzero(diff < 60)
    return float(xs.mean()), float(ys.mean())
