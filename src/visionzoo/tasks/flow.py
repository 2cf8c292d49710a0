"""Optical flow: the motion between two frames (or between consecutive frames of a video) with RAFT.

    flow = estimate_flow("raft_large", "frame1.png", "frame2.png")        # (2, H, W) float32, pixels
    write_flow_outputs(flow, ["flow.png", "flow.npy"])                      # colour wheel + legend, raw
    for result in video_flow("raft_small", "clip.mp4", "flows/", every=5): ...

Frames go through the weights' recipe (scaled to [-1, 1]), are padded to multiples of 8 (RAFT
works at 1/8 scale; edge pixels repeated) and the flow is cropped back to the frames' size.

Memory. RAFT compares every pixel of frame 1 with every pixel of frame 2 at 1/8 scale: the
correlation volume holds (H/8 x W/8)^2 float32 values, plus a quarter more for its pyramid, so it
grows with the square of the pixel count: 1.0 GiB for a 1280x720 pair, 5.2 GiB for 1920x1080,
83 GiB for 4K. Frames with more than `max_pixels` pixels (default 1280x720 = 921,600) are therefore
resized down (same aspect ratio, antialiased) to fit, the flow is computed there and brought back
to the frames' size (bilinear, its vectors scaled by the same factors); `max_pixels=None` computes
at full size whatever it costs.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..data.flow import FLOW_SUFFIXES, color_wheel_legend, crop_padding, flow_to_color, pad_to_multiple, save_flow
from ..data.images import load_image
from ..data.video import frame_pairs
from ..enums import Task
from ..errors import ImageError, InputError, check_at_least
from ..fileutil import atomic_path
from ..models.base import VisionModel
from ..models.raft import RAFT

log = logging.getLogger("visionzoo")
DEFAULT_FLOW_MODEL = "raft_large"
MAX_FLOW_PIXELS = 1280 * 720  # larger frames are resized down to this many pixels (see the module docstring)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Frame = str | os.PathLike | Image.Image | np.ndarray  # a file, a PIL image, or (H, W, 3) uint8 RGB


def correlation_bytes(height: int, width: int) -> int:
    """Bytes of RAFT's correlation pyramid for frames of height x width (four levels, float32)."""
    cells = math.ceil(height / 8) * math.ceil(width / 8)
    return int(cells * cells * 4 * (1 + 1 / 4 + 1 / 16 + 1 / 64))


def load_flow_model(model: str | os.PathLike | VisionModel = DEFAULT_FLOW_MODEL, weights: str | None = None,
                    device: str | torch.device = "cpu") -> RAFT:
    """An optical-flow model in eval mode: a name (default weights), `arch.TAG`, or a model."""
    if isinstance(model, VisionModel):
        net = model
    else:
        from ..factory import create_model

        net = cast(VisionModel, create_model(model, weights=weights or "DEFAULT"))  # not features_only: a model
    if net.task is not Task.OPTICAL_FLOW or not isinstance(net, RAFT):
        raise InputError(f"{net.arch or type(net).__name__} is a {net.task.value} model; flow needs an optical "
                         f"flow model (raft_large, raft_small)")
    return net.eval().to(device)


def _rgb(frame: Frame) -> np.ndarray:
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise InputError(f"a frame array must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        return frame
    img = frame if isinstance(frame, Image.Image) else load_image(frame)
    return np.asarray(img.convert("RGB"))


def _to_input(rgb: np.ndarray, net: VisionModel, device: torch.device) -> torch.Tensor:
    """(1, 3, H, W) float32 in the weights' range ([-1, 1] for RAFT's)."""
    p = net.card.preprocess if net.card is not None else None
    mean = torch.tensor(p.mean if p is not None else (0.5,) * 3).view(1, 3, 1, 1)
    std = torch.tensor(p.std if p is not None else (0.5,) * 3).view(1, 3, 1, 1)
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float().div_(255.0)
    return x.sub_(mean).div_(std).to(device)


def working_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """The size the flow is computed at: the frames' own, or scaled down to at most `max_pixels`."""
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def estimate_flow(model: str | os.PathLike | VisionModel, frame1: Frame, frame2: Frame, *, updates: int = 12,
                  max_pixels: int | None = MAX_FLOW_PIXELS, device: str | torch.device = "cpu") -> np.ndarray:
    """The flow from `frame1` to `frame2`: (2, H, W) float32, in pixels (x to the right, y down), at the
    frames' size. `updates` is RAFT's number of refinement iterations."""
    check_at_least("updates", updates, 1)
    check_at_least("max_pixels", max_pixels, 64, optional=True, note=" (None: no limit)")
    net = load_flow_model(model, device=device)
    device = torch.device(device)
    a, b = _rgb(frame1), _rgb(frame2)
    if a.shape != b.shape:
        raise InputError(f"the frames differ in size ({a.shape[1]}x{a.shape[0]} and {b.shape[1]}x{b.shape[0]}, "
                         f"WxH); flow needs two frames of one size")
    height, width = a.shape[:2]
    x1, x2 = _to_input(a, net, device), _to_input(b, net, device)
    h, w = working_size(height, width, max_pixels)
    if (h, w) != (height, width):
        log.warning("frames of %dx%d are resized to %dx%d for the flow (RAFT's correlation volume would take "
                    "%.0f MiB; raise max_pixels to compute at full size)", width, height, w, h,
                    correlation_bytes(height, width) / 2**20)
        x1, x2 = (F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True) for x in (x1, x2))
    (p1, p2), pads = pad_to_multiple([x1, x2], 8, min_size=net.min_size)
    with torch.inference_mode():
        flow = net(p1, p2, num_flow_updates=updates, all_estimates=False)[-1]
    flow = torch.as_tensor(crop_padding(flow, pads))
    if (h, w) != (height, width):
        flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
        flow = flow * torch.tensor([width / w, height / h], device=flow.device).view(1, 2, 1, 1)
    return flow[0].float().cpu().numpy()


