"""Segment images: files, folders, globs, lists in; per image a class mask, an overlay and the share of each class.

    results = segment("photos/", model="lraspp_mobilenet_v3_large", out="seg/")
    results[0].fractions          # {'__background__': 0.71, 'person': 0.26, 'bicycle': 0.03}

For every input image, written under `out` with the image's name (or, when names repeat, its path
relative to the folder the inputs share):
  - `masks/<name>.png`: the class index of every pixel at the image's own size, a palette PNG
    in the Pascal VOC colours (any PNG reader gives the indices, any viewer the colours);
  - `overlays/<name>.png`: the image blended with the coloured classes (a class named
    `background` or `__background__` is left unpainted) and a legend of the classes present,
    at most `overlay_size` pixels on its longer side;
  - a row in `segments.jsonl`: the image, its size, its files and the fraction of its pixels
    in each class present.

How: images are decoded and preprocessed in worker processes (`data/loader.py`: the fast
reduced-scale JPEG decode unless `fast=False`), resized as the model's recipe says (the
shorter side to 520 for torchvision's weights) and run on the chosen backend. A batch holds
images of different sizes; the model runs once per size within it (grouped, not padded:
padding would change what the heads' global pooling sees, so an image's mask would depend on
its batch). The labels at the image's own size come from `ops.resize_argmax`, equal to
resizing the scores and taking the arg-max, at the cost of one label per pixel. PNGs are
encoded in background threads while the model runs on the next images. A file that cannot
be read is reported (a `Failure`) and the run goes on.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..data.images import draft_info
from ..data.inputs import Failure, expand_inputs
from ..data.loader import available_cpus, image_batches
from ..enums import Task
from ..errors import InputError
from ..fileutil import atomic_path
from ..models.base import VisionModel
from ..ops.labels import resize_argmax
from ..runtime.backends import Runner
from ..runtime.options import InferenceOptions

DEFAULT_SEGMENTATION_MODEL = "lraspp_mobilenet_v3_large"
DEFAULT_BATCH = 4  # photo-sized inputs: a batch of 4 at 520 x 693 already holds 90 MB of scores
OVERLAY_SIZE = 1024  # longer side of the overlays (0: the image's own size)
ALPHA = 0.5  # opacity of the class colours on the overlay
BACKGROUND_NAMES = ("background", "__background__")  # classes the overlay leaves unpainted
MASKS, OVERLAYS, ROWS = "masks", "overlays", "segments.jsonl"


@dataclass(frozen=True)
class Segmentation:
    path: str
    width: int  # the image's size (upright), and its mask's
    height: int
    fractions: dict[str, float]  # class name -> share of the image's pixels, for the classes present, largest first
    mask: str | None = None  # the mask PNG written
    overlay: str | None = None  # the overlay PNG written
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)  # (H, W) class indices, without `out`

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "width": self.width, "height": self.height, "mask": self.mask,
                "overlay": self.overlay, "fractions": self.fractions}


def voc_palette(n: int = 256) -> list[int]:
    """Pascal VOC's colour map, as a flat [r, g, b, ...] list: the bits of each index spread over the
    channels (index 1 is dark red, 15 a pinkish person colour, 255 the cream of ignored borders)."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


PALETTE = voc_palette()


class _Extras:
    """Run in the decoding worker: the image's full (upright) size, and the image at the overlay's size."""

    def __init__(self, overlay_size: int | None):
        self.overlay_size = overlay_size

    def __call__(self, img: Image.Image) -> tuple[tuple[int, int], np.ndarray | None]:
        draft = draft_info(img)
        full = draft.full_size if draft is not None else img.size
        if self.overlay_size is None:
            return full, None
        size = _fit(full, self.overlay_size)
        base = img.resize(size, Image.Resampling.BILINEAR, box=draft.region if draft else None) \
            if size != img.size or draft is not None else img
        return full, np.asarray(base.convert("RGB"))


