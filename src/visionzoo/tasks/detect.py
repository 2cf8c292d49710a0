"""Detect objects: files, folders, globs, lists in; boxes, class names and scores out, bad files reported.

`iter_detect` streams one result per input (a `Detections` or a `Failure`), so any number of files
takes bounded memory; `detect` collects them. Boxes are in each image's own pixels,
`[x1, y1, x2, y2]`; labels are the weights' class names (COCO's 91, with its "N/A" gaps, for the
published detectors). With `draw_dir`, each image is also written there as a PNG with its boxes,
labels and scores drawn in colours that stay readable on any background. The detectors run in
PyTorch (the torch backend), or as their exported ONNX graph (`runtime/detection_graph.py`: the
resize, heads, decoding and NMS all in the file, exported once and cached) on ONNX Runtime or
OpenVINO; an exported `.onnx` detector can be given as the model. `auto` is torch for a model and
OpenVINO (else ONNX Runtime) for a file, as for the other non-classifiers (`runtime/autotune.py`).
Faster and Mask R-CNN run on the runtimes too (`runtime/rcnn_graph.py`: Mask R-CNN's masks come
out of the graph in their boxes and are pasted into the image after it); Keypoint R-CNN runs in
PyTorch only.

Mask R-CNN's instance masks (probabilities thresholded at 0.5) are reported in COCO's run-length
encoding (pycocotools, the `detection` extra) and drawn as one translucent, outlined overlay per
instance, each in its own colour; Keypoint R-CNN's keypoints are listed by name with their
scores and drawn as a skeleton (COCO's person skeleton).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..data.inputs import Failure, expand_inputs
from ..data.instance_masks import MASK_THRESHOLD, encode_masks
from ..data.loader import prepare_image
from ..data.preprocess import Preprocess
from ..enums import Precision, Task
from ..errors import InputError
from ..factory import resolve_model
from ..fileutil import atomic_path
from ..models.base import VisionModel
from ..models.detection.rcnn import COCO_PERSON_SKELETON
from ..runtime.backends import Backend, is_model_file, open_runner
from ..runtime.detection_graph import graph_detections
from ..runtime.options import InferenceOptions
from ..runtime.torch_opt import optimize_for_inference

DEFAULT_DETECTOR = "ssdlite320_mobilenet_v3_large"
# distinct, saturated colours; the label's text is black or white, whichever contrasts more
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))
MASK_OPACITY = 0.45  # of an instance's colour over the image


@dataclass(frozen=True)
class Keypoint:
    name: str
    x: float
    y: float
    score: float  # the heatmap's logit at the keypoint (above 0: likely visible)

    def to_dict(self) -> dict:
        return {"name": self.name, "x": self.x, "y": self.y, "score": self.score}


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    index: int  # the class index the model predicts (COCO's category id for the published detectors)
    label: str
    score: float
    mask: dict | None = None  # instance segmentation: COCO RLE, {"size": [height, width], "counts": str}
    keypoints: tuple[Keypoint, ...] | None = None  # keypoint detection: one per keypoint name

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"box": [self.x1, self.y1, self.x2, self.y2], "index": self.index, "label": self.label,
                             "score": self.score}
        if self.mask is not None:
            d["mask"] = self.mask
        if self.keypoints is not None:
            d["keypoints"] = [k.to_dict() for k in self.keypoints]
        return d


@dataclass(frozen=True)
class Detections:
    path: str
    width: int
    height: int
    boxes: tuple[Box, ...]  # highest score first
    drawn: str | None = None  # the annotated PNG, when one was written

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"path": self.path, "width": self.width, "height": self.height,
                             "detections": [b.to_dict() for b in self.boxes]}
        if self.drawn is not None:
            d["drawn"] = self.drawn
        return d


def iter_detect(inputs: Sequence[str | os.PathLike], model: str | os.PathLike | VisionModel = DEFAULT_DETECTOR,
                threshold: float = 0.5, *, draw_dir: str | os.PathLike | None = None,
                options: InferenceOptions | None = None, **settings: Any) -> Iterator[Detections | Failure]:
    """Yield `Detections` or a `Failure` for every input, files in input order.

    Args:
        inputs: files, folders, globs, `@LIST` files, CSV datasets (see `expand_inputs`).
        model: a detector's name (`arch[.TAG]`, default weights), a bundle folder or a model instance.
        threshold: the lowest score reported (the model's own `score_thresh` filters before NMS).
        draw_dir: also write each image with its boxes drawn, as `<draw_dir>/<name>.png`.
        options: `InferenceOptions` (or its fields as keywords): `batch_size` (images per forward pass
            of the torch backend; the runtimes take one image at a time), `max_pixels`, `device`,
            `threads`, `backend` (torch, onnxruntime, openvino or auto); the precision must be fp32
            (or auto, which is fp32 for detectors).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be a score between 0 and 1, got {threshold!r}")
    opts = InferenceOptions.of(options, **settings)
    if opts.precision not in (Precision.AUTO, Precision.FP32):  # auto is fp32 for detectors today
        raise InputError(f"detect runs detectors in fp32 only, not {opts.precision.value}; drop --precision")
    run: Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]
    named: Any = None  # the model in PyTorch, which names its keypoints (exported graphs give boxes and masks only)
    if is_model_file(model) or opts.backend in (Backend.ONNXRUNTIME, Backend.OPENVINO):
        run, preprocess, classes = _on_runtime(model, opts)
    else:
        if isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx":
            raise InputError(f"{model}: no such model file")
        net = resolve_model(model)
        _check_detector(net.task, net.arch or type(net).__name__)
        card = net.require_card()
        net = named = torch_detector(net, opts.torch_device, copy=isinstance(model, VisionModel))
        preprocess, classes = card.preprocess, card.classes

        def run(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            return net([image.to(opts.torch_device) for image in images])

    transform = preprocess.transforms()
    files, failures = expand_inputs(list(inputs))
    yield from failures
    names = _drawing_names(files) if draw_dir is not None else {}
    with torch.inference_mode():
        for start in range(0, len(files), opts.batch_size):
            chunk = list(range(start, min(start + opts.batch_size, len(files))))
            results: dict[int, Detections | Failure] = {}
            ready: list[tuple[int, torch.Tensor]] = []
            for i in chunk:
                image, reason, _ = prepare_image(files[i], transform, limits=opts.limits)
                if image is None:
                    results[i] = Failure(str(files[i]), reason or "could not be read")
                else:
                    ready.append((i, image))
            if ready:
                outputs = run([image for _, image in ready])
                for (i, image), out in zip(ready, outputs, strict=True):
                    boxes = _with_instances(_boxes(out, threshold, classes), out, threshold, named)
                    drawn = None
                    if draw_dir is not None:
                        drawn = str(Path(draw_dir) / names[i])
                        _save_png(draw_detections(image, boxes, _instance_masks(out, threshold),
                                                  keypoint_skeleton(named)), drawn)
                    results[i] = Detections(str(files[i]), int(image.shape[-1]), int(image.shape[-2]), boxes, drawn)
            for i in chunk:
                yield results[i]


def torch_detector(net: VisionModel, device: torch.device | str = "cpu", *, copy: bool = True) -> VisionModel:
    """The detector as `detect` runs it on the torch backend: in eval mode, its (Frozen)BatchNorms
    folded into the convolutions before them and its weights channels-last (`torch_opt.py`): the same
    detections to float rounding (the float64 fixtures still match to 1e-10), Mask R-CNN a fifth
    faster on CPU (2,634 against 3,335 ms, `benchmarks/rcnn_speed.py`). `copy`: leave `net` as it is
    (a caller's model); False folds it in place."""
    return optimize_for_inference(net, inplace=not copy).to(device)


def _check_detector(task: Task, name: str) -> None:
    if task is not Task.DETECTION:
        raise InputError(f"{name} is a {task.value} model; detect needs a detector (`visionzoo models --task "
                         f"detection`)")


def _on_runtime(model: str | os.PathLike | VisionModel, opts: InferenceOptions
                ) -> tuple[Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]], Preprocess,
                           tuple[str, ...] | None]:
    """(run, preprocessing, class names) of the detector's exported graph on ONNX Runtime or OpenVINO."""
    source: str | os.PathLike | VisionModel = model
    if is_model_file(model):
        from ..runtime.export import read_onnx_info

        info = read_onnx_info(model)
        if info is not None:  # (a file without the record is refused by open_runner)
            _check_detector(info.task, str(model))  # before `auto` measures anything
    else:
        source = resolve_model(model)
        _check_detector(source.task, source.arch or type(source).__name__)  # before exporting anything
    runner = open_runner(source, opts.backend, threads=opts.threads, device=opts.device, precision=Precision.FP32)
    _check_detector(runner.task, runner.arch)

    def run(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        results = []
        for image in images:  # one image per run: the graph's detections per image vary in number
            # (a Mask R-CNN's masks come out in their boxes and are pasted into the image here)
            results.append(graph_detections(runner(image[None].float()), int(image.shape[-2]), int(image.shape[-1])))
        return results

    return run, runner.preprocess, runner.categories


def detect(inputs: Sequence[str | os.PathLike] | str | os.PathLike,
           model: str | os.PathLike | VisionModel = DEFAULT_DETECTOR, threshold: float = 0.5, *,
           draw_dir: str | os.PathLike | None = None, options: InferenceOptions | None = None,
           **settings: Any) -> list[Detections | Failure]:
    """Detect objects in images. Returns one `Detections` (or `Failure`, for a bad input) per file; the
    arguments are `iter_detect`'s."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return list(iter_detect(inputs, model, threshold, draw_dir=draw_dir, options=options, **settings))


RESULTS_FILE = "coco_results.json"


def coco_results(detections: Sequence[Detections]) -> list[dict[str, Any]]:
    """The detections in COCO's results format (what `COCO.loadRes` and `COCOeval` read): one entry
    per box with `image_id` (the image's 1-based position in `detections`), `category_id` (the
    model's class index: COCO's category id for the published detectors), `bbox` as x, y, width,
    height, `score`, and `file_name` to find the image; `segmentation` (RLE) and `keypoints` (x, y,
    visibility 1 for each) where the model predicts them."""
    rows = []
    for image_id, found in enumerate(detections, start=1):
        for b in found.boxes:
            row: dict[str, Any] = {"image_id": image_id, "file_name": found.path, "category_id": b.index,
                                   "bbox": [round(b.x1, 2), round(b.y1, 2), round(b.x2 - b.x1, 2),
                                            round(b.y2 - b.y1, 2)], "score": round(b.score, 5)}
            if b.mask is not None:
                row["segmentation"] = b.mask
            if b.keypoints is not None:
                row["keypoints"] = [v for k in b.keypoints for v in (round(k.x, 2), round(k.y, 2), 1)]
            rows.append(row)
    return rows


def write_coco_results(detections: Sequence[Detections], folder: str | os.PathLike) -> Path:
    """Write `coco_results(detections)` to `folder/coco_results.json` (atomically); returns its path."""
    import json

    path = Path(folder).expanduser() / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(coco_results(detections)) + "\n")
    return path


def _boxes(out: dict[str, torch.Tensor], threshold: float, classes: Sequence[str] | None) -> tuple[Box, ...]:
    keep = out["scores"] >= threshold
    rows = zip(out["boxes"][keep].tolist(), out["labels"][keep].tolist(), out["scores"][keep].tolist(), strict=True)
    return tuple(Box(x1, y1, x2, y2, label, _class_name(classes, label), score)
                 for (x1, y1, x2, y2), label, score in rows)


def _instance_masks(out: dict[str, torch.Tensor], threshold: float) -> torch.Tensor | None:
    """The (D, H, W) boolean masks of the detections at or above `threshold` (None: the model has no masks)."""
    if "masks" not in out:
        return None
    return out["masks"][out["scores"] >= threshold, 0] >= MASK_THRESHOLD


def _with_instances(boxes: tuple[Box, ...], out: dict[str, torch.Tensor], threshold: float, net: Any
                    ) -> tuple[Box, ...]:
    """`boxes` with their masks (COCO RLE) and keypoints (named), where the model predicts them."""
    masks = _instance_masks(out, threshold)
    rles: list[dict | None] = [None] * len(boxes)
    if masks is not None and len(boxes):
        rles = list(encode_masks(masks))
    keypoints: list[tuple[Keypoint, ...] | None] = [None] * len(boxes)
    if "keypoints" in out:
        keep = out["scores"] >= threshold
        points, scores = out["keypoints"][keep].tolist(), out["keypoints_scores"][keep].tolist()
        names = keypoint_names(net, len(points[0]) if points else 0)
        keypoints = [tuple(Keypoint(n, x, y, s) for n, (x, y, _), s in zip(names, kps, kp_scores, strict=True))
                     for kps, kp_scores in zip(points, scores, strict=True)]
    if masks is None and "keypoints" not in out:
        return boxes
    return tuple(dataclasses.replace(b, mask=m, keypoints=k) for b, m, k in zip(boxes, rles, keypoints, strict=True))


def keypoint_names(net: Any, count: int) -> tuple[str, ...]:
    """The names of `net`'s `count` keypoints: a Keypoint R-CNN's own (`RCNN.keypoint_names`: a fine-tuned
    bundle's recorded ones, else COCO's person keypoints for 17); numbered for anything else."""
    names = getattr(net, "keypoint_names", None)
    if names is not None and len(names) == count:
        return tuple(names)
    return tuple(f"keypoint_{j}" for j in range(count))


def keypoint_skeleton(net: Any) -> tuple[tuple[str, str], ...]:
    """The pairs of keypoint names joined when drawing `net`'s keypoints (`RCNN.keypoint_skeleton`: a
    fine-tuned bundle's recorded one, else COCO's for COCO's names); COCO's for anything else."""
    names, pairs = getattr(net, "keypoint_names", None), getattr(net, "keypoint_skeleton", None)
    if names is None or pairs is None:
        return COCO_PERSON_SKELETON
    return tuple((names[a], names[b]) for a, b in pairs)


def _class_name(classes: Sequence[str] | None, index: int) -> str:
    return classes[index] if classes is not None and 0 <= index < len(classes) else f"class_{index}"


def _drawing_names(files: Sequence[Path]) -> dict[int, str]:
    """A PNG name per input: its stem, numbered where two inputs share one."""
    names: dict[int, str] = {}
    seen: set[str] = set()
    for i, f in enumerate(files):
        name, n = f"{f.stem}.png", 1
        while name in seen:
            n += 1
            name = f"{f.stem}_{n}.png"
        seen.add(name)
        names[i] = name
    return names


def _save_png(image: Image.Image, path: str) -> None:
    with atomic_path(path) as tmp:  # a reader never sees half an image
        image.save(tmp, format="PNG")


def draw_detections(image: torch.Tensor, boxes: Sequence[Box], masks: torch.Tensor | None = None,
                    skeleton: Sequence[tuple[str, str]] = COCO_PERSON_SKELETON) -> Image.Image:
    """The image (CHW in [0, 1]) with `boxes` drawn: each box outlined in its class's colour over a dark
    rim, and its label and score on a filled tag of that colour, so both read on light and dark areas.
    `masks` ((D, H, W) booleans, one per box) are laid under the boxes, each instance in its own colour,
    outlined; boxes with keypoints get their `skeleton` (pairs of keypoint names joined by lines)."""
    pixels = image.detach().cpu().clamp(0, 1).permute(1, 2, 0)
    if masks is not None and len(masks):
        pixels = overlay_masks(pixels, masks.cpu())
    canvas = Image.fromarray(np.ascontiguousarray((pixels * 255).round().to(torch.uint8).numpy()), "RGB")
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        if box.keypoints:
            draw_skeleton(draw, box.keypoints, max(2, round(min(canvas.size) / 200)), skeleton)
    width = max(2, round(min(canvas.size) / 250))
    font = _font(max(11, round(min(canvas.size) / 40)))
    for box in reversed(boxes):  # the best drawn last, on top
        colour = PALETTE[box.index % len(PALETTE)]
        xy = (box.x1, box.y1, box.x2, box.y2)
        draw.rectangle(xy, outline=(0, 0, 0), width=width + 2)
        # (inset by a pixel, except for boxes under two pixels across)
        draw.rectangle((xy[0] + 1, xy[1] + 1, max(xy[0] + 1, xy[2] - 1), max(xy[1] + 1, xy[3] - 1)), outline=colour,
                       width=width)
        text = f"{box.label} {box.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_h = bottom - top + 4
        y = box.y1 - tag_h if box.y1 - tag_h >= 0 else box.y1
        draw.rectangle((box.x1, y, box.x1 + right - left + 6, y + tag_h), fill=colour, outline=(0, 0, 0))
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((box.x1 + 3 - left, y + 2 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255),
                  font=font)
    return canvas


def overlay_masks(pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) pixels in [0, 1] with each of the (D, H, W) boolean masks blended in in its own colour (the
    instance's, not its class's, so that neighbours of one class stay apart), its edge drawn solid."""
    colours = torch.tensor(PALETTE, dtype=pixels.dtype) / 255
    out = pixels.clone()
    for k, mask in reversed(list(enumerate(masks))):  # the best on top
        colour = colours[k % len(colours)]
        out[mask] = (1 - MASK_OPACITY) * out[mask] + MASK_OPACITY * colour
        inner = mask.clone()  # pixels whose four neighbours are all in the mask
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        out[mask & ~inner] = colour
    return out


def draw_skeleton(draw: ImageDraw.ImageDraw, keypoints: Sequence[Keypoint], width: int,
                  skeleton: Sequence[tuple[str, str]] = COCO_PERSON_SKELETON) -> None:
    """The keypoints likely visible (score above 0) as dots, and `skeleton` (COCO's by default) between those
    pairs."""
    seen = {k.name: k for k in keypoints if k.score > 0}
    for a, b in skeleton:
        if a in seen and b in seen:
            line = (seen[a].x, seen[a].y, seen[b].x, seen[b].y)
            draw.line(line, fill=(0, 0, 0), width=width + 2)
            draw.line(line, fill=(255, 255, 255), width=width)
    r = width + 1
    for j, k in enumerate(keypoints):
        if k.score > 0:
            draw.ellipse((k.x - r, k.y - r, k.x + r, k.y + r), fill=PALETTE[j % len(PALETTE)], outline=(0, 0, 0))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: one bitmap size
        return ImageFont.load_default()
