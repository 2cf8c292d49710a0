"""A segmentation dataset with exact masks: shapes painted onto real photos.

    write_shapes(folder, count=120, seed=0)     # folder/images/*.jpg, folder/masks/*.png, folder/classes.txt

Each image is a random crop (flipped half the time) of one of the sample photos
(`tests/photos.py`), resized to `size`, with one to four shapes painted on it: disks,
rectangles and triangles (the classes), later shapes covering earlier ones. As objects of a
real class tend to look alike, each class has its own range of hues (any saturation and
brightness within it), so that a few minutes of training on a CPU can learn the classes.
The mask is painted with the same geometry, without antialiasing on either, so every
pixel's class is exact: 0 (background) where the photo shows, else the class of the
top-most shape. A held-out split is the same recipe drawn with another seed.

    write_boxes(folder, count=160, seed=0)      # folder/images/*.jpg, folder/instances.json, folder/boxes.csv

is the detection set: the same shapes on the same photos, placed without overlapping so that
every shape is seen whole, each with its exact box (the extent of its geometry), written both
as COCO instances (categories 1-3) and as a `path,x1,y1,x2,y2,label` CSV; an image may hold
no shape (a negative: a row with empty box fields).

    write_boxes(folder, count=160, seed=0, keypoints=True)

adds exact keypoints (COCO's person-keypoints layout): the shapes are then disks, diamonds and
upright triangles (`KEYPOINT_CLASSES`), each with the compass points `KEYPOINT_NAMES` as
landmarks: a disk's top-, left-, right- and bottom-most points, a diamond's four corners, a
triangle's apex (top) and base corners (left, right; its bottom is not labelled, v 0). "left" is
the one on the image's left, so a flip swaps them (as COCO's left/right person keypoints).
"""
from __future__ import annotations

import colorsys
import csv
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .photos import photos

CLASSES = ("background", "disk", "rectangle", "triangle")
# what learns them in a few minutes on two CPU cores: LR-ASPP on EfficientNet-Lite0 (ImageNet weights), 128 x 128
# images, every layer trained for three epochs with one learning rate (measured: 0.84 mIoU on held-out images)
RECIPE = {"model": "efficientnet_lite0", "strategy": "full", "epochs": 3, "image_size": 128, "batch_size": 8,
          "lr": 3e-3, "warmup_epochs": 0.3, "lr_decay": 1.0, "scale_range": (1.0, 1.0), "num_workers": 0}
IGNORE = 255
HUES = {"disk": (-0.08, 0.08), "rectangle": (0.25, 0.42), "triangle": (0.55, 0.72)}  # red, green, blue


def write_shapes(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (128, 128), *,
                 max_shapes: int = 4, ignore_border: bool = False) -> Path:
    """`count` images (width x height `size`) with their masks and `classes.txt` in `folder`.

    With `ignore_border`, each shape's outline is marked 255 (ignore) in the mask, as VOC marks
    object borders."""
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in photos()]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for i in range(count):
        image = _background(rng.choice(sources), size, rng)
        mask = Image.new("L", size, 0)
        for _ in range(rng.randint(1, max_shapes)):
            label = rng.randint(1, len(CLASSES) - 1)
            colour = _colour(CLASSES[label], rng)
            shape = _shape(CLASSES[label], size, rng)
            for canvas, fill in ((image, colour), (mask, label)):
                _paint(ImageDraw.Draw(canvas), shape, fill)
            if ignore_border:
                _paint(ImageDraw.Draw(mask), shape, None, outline=IGNORE)
        stem = f"shape_{seed}_{i:04d}"
        image.save(folder / "images" / f"{stem}.jpg", quality=92)
        mask.save(folder / "masks" / f"{stem}.png")
    return folder