def _fit(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """`size` scaled down so that its longer side is at most `longest` (0: unchanged)."""
    w, h = size
    if not longest or max(w, h) <= longest:
        return w, h
    scale = longest / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def iter_segment(inputs: Sequence[str | os.PathLike], model: str | os.PathLike | VisionModel | Runner =
                 DEFAULT_SEGMENTATION_MODEL, out: str | os.PathLike | None = None, *, overlay: bool = True,
                 overlay_size: int = OVERLAY_SIZE, alpha: float = ALPHA, options: InferenceOptions | None = None,
                 **settings: Any) -> Iterator[Segmentation | Failure]:
    """Yield a `Segmentation` or a `Failure` for every input, files in input order.

    Args:
        inputs: files, folders, globs, `@LIST` files, CSV datasets (as `predict` takes).
        model: a segmentation model's name (`arch[.TAG]`, default weights), a bundle folder, a model,
            an ONNX file from `export`, or a `Runner`.
        out: the folder for the masks, overlays and `segments.jsonl`; None writes nothing and
            returns each mask as `Segmentation.labels` instead.
        overlay: also draw the overlays (with `out`).
        overlay_size: the overlays' longer side in pixels (0: the image's own size).
        alpha: opacity of the class colours on the overlays.
        options: how to decode, batch and run (`InferenceOptions`, or its fields as keywords:
            `batch_size` (default 4 here), `num_workers`, `fast`, `limits` (the decode budget;
            `max_pixels` sets its pixel limit), `device`, `backend`, `threads`, `precision`).
    """
    if options is None and "batch_size" not in settings:
        settings["batch_size"] = DEFAULT_BATCH
    if overlay_size < 0:
        raise InputError(f"overlay_size must be >= 0 (0: the image's own size), got {overlay_size}")
    if not 0 <= alpha <= 1:
        raise InputError(f"alpha must be between 0 and 1, got {alpha}")
    opts = InferenceOptions.of(options, **settings)
    runner = opts.open(model)
    if runner.task is not Task.SEGMENTATION:
        raise InputError(f"{runner.arch} is a {runner.task.value} model; segment needs a segmentation model "
                         f"(`visionzoo models --task segmentation`, or a bundle fine-tuned on masks)")
    if runner.num_classes > 256:
        raise InputError(f"{runner.arch} has {runner.num_classes} classes; a mask PNG holds at most 256")
    files, failures = expand_inputs(list(inputs))
    yield from failures
    if not files:
        return
    classes = list(runner.categories or [f"class_{i}" for i in range(runner.num_classes)])
    writer = _Writer(Path(out).expanduser(), files, classes, overlay, alpha) if out is not None else None
    extras = _Extras(overlay_size if writer is not None and overlay else None)
    batches = image_batches(files, runner.preprocess, batch_size=opts.batch_size, num_workers=opts.num_workers,
                            fast=opts.fast, limits=opts.limits, pin_memory=opts.torch_device.type == "cuda",
                            extra=extras)
    try:
        for batch in batches:
            done: dict[int, Segmentation | Failure | Future] = {i: Failure(str(files[i]), e) for i, e in batch.failures}
            for i, logits, (size, base) in _run(runner, batch):
                mask = resize_argmax(logits, size[::-1])
                fractions, labels = _fractions(mask, classes), mask.numpy()
                if writer is None:
                    done[i] = Segmentation(str(files[i]), size[0], size[1], fractions, labels=labels)
                else:
                    done[i] = writer.submit(i, labels, base, fractions)
            if writer is None:
                yield from (cast(Segmentation | Failure, done[i]) for i in sorted(done))  # no futures here
            else:
                writer.queue(done)
                yield from writer.ready()
        if writer is not None:
            yield from writer.finish()
    finally:
        if writer is not None:
            writer.close()


def segment(inputs: Sequence[str | os.PathLike] | str | os.PathLike,
            model: str | os.PathLike | VisionModel | Runner = DEFAULT_SEGMENTATION_MODEL,
            out: str | os.PathLike | None = None, **kwargs: Any) -> list[Segmentation | Failure]:
    """Segment images: one `Segmentation` (or `Failure`, for a bad input) per file; the arguments are
    `iter_segment`'s."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return list(iter_segment(inputs, model, out, **kwargs))


def _run(runner: Runner, batch) -> Iterator[tuple[int, torch.Tensor, Any]]:
    """(position, scores, extra) of each image of `batch`: the model runs once per image size in it."""
    if batch.images is None:
        return
    images = list(batch.images) if isinstance(batch.images, list) else [batch.images]
    if isinstance(batch.images, list):
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, x in enumerate(images):
            groups.setdefault(tuple(x.shape), []).append(k)
        runs = [(torch.stack([images[k] for k in ks]), ks) for ks in groups.values()]
    else:
        runs = [(batch.images, list(range(len(batch.indices))))]
    for x, ks in runs:
        logits = runner.logits(x)
        for row, k in enumerate(ks):
            yield batch.indices[k], logits[row], batch.extras[k]


def _fractions(labels: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    counts = torch.bincount(labels.reshape(-1), minlength=len(classes))[:len(classes)].numpy()
    order = np.argsort(-counts, kind="stable")
    total = labels.numel()
    return {classes[c]: float(counts[c] / total) for c in order if counts[c]}


# -- writing ---------------------------------------------------------------------------------------

class _Writer:
    """Masks and overlays encoded in background threads; results handed back in input order once written.

    `segments.jsonl` is written as the results come (under a temporary name, renamed when the run
    ends), each PNG under a temporary name renamed when complete."""

    def __init__(self, out: Path, files: Sequence[Path], classes: list[str], overlay: bool, alpha: float):
        self.out, self.files, self.classes, self.overlay, self.alpha = out, files, classes, overlay, alpha
        self.names = output_names(files)
        self.pending: deque[tuple[int, Segmentation | Failure | Future]] = deque()
        self.pool = ThreadPoolExecutor(max(1, min(4, available_cpus())), thread_name_prefix="visionzoo-png")
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{ROWS}.", suffix=".part", dir=out)
        self._rows_tmp = Path(tmp)
        self._rows_file: TextIO | None = os.fdopen(fd, "w", encoding="utf-8")

    def submit(self, i: int, labels: np.ndarray, base: np.ndarray | None, fractions: dict[str, float]) -> Future:
        return self.pool.submit(self._write, i, labels, base, fractions)

    def _write(self, i: int, labels: np.ndarray, base: np.ndarray | None, fractions: dict[str, float]) -> Segmentation:
        name = self.names[i]
        mask_path = self.out / MASKS / name
        with atomic_path(mask_path) as tmp:
            mask_image(labels).save(tmp, format="PNG", compress_level=1)
        overlay_path = None
        if self.overlay and base is not None:
            overlay_path = self.out / OVERLAYS / name
            with atomic_path(overlay_path) as tmp:
                draw_overlay(base, labels, self.classes, fractions, self.alpha).save(tmp, format="PNG",
                                                                                     compress_level=1)
        height, width = labels.shape
        return Segmentation(str(self.files[i]), width, height, fractions, str(mask_path),
                            str(overlay_path) if overlay_path else None)

    def queue(self, results: dict[int, Segmentation | Failure | Future]) -> None:
        self.pending.extend(sorted(results.items()))

    def ready(self, wait: bool = False) -> Iterator[Segmentation | Failure]:
        """The results at the front of the queue that are written (all of them with `wait`); at most a
        few batches' worth stay pending, so memory stays bounded."""
        while self.pending:
            _, item = self.pending[0]
            if isinstance(item, Future) and not item.done() and not wait and len(self.pending) <= 2 * DEFAULT_BATCH:
                return
            self.pending.popleft()
            result = item.result() if isinstance(item, Future) else item
            if isinstance(result, Segmentation) and self._rows_file is not None:
                self._rows_file.write(json.dumps(result.to_dict()) + "\n")
            yield result

    def finish(self) -> Iterator[Segmentation | Failure]:
        yield from self.ready(wait=True)
        if self._rows_file is not None:
            self._rows_file.close()
            self._rows_file = None
            os.replace(self._rows_tmp, self.out / ROWS)

    def close(self) -> None:
        if self._rows_file is not None:  # interrupted: no row file; the PNGs written so far stay
            self._rows_file.close()
            self._rows_file = None
            self._rows_tmp.unlink(missing_ok=True)
        self.pool.shutdown(wait=True, cancel_futures=True)


def output_names(files: Sequence[Path]) -> list[str]:
    """The output name of each file, `.png`: its own name when the names are distinct, else its path
    relative to the folder all the files share (the outputs mirror the input tree)."""
    names = [Path(f).with_suffix(".png").name for f in files]
    if len(set(names)) == len(names):
        return names
    absolute = [Path(os.path.abspath(f)) for f in files]
    common = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return [str(p.relative_to(common).with_suffix(".png")) for p in absolute]


def mask_image(labels: np.ndarray) -> Image.Image:
    """Class indices as a palette image in the VOC colours."""
    img = Image.fromarray(labels.astype(np.uint8, copy=False))
    img.putpalette(PALETTE)
    return img


def draw_overlay(base: np.ndarray, labels: np.ndarray, classes: Sequence[str], fractions: dict[str, float],
                 alpha: float = ALPHA) -> Image.Image:
    """The image (`base`, RGB, the overlay's size) with each class's colour blended in (background classes
    left as they are) and a legend of the classes present on its right."""
    image = Image.fromarray(base)
    small = Image.fromarray(labels.astype(np.uint8, copy=False)).resize(image.size, Image.Resampling.NEAREST)
    index = np.asarray(small)
    colours = np.asarray(PALETTE, dtype=np.uint8).reshape(-1, 3)[index]
    painted = np.ones(len(classes), dtype=bool)
    painted[[i for i, c in enumerate(classes) if c.lower() in BACKGROUND_NAMES]] = False
    paint = painted[np.minimum(index, len(classes) - 1)][..., None]
    blended = np.where(paint, base * (1 - alpha) + colours * alpha, base).round().astype(np.uint8)
    return _with_legend(Image.fromarray(blended), classes, fractions)


def _with_legend(image: Image.Image, classes: Sequence[str], fractions: dict[str, float]) -> Image.Image:
    size = max(11, min(24, image.height // 28))
    font = ImageFont.load_default(size=size)
    rows = [(c, f) for c, f in fractions.items()]
    line = size + size // 2
    width = max(int(font.getlength(f"{c}  {f:.1%}")) for c, f in rows) + 2 * size + size
    canvas = Image.new("RGB", (image.width + width, max(image.height, line * len(rows) + size)), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    palette = np.asarray(PALETTE).reshape(-1, 3)
    index = {c: i for i, c in enumerate(classes)}
    for k, (name, share) in enumerate(rows):
        x, y = image.width + size // 2, size // 2 + k * line
        colour = tuple(int(v) for v in palette[index[name]])
        draw.rectangle((x, y, x + size, y + size), fill=colour, outline=(0, 0, 0))
        draw.text((x + size + size // 2, y), f"{name}  {share:.1%}", fill=(0, 0, 0), font=font)
    return canvas
