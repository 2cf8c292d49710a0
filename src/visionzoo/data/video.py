"""Video in: lazy frame decoding, clip sampling as the weights were evaluated, and the clip transform.

Decoding uses PyAV (`pip install "visionzoo[video]"`): its wheels carry their own FFmpeg, so it
installs and runs anywhere torch does. torchcodec was tried too and left out: its wheels need the
system's FFmpeg libraries and, for the build that matches our torch, CUDA's runtime (it fails to
load on a CPU-only machine).

A video is never held in memory whole. `VideoReader.frames(indices)` decodes forward through the
file and converts to RGB only the frames asked for, seeking over long gaps; `clips` keeps only the
(already resized and cropped) frames of the clips still being assembled. Memory depends on the clip,
not on the length of the video.

Clip sampling follows torchvision's video classification reference: the video is resampled to the
recipe's `frame_rate` (each sampled frame is the source frame at or before its time) and a clip is
`clip_len` consecutive sampled frames; `clips` evenly spaced clips cover the video (one clip: the
middle one). A video shorter than a clip repeats its last frame.

Every failure (not a video, corrupt, truncated, no video stream, no frames) is a `VideoError`
naming the file, which the workflows report and step over. The decode budget of images
(`DecodeLimits`) applies to each frame where it has a meaning: `pixels` (a frame's width x height,
from the header, before anything is decoded) and `bytes` (a decoded frame and its RGB copy). The
other two do not: frames are resized to the recipe's size, bounded by `Preprocess` itself, and a
video's frame count is what lazy decoding makes harmless (memory holds a clip, not the video).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError, VideoError, check_at_least
from ..optional import require
from .images import DEFAULT_LIMITS, DecodeLimits
from .loader import ImageBatch, default_num_workers, fix_mmap_threshold
from .preprocess import Preprocess
from .transforms import resized_size

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".ogv",
                              ".wmv", ".flv", ".3gp"})
SEEK_GAP_S = 2.0  # seek (to the keyframe before) instead of decoding through gaps longer than this
# frames a header may promise beyond the last one decoded before the file counts as truncated
# (containers round their duration; a stream can end a frame or two early)
END_SLACK = 3
# memory of one decoded frame: up to 3 bytes a pixel as decoded (8-bit 4:4:4; 4:2:0 takes 1.5), and
# its RGB copy (3)
FRAME_BYTES_PER_PIXEL = 6


def is_video_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _av() -> ModuleType:
    return require("av")


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says about its picture."""

    path: str
    fps: float  # frames per second (the stream's average rate)
    num_frames: int  # from the header, else its duration times the rate
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