def _background(photo: Image.Image, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A random crop of `photo` with the aspect ratio of `size`, resized to it, flipped half the time."""
    w, h = photo.size
    aspect = size[0] / size[1]
    scale = rng.uniform(0.3, 1.0)
    cw = min(w, h * aspect) * scale
    ch = cw / aspect
    left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    img = photo.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def _colour(kind: str, rng: random.Random) -> tuple[int, int, int]:
    hue = rng.uniform(*HUES[kind]) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _shape(kind: str, size: tuple[int, int], rng: random.Random) -> tuple[str, list[tuple[float, float]]]:
    """(drawing primitive, points) of a shape of `kind` about 1/8 to 1/3 of the image across."""
    w, h = size
    r = rng.uniform(0.12, 0.25) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    if kind == "disk":
        return "ellipse", [(cx - r, cy - r), (cx + r, cy + r)]
    if kind == "rectangle":
        rw, rh = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        return "rectangle", [(cx - rw, cy - rh), (cx + rw, cy + rh)]
    turn = rng.uniform(0, 2 * math.pi)
    return "polygon", [(cx + r * math.cos(turn + k * 2 * math.pi / 3), cy + r * math.sin(turn + k * 2 * math.pi / 3))
                       for k in range(3)]


def _paint(draw: ImageDraw.ImageDraw, shape: tuple[str, list[tuple[float, float]]], fill, outline=None) -> None:
    primitive, points = shape
    getattr(draw, primitive)(points, fill=fill, outline=outline)


DETECTION_CLASSES = ("disk", "rectangle", "triangle")
# what learns them in a few minutes on two CPU cores: FCOS (a 64-channel pyramid) on EfficientNet-Lite0 (ImageNet
# weights), 96 x 96 images, the heads and the last two stages trained for three epochs (measured on held-out
# images: AP50 0.96 after three epochs, 0.98 after four; about 30 s an epoch on the shared machine)
DETECTION_RECIPE = {"model": "efficientnet_lite0", "head": "fcos", "fpn_channels": 64, "strategy": "partial",
                    "epochs": 3, "image_size": 96, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 0.5,
                    "scale_range": (0.8, 1.25), "num_workers": 0}


KEYPOINT_CLASSES = ("disk", "diamond", "triangle")
KEYPOINT_NAMES = ("top", "left", "right", "bottom")
KEYPOINT_SKELETON = ((1, 2), (1, 3), (2, 4), (3, 4))  # (COCO's 1-based pairs) the outline through the landmarks
# the two-stage acceptance fine-tunes (tests/test_rcnn_finetune.py, tests/test_keypoints.py) and their figures
# (scripts/make_detection_figure.py): Mask R-CNN and Keypoint R-CNN heads (a 64-channel pyramid, and mask or
# four-convolution keypoint head as wide) on EfficientNet-Lite0 (ImageNet weights), 128 x 128 images, the heads and
# the last two stages trained for two epochs: about a minute on two CPU cores each (measured on held-out images:
# box / mask AP50 0.79 / 0.81; keypoint AP50 0.87 and 0.93 with two training seeds)
MASK_RECIPE = {"model": "efficientnet_lite0", "head": "maskrcnn", "fpn_channels": 64, "strategy": "partial",
               "epochs": 2, "image_size": 128, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 0.5,
               "scale_range": (0.8, 1.25), "num_workers": 0}
KEYPOINT_RECIPE = {**MASK_RECIPE, "head": "keypointrcnn"}


def acceptance_run(work: Path, recipe: dict, **labels: bool):
    """The two-stage acceptance fine-tune: `recipe` on 200 shapes images of 128 x 128 (seed 0, with the
    `labels`: masks=True or keypoints=True), evaluated on 60 held-out ones (seed 1).
    Returns (the finetune's result, the evaluation, the fine-tune's seconds, the held-out folder)."""
    import shutil
    import time

    import visionzoo
    from visionzoo.tasks.evaluate import evaluate

    train = write_boxes(work / "train", 200, seed=0, size=(128, 128), **labels)
    held_out = write_boxes(work / "held_out", 60, seed=1, size=(128, 128), **labels)
    started = time.perf_counter()
    result = visionzoo.finetune(train / "instances.json", work / "run", **recipe, val_fraction=0.2, progress=False)
    seconds = time.perf_counter() - started
    evaluation = evaluate(result.bundle, held_out / "instances.json", out=work / "eval", num_workers=0)
    shutil.rmtree(train)
    return result, evaluation, seconds, held_out


def write_boxes(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (160, 160), *,
                max_shapes: int = 3, negatives: float = 0.05, masks: bool = False, keypoints: bool = False) -> Path:
    """`count` images with 1 to `max_shapes` non-overlapping shapes each (a `negatives` fraction
    with none), their COCO `instances.json` and `boxes.csv` in `folder`. With `masks`, each
    annotation also has its exact mask (the shape painted alone, without antialiasing, as the
    image paints it) as a `segmentation` in COCO's compressed run-length encoding. With
    `keypoints`, the shapes are `KEYPOINT_CLASSES` and each annotation has its landmarks as
    `keypoints` (the categories naming `KEYPOINT_NAMES` and `KEYPOINT_SKELETON`)."""
    classes = KEYPOINT_CLASSES if keypoints else DETECTION_CLASSES
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in photos()]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, rows = [], [], []
    for i in range(count):
        image = _background(rng.choice(sources), size, rng)
        placed: list[tuple[float, float, float, float]] = []
        wanted = 0 if rng.random() < negatives else rng.randint(1, max_shapes)
        stem = f"box_{seed}_{i:04d}.jpg"
        for _ in range(wanted * 20):  # attempts: a shape that would touch another is drawn again
            if len(placed) == wanted:
                break
            label = rng.randint(1, len(classes))
            kind = classes[label - 1]
            shape, points = _landmarks(kind, size, rng) if keypoints else (_shape(kind, size, rng), [])
            xs, ys = [x for x, _ in shape[1]], [y for _, y in shape[1]]
            box = (max(0.0, min(xs)), max(0.0, min(ys)), min(float(size[0]), max(xs)), min(float(size[1]), max(ys)))
            if any(box[0] < b[2] + 2 and b[0] < box[2] + 2 and box[1] < b[3] + 2 and b[1] < box[3] + 2
                   for b in placed):
                continue
            placed.append(box)
            _paint(ImageDraw.Draw(image), shape, _colour("rectangle" if kind == "diamond" else kind, rng))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
            if masks:
                annotations[-1]["segmentation"] = shape_rle(shape, size)
            if keypoints:
                annotations[-1]["keypoints"] = [v for p in points for v in (p if p else (0, 0, 0))]
                annotations[-1]["num_keypoints"] = sum(1 for p in points if p)
            rows.append([f"images/{stem}", *(f"{v:.2f}" for v in box), kind])
        if not placed:
            rows.append([f"images/{stem}", "", "", "", "", ""])
        image.save(folder / "images" / stem, quality=92)
        images.append({"id": i + 1, "file_name": stem, "width": size[0], "height": size[1]})
    layout = {"keypoints": list(KEYPOINT_NAMES), "skeleton": [list(p) for p in KEYPOINT_SKELETON]} if keypoints else {}
    categories = [{"id": k + 1, "name": name, **layout} for k, name in enumerate(classes)]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))
    with open(folder / "boxes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "x1", "y1", "x2", "y2", "label"])
        writer.writerows(rows)
    return folder


def _landmarks(kind: str, size: tuple[int, int], rng: random.Random
               ) -> tuple[tuple[str, list[tuple[float, float]]], list[tuple[float, float, int] | None]]:
    """A shape of `kind` (`KEYPOINT_CLASSES`) about 1/8 to 1/3 of the image across, and its landmarks
    (x, y, 2) in `KEYPOINT_NAMES`' order (None: the shape has no such point)."""
    w, h = size
    r = rng.uniform(0.12, 0.25) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    if kind == "disk":
        corners: list[tuple[float, float] | None] = [(cx, cy - r), (cx - r, cy), (cx + r, cy), (cx, cy + r)]
        shape = ("ellipse", [(cx - r, cy - r), (cx + r, cy + r)])
    elif kind == "diamond":
        rw, rh = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.7, 1.0)
        corners = [(cx, cy - rh), (cx - rw, cy), (cx + rw, cy), (cx, cy + rh)]
        shape = ("polygon", [(cx, cy - rh), (cx + rw, cy), (cx, cy + rh), (cx - rw, cy)])  # (around its edge)
    else:  # an upright triangle, its apex anywhere above the middle third of its base
        half = r * rng.uniform(0.7, 1.0)
        corners = [(cx + rng.uniform(-0.3, 0.3) * half, cy - r), (cx - half, cy + 0.6 * r), (cx + half, cy + 0.6 * r),
                   None]
        shape = ("polygon", [c for c in corners if c is not None])
    return shape, [None if c is None else (round(c[0], 2), round(c[1], 2), 2) for c in corners]


def shape_mask(shape: tuple[str, list[tuple[float, float]]], size: tuple[int, int]) -> Image.Image:
    """The pixels `shape` covers in an image of `size` (1 inside), as `_paint` paints them."""
    mask = Image.new("L", size, 0)
    _paint(ImageDraw.Draw(mask), shape, 1)
    return mask


def shape_rle(shape: tuple[str, list[tuple[float, float]]], size: tuple[int, int]) -> dict:
    """`shape_mask` in COCO's compressed run-length encoding."""
    import numpy as np
    from pycocotools import mask as mask_api

    rle = mask_api.encode(np.asfortranarray(np.asarray(shape_mask(shape, size), dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