def flow_image(flow: np.ndarray, max_magnitude: float | None = None, legend: bool = True) -> Image.Image:
    """The flow's Middlebury colour image, with the colour wheel and the magnitude scale beside it."""
    colors = flow_to_color(flow, max_magnitude)
    if not legend:
        return Image.fromarray(colors)
    height, width = colors.shape[:2]
    scale = max_magnitude if max_magnitude is not None else float(np.nanmax(np.hypot(*np.nan_to_num(flow))) or 0)
    side = max(48, min(160, height // 2))
    panel = Image.new("RGB", (side + 16, max(height, side + 40)), "white")
    panel.paste(Image.fromarray(color_wheel_legend(side if side % 2 else side + 1)), (8, 8))
    ImageDraw.Draw(panel).text((8, side + 14), f"edge: {scale:.1f} px", fill="black")
    out = Image.new("RGB", (width + panel.width, max(height, panel.height)), "white")
    out.paste(Image.fromarray(colors), (0, 0))
    out.paste(panel, (width, 0))
    return out


def write_flow_outputs(flow: np.ndarray, outputs: Sequence[str | os.PathLike], *, max_magnitude: float | None = None,
                       legend: bool = True) -> list[Path]:
    """Write `flow` to each output by its suffix: an image (.png, .jpg, ...: colour wheel and legend) or
    the raw field (.npy, .flo). Each file is written to a temporary name and renamed."""
    written = []
    for out in map(Path, outputs):
        suffix = out.suffix.lower()
        if suffix in FLOW_SUFFIXES:
            written.append(save_flow(out, flow))
        elif suffix in IMAGE_SUFFIXES:
            image = flow_image(flow, max_magnitude, legend)
            with atomic_path(out) as tmp:
                image.save(tmp, format=Image.registered_extensions()[suffix])
            written.append(out)
        else:
            raise InputError(f"{out}: unknown output type {suffix!r}; use an image ({', '.join(IMAGE_SUFFIXES)}) or "
                             f"a flow file ({', '.join(FLOW_SUFFIXES)})")
    return written


@dataclass(frozen=True)
class VideoFlow:
    index: int  # the pair is frames (index, index + 1)
    files: tuple[Path, ...]
    max_magnitude: float


def video_flow(model: str | os.PathLike | VisionModel, video: str | os.PathLike, out_dir: str | os.PathLike, *,
               every: int = 1, raw: str | None = ".npy", updates: int = 12,
               max_pixels: int | None = MAX_FLOW_PIXELS, max_magnitude: float | None = None, legend: bool = True,
               device: str | torch.device = "cpu") -> Iterator[VideoFlow]:
    """The flow between frames i and i + 1 of a video for i = 0, every, 2 * every, ..., written to
    `out_dir` as `NNNNNN.png` (and `NNNNNN.npy` or `.flo`, `raw`; None: the image only). Frames are
    decoded lazily: two are held at a time."""
    check_at_least("every", every, 1)
    if raw is not None and raw.lower() not in FLOW_SUFFIXES:
        raise InputError(f"raw flow files are {' or '.join(FLOW_SUFFIXES)}, got {raw!r}")
    net = load_flow_model(model, device=device)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; for a video, --out is a folder (one image per frame pair)")
    out.mkdir(parents=True, exist_ok=True)
    for index, a, b in frame_pairs(video, every):
        flow = estimate_flow(net, a, b, updates=updates, max_pixels=max_pixels, device=device)
        names = [out / f"{index:06d}.png"] + ([out / f"{index:06d}{raw.lower()}"] if raw else [])
        files = write_flow_outputs(flow, names, max_magnitude=max_magnitude, legend=legend)
        yield VideoFlow(index, tuple(files), float(np.hypot(*flow).max()))


def frames_of(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """Two image files as RGB arrays (an unreadable one is an `InputError` naming it)."""
    if len(paths) != 2:
        raise InputError(f"flow takes two frames (images) or one video, got {len(paths)} inputs")
    try:
        return _rgb(paths[0]), _rgb(paths[1])
    except ImageError as e:
        raise InputError(f"{e.path}: {e.reason}") from None