@dataclass(frozen=True)
class ClipSampling:
    """How clips are cut from a video: `clip_len` frames at `frame_rate` fps (None: every source frame)."""

    clip_len: int
    frame_rate: float | None = None

    @classmethod
    def of(cls, preprocess: Preprocess) -> ClipSampling:
        if preprocess.clip_len is None:
            raise InputError(f"the {preprocess.kind} preprocessing has no clip length: it is not a video model's "
                             f"(list them with `visionzoo models --task video`)")
        return cls(preprocess.clip_len, preprocess.frame_rate)

    def step(self, fps: float) -> float:
        """Source frames per sampled frame: the temporal stride (2.0 for a 30 fps video sampled at 15)."""
        return fps / self.frame_rate if self.frame_rate else 1.0

    def span(self, fps: float) -> int:
        """Source frames one clip covers."""
        return math.floor(self.step(fps) * (self.clip_len - 1)) + 1

    def clip_indices(self, info: VideoInfo, clips: int) -> list[list[int]]:
        """The source frame indices of `clips` evenly spaced clips (a single clip: the middle one)."""
        check_at_least("clips", clips, 1)
        step, last = self.step(info.fps), info.num_frames - 1
        free = max(info.num_frames - self.span(info.fps), 0)
        if clips == 1:
            starts = [free // 2]
        else:
            starts = [round(i * free / (clips - 1)) for i in range(clips)]
        return [[min(start + math.floor(k * step), last) for k in range(self.clip_len)] for start in starts]


class VideoReader:
    """One video file, decoded lazily. Use as a context manager (or call `close`). Its frame size is
    checked against `limits` (see the module docstring) before any frame is decoded."""

    def __init__(self, path: str | os.PathLike, limits: DecodeLimits | None = DEFAULT_LIMITS):
        av = _av()
        self.path = str(path)
        try:
            self.container = av.open(self.path, metadata_errors="ignore")
        except FileNotFoundError:
            raise VideoError(self.path, "no such file; check the path") from None
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise VideoError(self.path, f"not a readable video ({_reason(e)})") from None
        try:
            self.info = self._probe()
            if limits is not None:
                self._check(limits)
        except BaseException:
            self.container.close()
            raise

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def _probe(self) -> VideoInfo:
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams})
            has = f"only {' and '.join(kinds)}" if kinds else "no streams"
            raise VideoError(self.path, f"no video stream ({has}); a video file is needed")
        stream = self.stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"  # frame- and slice-threaded decoding where the codec has it
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise VideoError(self.path, "the video stream has no frame rate; the file is damaged")
        fps = float(rate)
        frames = int(stream.frames or 0)
        if frames <= 0 and stream.duration and stream.time_base:
            frames = round(float(stream.duration * stream.time_base) * fps)
        if frames <= 0 and self.container.duration:
            frames = round(self.container.duration / _av().time_base * fps)
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if frames <= 0 or width <= 0 or height <= 0:
            raise VideoError(self.path, "the video stream has no frames")
        self.start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        return VideoInfo(self.path, fps, frames, width, height)

    def _check(self, limits: DecodeLimits) -> None:
        width, height = self.info.width, self.info.height
        pixels = width * height
        if limits.max_pixels is not None and pixels > limits.max_pixels:
            raise VideoError(self.path, f"frames of {width}x{height} = {pixels:,} pixels are over the limit of "
                                        f"{limits.max_pixels:,}; raise it (--decode-limits pixels=N) if you trust "
                                        f"the file")
        if limits.max_bytes is not None and pixels * FRAME_BYTES_PER_PIXEL > limits.max_bytes:
            raise VideoError(self.path, f"a decoded {width}x{height} frame takes {pixels * FRAME_BYTES_PER_PIXEL:,} "
                                        f"bytes, over the limit of {limits.max_bytes:,} (--decode-limits bytes=N)")

    def frames(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(index, (H, W, 3) uint8 RGB) for each index of `indices` (ascending; repeats yielded
        again), decoding forward and seeking over gaps longer than `SEEK_GAP_S`.

        Raises `VideoError` when the file ends (or breaks) well before a wanted frame."""
        av = _av()
        wanted = list(indices)
        if any(b < a for a, b in zip(wanted, wanted[1:], strict=False)):
            raise ValueError("frame indices must be ascending")
        pos, last, decoded = 0, None, -1
        gap = max(1, round(SEEK_GAP_S * self.info.fps))
        seek_to: int | None = None
        if wanted and wanted[0] > gap:
            seek_to = wanted[0]
        while pos < len(wanted):
            if seek_to is not None:
                self._seek(seek_to)
                seek_to = None
            restarted = False
            try:
                for frame in self.container.decode(self.stream):
                    index = self._index(frame, decoded)
                    decoded = index
                    while pos < len(wanted) and wanted[pos] <= index:
                        # a frame at or before the wanted time: the one showing then (torchvision's rule)
                        chosen = frame if wanted[pos] == index or last is None else last
                        yield wanted[pos], chosen.to_ndarray(format="rgb24")
                        pos += 1
                    if pos == len(wanted):
                        return
                    last = frame
                    if wanted[pos] - index > gap:
                        seek_to, last, restarted = wanted[pos], None, True
                        break
            except av.FFmpegError as e:
                if pos < len(wanted) and decoded < 0:
                    raise VideoError(self.path, f"corrupt video: no frame decodes ({_reason(e)})") from None
                raise VideoError(self.path, f"truncated or corrupt video: decoding failed after frame {decoded} "
                                 f"of {self.info.num_frames} ({_reason(e)})") from None
            if restarted:
                continue
            break  # the end of the stream
        if pos == len(wanted):
            return
        if decoded < 0:
            raise VideoError(self.path, "no frames decode (an empty or corrupt video stream)")
        if last is not None and decoded >= self.info.num_frames - 1 - END_SLACK:
            while pos < len(wanted):  # the header's last frame or two were not there: hold the last one
                yield wanted[pos], last.to_ndarray(format="rgb24")
                pos += 1
            return
        raise VideoError(self.path, f"truncated video: it ends at frame {decoded + 1} of the {self.info.num_frames} "
                         f"its header announces")

    def _seek(self, index: int) -> None:
        stream = self.stream
        seconds = self.start + index / self.info.fps
        self.container.seek(int(seconds / stream.time_base), stream=stream, backward=True, any_frame=False)

    def _index(self, frame, previous: int) -> int:
        """The frame's position in the stream, from its timestamp (or one past the previous one)."""
        if frame.pts is None or frame.time is None:
            return previous + 1
        return max(round((float(frame.time) - self.start) * self.info.fps), 0)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """The header's description of a video (frame rate, frames, size); `VideoError` if it has none."""
    with VideoReader(path) as reader:
        return reader.info


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """`VideoReader(path).frames(indices)`, closing the file when done."""
    with VideoReader(path) as reader:
        yield from reader.frames(indices)


class ClipTransform:
    """A video recipe (`Preprocess` of kind VideoClassification) on decoded frames, as torchvision's
    `VideoClassification` preset computes it: bilinear resize without antialiasing (the preset's
    `antialias=False`, which the weights were evaluated with) rounded back to uint8, centre crop,
    scale to [0, 1], normalise. Frames are resized one at a time as they are decoded, so a clip of a
    720p video holds small frames only; `stack` makes the (C, T, H, W) clip."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(-1, 1, 1, 1)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32).view(-1, 1, 1, 1)

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) a frame is resized to."""
        p = self.preprocess
        if p.resize_hw is not None:
            return p.resize_hw
        if p.resize_size is not None:
            w, h = resized_size(width, height, p.resize_size)
            return h, w
        return height, width

    def frame(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, h, w) uint8, resized and centre-cropped."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        h, w = self.size(x.shape[2], x.shape[1])
        if (h, w) != tuple(x.shape[1:]):
            mode = self.preprocess.interpolation
            resized = F.interpolate(x[None].float(), size=(h, w), mode=mode,
                                    align_corners=False if mode in ("bilinear", "bicubic") else None, antialias=False)
            if mode == "bicubic":
                resized = resized.clamp(0, 255)
            x = resized.round()[0].to(torch.uint8)
        return _center_crop(x, self.preprocess.crop_size)

    def stack(self, frames: Sequence[torch.Tensor]) -> torch.Tensor:
        """Transformed frames -> the normalised (3, T, h, w) float32 clip."""
        clip = torch.stack(list(frames), dim=1).float().div_(255.0)
        return clip.sub_(self.mean).div_(self.std)

    def __call__(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        return self.stack([self.frame(f) for f in frames])


def _center_crop(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """(C, H, W) centre crop to size x size, zero-padding a smaller frame first (torchvision's rule)."""
    if size is None:
        return x
    _, h, w = x.shape
    if h < size or w < size:
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        _, h, w = x.shape
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[:, top:top + size, left:left + size]


@dataclass(frozen=True)
class Clip:
    """One sampled clip of a video: its frames' positions and the preprocessed (C, T, H, W) tensor."""

    index: int  # which clip of the video (0-based)
    frames: tuple[int, ...]  # source frame indices
    tensor: torch.Tensor
    fps: float

    @property
    def start_time(self) -> float:
        return self.frames[0] / self.fps

    @property
    def end_time(self) -> float:
        return (self.frames[-1] + 1) / self.fps


def read_clips(path: str | os.PathLike, preprocess: Preprocess, clips: int | None = None, *,
               transform: ClipTransform | None = None, limits: DecodeLimits | None = DEFAULT_LIMITS) -> Iterator[Clip]:
    """The evenly spaced clips of a video (`clips`, default the recipe's own count), in order, each
    preprocessed. Frames are decoded once even where clips overlap, and only the transformed frames
    of clips not yet complete are held."""
    sampling = ClipSampling.of(preprocess)
    transform = transform or ClipTransform(preprocess)
    with VideoReader(path, limits) as reader:
        plan = sampling.clip_indices(reader.info, clips or preprocess.clips or 1)
        wanted = sorted({i for clip in plan for i in clip})
        held: dict[int, torch.Tensor] = {}
        next_clip = 0
        for index, rgb in reader.frames(wanted):
            held[index] = transform.frame(rgb)
            while next_clip < len(plan) and plan[next_clip][-1] <= index:
                frames = plan[next_clip]
                yield Clip(next_clip, tuple(frames), transform.stack([held[i] for i in frames]), reader.info.fps)
                next_clip += 1
                keep_from = plan[next_clip][0] if next_clip < len(plan) else math.inf
                for i in [i for i in held if i < keep_from]:
                    del held[i]


def frame_pairs(path: str | os.PathLike, every: int = 1, *,
                gap: int = 1) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(index, frame i, frame i + gap) for i = 0, every, 2 * every, ...: consecutive frames for
    optical flow, decoded lazily (two frames held at a time)."""
    check_at_least("every", every, 1)
    check_at_least("gap", gap, 1)
    with VideoReader(path) as reader:
        n = reader.info.num_frames
        starts = list(range(0, max(n - gap, 0), every))
        wanted = sorted({i for s in starts for i in (s, s + gap)})
        pending: dict[int, np.ndarray] = {}
        for index, rgb in reader.frames(wanted):
            pending[index] = rgb
            first = index - gap
            if first in pending and first % every == 0:
                yield first, pending[first], rgb
            for i in [i for i in pending if i <= index - gap]:
                del pending[i]


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text).strip().splitlines()[0][:200]


# -- batches of whole videos, decoded in worker processes --------------------------------------

@dataclass
class VideoBatch(ImageBatch):
    """An `ImageBatch` whose `images` are (videos, clips, C, T, H, W): every clip of each video."""

    spans: list[list[tuple[float, float]]] = field(default_factory=list)  # (start, end) seconds of each clip


class VideoFiles(Dataset):
    """Position i -> (i, (clips, C, T, H, W) tensor, None, spans), or (i, None, reason, []) for a bad file."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Preprocess, clips: int | None = None,
                 limits: DecodeLimits | None = DEFAULT_LIMITS):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.clips = clips
        self.limits = limits
        self.transform = ClipTransform(preprocess)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            got = list(read_clips(self.paths[i], self.preprocess, self.clips, transform=self.transform,
                                  limits=self.limits))
        except VideoError as e:
            return i, None, e.reason, []
        return i, torch.stack([c.tensor for c in got]), None, [(c.start_time, c.end_time) for c in got]


def _collate(items) -> VideoBatch:
    good = [(i, x, spans) for i, x, _, spans in items if x is not None]
    return VideoBatch(indices=[i for i, _, _ in good], images=torch.stack([x for _, x, _ in good]) if good else None,
                      failures=[(i, reason) for i, _, reason, _ in items if reason is not None],
                      spans=[spans for _, _, spans in good])


def video_batches(paths: Sequence[str | os.PathLike], preprocess: Preprocess, *, clips: int | None = None,
                  batch_size: int = 1, num_workers: int | None = None,
                  index_batches: Sequence[Sequence[int]] | None = None, limits: DecodeLimits | None = DEFAULT_LIMITS,
                  **_image_options) -> Iterator[VideoBatch]:
    """Yield the videos of `paths` as batches of whole videos (`batch_size` videos each, or the
    given `index_batches`), every video cut into its evenly spaced clips and preprocessed, decoded in
    `num_workers` processes (None: one per spare core; 0: here), each frame within `limits` (a video
    over them is a failure). Options that only images have (`fast`, `pin_memory`, `reuse_buffers`)
    are accepted and ignored, so this stands in for `image_batches`. Memory: the clips of the
    batches in flight, whatever the videos' lengths."""
    _av()  # a missing PyAV is one clear error, not a failure per file
    check_at_least("batch_size", batch_size, 1)
    check_at_least("num_workers", num_workers, 0, optional=True)
    if index_batches is None:
        index_batches = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    groups = [list(b) for b in index_batches if len(b)]
    if not groups:
        return
    if num_workers is None:
        num_workers = default_num_workers(len(groups))
    loader = DataLoader(VideoFiles(paths, preprocess, clips, limits), batch_sampler=groups, num_workers=num_workers,
                        collate_fn=_collate, worker_init_fn=fix_mmap_threshold if num_workers else None,
                        prefetch_factor=1 if num_workers else None)
    yield from loader
