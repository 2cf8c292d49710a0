"""Detection datasets: images with boxes, as COCO instances or as a CSV of boxes, checked before anything trains.

    shapes/instances.json      COCO: "images" (id, file_name, width, height), "annotations" (id, image_id,
                               category_id, bbox [x, y, width, height] in pixels, iscrowd, and optionally
                               segmentation: polygons or RLE), "categories" (id, name); file names
                               relative to the JSON's folder or its images/
    shapes/boxes.csv           path,x1,y1,x2,y2,label: one row per box (paths relative to the CSV's folder);
                               a row with empty box and label fields lists an image without objects

`open_box_dataset` reads either and checks every entry: invalid JSON, a missing key, duplicate
ids, an annotation of an unknown image or category, a box without area or outside its image, an
image listed but missing or unreadable each raise an `InputError` naming the file and the entry.
Image sizes come from the headers (no pixel is decoded); images are decoded later within the
run's `DecodeLimits`. Crowd annotations (`iscrowd` 1) are not trained on. Boxes are stored as
(x1, y1, x2, y2) in the upright image's pixels and labels as 1-based class indices: 0 is the
background, so the classes of a bundle are `("__background__", *names)`. Instance masks (COCO
`segmentation`, see `instance_masks.py`) are read when the annotations have them: then every
annotation that is trained on needs one; they are kept run-length encoded and decoded with the
image.

Keypoints (COCO's person-keypoints layout) are read when the categories name them: each
category's `keypoints` (the names, the same list for every category) and optionally its
`skeleton` (1-based pairs of keypoints joined when drawing), and each annotation's `keypoints`,
a flat list of x, y, v triplets (v 0: not labelled, 1: labelled but hidden, 2: visible), in the
image's pixels. Then every annotation that is trained on needs them; a wrong length, a value
that is not a number, a v other than 0, 1 or 2 and a labelled point outside its image (beyond
`EDGE_TOLERANCE`) are one-line errors naming the file and the annotation.

`BoxAugment` draws the training views: a random rescale, a horizontal flip and a random square
crop of an image with its boxes (and masks and keypoints) moved along, clipped to the crop, and
dropped when too little of them is left. A flip also swaps each left keypoint with its right
one (`flip_permutation`: the names with "left" and "right" exchanged); keypoints cropped out
become unlabelled (v 0).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import InputError
from .instance_masks import MaskRLE, read_segmentation
from .masks import upright_size

BACKGROUND = "__background__"
CSV_HEADER = ("path", "x1", "y1", "x2", "y2", "label")
COCO_NAMES = ("instances.json", "annotations.json")  # what a COCO dataset folder holds
EDGE_TOLERANCE = 1.0  # pixels a box may reach beyond its image (rounding in exported annotations); clipped
Box = tuple[float, float, float, float]
Keypoints = tuple[float, ...]  # one box's keypoints: x, y, v for each keypoint (v 0 with x = y = 0: not labelled)


@dataclass(frozen=True)
class BoxSample:
    image: Path
    boxes: tuple[Box, ...]  # (x1, y1, x2, y2) in the upright image's pixels
    labels: tuple[int, ...]  # class indices, 1-based (0 is the background)
    image_id: int  # the COCO image id (CSV: the image's position, from 1)
    masks: tuple[MaskRLE, ...] | None = None  # one per box, where the data has instance masks
    keypoints: tuple[Keypoints, ...] | None = None  # one per box, where the data has keypoints

    def row(self) -> tuple[Path, tuple[Box, ...], tuple[int, ...], int, tuple[MaskRLE, ...] | None,
                           tuple[Keypoints, ...] | None]:
        """(image, boxes, labels, image_id, masks, keypoints): how a fine-tuning run keeps (and fingerprints)
        a sample."""
        return self.image, self.boxes, self.labels, self.image_id, self.masks, self.keypoints


@dataclass(frozen=True)
class BoxDataset:
    """The checked samples of a detection dataset."""

    source: Path  # the annotation file
    samples: tuple[BoxSample, ...]
    classes: tuple[str, ...]  # class names, without the background
    category_ids: tuple[int, ...]  # each class's COCO category id (CSV: 1, 2, ...)
    keypoint_names: tuple[str, ...] | None = None  # the categories' keypoints, where the data has them
    skeleton: tuple[tuple[int, int], ...] = ()  # pairs of keypoints (0-based) joined when drawing

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int]) -> BoxDataset:
        return dataclasses.replace(self, samples=tuple(self.samples[i] for i in indices))

    @property
    def has_masks(self) -> bool:
        return any(s.masks is not None for s in self.samples)

    @property
    def has_keypoints(self) -> bool:
        return self.keypoint_names is not None

    def box_counts(self) -> list[int]:
        """Boxes of each class over all samples."""
        counts = [0] * len(self.classes)
        for sample in self.samples:
            for label in sample.labels:
                counts[label - 1] += 1
        return counts


def annotation_file(path: str | os.PathLike | None) -> Path | None:
    """The annotation file `path` names for detection: a COCO JSON, a box CSV (its header starts
    `path,x1,y1,x2,y2`), or a folder holding `instances.json` or `annotations.json`; None otherwise."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        return next((p / name for name in COCO_NAMES if (p / name).is_file()), None)
    if p.suffix.lower() == ".json" and p.is_file():
        return p
    if p.suffix.lower() in (".csv", ".tsv", ".txt") and p.is_file():
        try:
            with open(p, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return None
        return p if tuple(h.strip().lower() for h in header[:5]) == CSV_HEADER[:5] else None
    return None


def is_box_dataset(path: str | os.PathLike | None) -> bool:
    return annotation_file(path) is not None


def open_box_dataset(path: str | os.PathLike, classes: Sequence[str] | None = None) -> BoxDataset:
    """The dataset `path` names (see `annotation_file`), checked. `classes`: the class names the boxes
    must use, in the model's order (evaluation), instead of the dataset's own."""
    file = annotation_file(path)
    if file is None:
        raise InputError(f"{path}: not a detection dataset; give a COCO instances JSON (or a folder holding "
                         f"instances.json) or a CSV with the header {','.join(CSV_HEADER)}")
    if file.suffix.lower() == ".json":
        found = _read_coco(file)
    else:
        found = _read_csv(file)
    return found if classes is None else _relabelled(found, list(classes))


def _relabelled(found: BoxDataset, classes: list[str]) -> BoxDataset:
    """`found` with its labels renumbered to `classes` (which must include every class it uses)."""
    unknown = [name for name in found.classes if name not in classes]
    if unknown:
        raise InputError(f"{found.source}: class {unknown[0]!r} is not one of the model's classes "
                         f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); evaluate on data "
                         f"with the classes the model was trained on")
    index = {k + 1: classes.index(name) + 1 for k, name in enumerate(found.classes)}
    samples = tuple(dataclasses.replace(s, labels=tuple(index[v] for v in s.labels)) for s in found.samples)
    ids = tuple(found.category_ids[found.classes.index(name)] if name in found.classes else -1 for name in classes)
    return dataclasses.replace(found, samples=samples, classes=tuple(classes), category_ids=ids)


# -- COCO -------------------------------------------------------------------------------------

def _read_coco(file: Path) -> BoxDataset:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the file "
                         f"or export it again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: cannot read the annotation file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: a COCO annotation file holds an object with images, annotations and categories")
    images = _entries(file, data, "images")
    annotations = _entries(file, data, "annotations")
    categories = _entries(file, data, "categories")
    if not categories:
        raise InputError(f"{file}: categories is empty; list the classes as {{\"id\": 1, \"name\": ...}}")
    category_index: dict[int, int] = {}
    names: list[str] = []
    for k, cat in enumerate(categories):
        where = f"{file}: categories[{k}]"
        cid = _id(cat, "id", where, category_index)
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: needs a non-empty name")
        if name in names:
            raise InputError(f"{where}: the name {name!r} is used by two categories; give each class its own name")
        category_index[cid] = len(names) + 1
        names.append(name)
    keypoint_names, skeleton = _keypoint_layout(file, categories)
    folder = file.parent
    image_index: dict[int, int] = {}
    paths: list[Path] = []
    sizes: list[tuple[int, int]] = []
    for k, img in enumerate(images):
        where = f"{file}: images[{k}]"
        iid = _id(img, "id", where, image_index)
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where} (id {iid}): needs a file_name")
        path = _image_path(folder, name)
        if path is None:
            raise InputError(f"{where} (id {iid}): the image {name} is missing (looked in {folder} and "
                             f"{folder / 'images'}); add it or remove the entry")
        size = _size(path, where, iid)
        listed = img.get("width"), img.get("height")
        if listed != (None, None) and tuple(listed) != size:
            raise InputError(f"{where} (id {iid}): lists {listed[0]}x{listed[1]} but {path} is {size[0]}x{size[1]}; "
                             f"fix width and height")
        image_index[iid] = len(paths)
        paths.append(path)
        sizes.append(size)
    boxes: list[list[Box]] = [[] for _ in paths]
    labels: list[list[int]] = [[] for _ in paths]
    masks: list[list[MaskRLE]] = [[] for _ in paths]
    points: list[list[Keypoints]] = [[] for _ in paths]
    with_masks: bool | None = None  # whether the annotations have segmentations (all or none of those trained on)
    seen: dict[int, int] = {}
    for k, ann in enumerate(annotations):
        where = f"{file}: annotations[{k}]"
        aid = _id(ann, "id", where, seen)
        seen[aid] = k
        where = f"{where} (id {aid})"
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if image_id not in image_index or isinstance(image_id, bool):
            raise InputError(f"{where}: image_id {image_id!r} is not one of the images' ids; fix it or list the image")
        if category_id not in category_index or isinstance(category_id, bool):
            raise InputError(f"{where}: unknown category_id {category_id!r} (the categories are "
                             f"{sorted(category_index)[:8]}); fix it or add the category")
        if ann.get("iscrowd", 0):
            continue  # a crowd region is not one object: not a training box
        i = image_index[image_id]
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise InputError(f"{where}: bbox must be [x, y, width, height] in pixels, got {bbox!r:.60}")
        x, y, w, h = (float(v) for v in bbox)
        boxes[i].append(_checked_box((x, y, x + w, y + h), sizes[i], f"{where}: bbox {bbox}", paths[i]))
        labels[i].append(category_index[category_id])
        seg = ann.get("segmentation")
        has = seg is not None and seg != []
        if with_masks is None:
            with_masks = has
        elif has != with_masks:
            raise InputError(f"{where}: {'has a' if has else 'has no'} segmentation, unlike the annotations before "
                             f"it; give every annotation a mask (polygons or RLE), or none")
        if has:
            masks[i].append(read_segmentation(seg, sizes[i], f"{where}: segmentation"))
        if keypoint_names is not None:
            points[i].append(read_keypoints(ann.get("keypoints"), len(keypoint_names), sizes[i], where))
        elif ann.get("keypoints"):
            raise InputError(f"{where}: has keypoints but no category names them; list the keypoint names as the "
                             f"categories' \"keypoints\" (and optionally their \"skeleton\")")
    samples = tuple(BoxSample(p, tuple(b), tuple(lab), iid, tuple(m) if with_masks else None,
                              tuple(k) if keypoint_names is not None else None)
                    for (iid, i), p, b, lab, m, k in zip(image_index.items(), paths, boxes, labels, masks, points,
                                                         strict=True))
    return BoxDataset(file, samples, tuple(names), tuple(category_index), keypoint_names, skeleton)


def _keypoint_layout(file: Path, categories: list[dict]) -> tuple[tuple[str, ...] | None, tuple[tuple[int, int], ...]]:
    """The keypoint names the categories list (the same for each; None when none lists any) and the
    skeleton (0-based pairs) of the first that gives one."""
    layouts: list[tuple[int, tuple[str, ...] | None]] = []
    skeleton: tuple[tuple[int, int], ...] = ()
    for k, cat in enumerate(categories):
        where = f"{file}: categories[{k}] ({cat.get('name')})"
        listed = cat.get("keypoints")
        if listed is None or listed == []:
            layouts.append((k, None))
            continue
        if not isinstance(listed, list) or not all(isinstance(n, str) and n.strip() and "," not in n
                                                   for n in listed):
            raise InputError(f"{where}: keypoints must be a list of keypoint names (non-empty, without commas), "
                             f"got {listed!r:.60}")
        if len(set(listed)) != len(listed):
            raise InputError(f"{where}: keypoints names a keypoint twice; give each its own name")
        layouts.append((k, tuple(listed)))
        pairs = cat.get("skeleton")
        if pairs is None or pairs == []:
            continue
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            and 1 <= v <= len(listed) for v in p) for p in pairs):
            raise InputError(f"{where}: skeleton must be a list of [a, b] pairs of keypoint numbers from 1 to "
                             f"{len(listed)}, got {pairs!r:.60}")
        if not skeleton:
            skeleton = tuple((a - 1, b - 1) for a, b in pairs)
    named = [(k, names) for k, names in layouts if names is not None]
    if not named:
        return None, ()
    first, names = named[0]
    for k, other in layouts:
        if other != names:
            what = "no keypoints" if other is None else f"{len(other)} keypoints ({', '.join(other[:4])}...)"
            raise InputError(f"{file}: categories[{k}] has {what} but categories[{first}] has {len(names)} "
                             f"({', '.join(names[:4])}...); give every category the same keypoint names")
    return names, skeleton


def read_keypoints(value: Any, count: int, size: tuple[int, int], where: str) -> Keypoints:
    """An annotation's `keypoints` (x, y, v for each of `count` keypoints) checked against its image of
    `size` (width, height): a labelled point may reach `EDGE_TOLERANCE` beyond it (it is clipped);
    unlabelled ones (v 0) are stored as (0, 0, 0)."""
    if not isinstance(value, list) or len(value) != 3 * count:
        got = f"{len(value)} values" if isinstance(value, list) else f"{value!r:.40}"
        raise InputError(f"{where}: keypoints must be a list of {3 * count} numbers (x, y, v for each of the "
                         f"{count} keypoints), got {got}")
    if not all(_number(v) for v in value):
        bad = next(v for v in value if not _number(v))
        raise InputError(f"{where}: keypoints hold {bad!r:.20}, not a finite number")
    width, height = size
    out: list[float] = []
    for j in range(count):
        x, y, v = (float(t) for t in value[3 * j:3 * j + 3])
        if v not in (0.0, 1.0, 2.0):
            raise InputError(f"{where}: keypoint {j + 1} has visibility {value[3 * j + 2]!r}; v must be 0 (not "
                             f"labelled), 1 (labelled, hidden) or 2 (visible)")
        if v == 0:
            out += (0.0, 0.0, 0.0)
            continue
        tol = EDGE_TOLERANCE
        if not (-tol <= x <= width + tol and -tol <= y <= height + tol):
            raise InputError(f"{where}: keypoint {j + 1} at ({x:g}, {y:g}) is outside the {width}x{height} image; "
                             f"fix the coordinates or mark it unlabelled (v 0)")
        out += (min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height)), v)
    return tuple(out)


def flip_permutation(names: Sequence[str]) -> tuple[int, ...]:
    """Where each keypoint goes in a horizontal flip: the keypoint whose name has "left" and "right" (as
    words between underscores, hyphens or spaces) exchanged, or itself where no such name is listed."""
    index = {name: j for j, name in enumerate(names)}
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}
    order = []
    for name in names:
        mirrored = "".join(swap.get(part, part) for part in re.split(r"([_\- ])", name))
        order.append(index.get(mirrored, index[name]))
    return tuple(order)


def _entries(file: Path, data: dict, key: str) -> list[dict]:
    value = data.get(key)
    if not isinstance(value, list):
        raise InputError(f"{file}: no {key} list; a COCO annotation file holds images, annotations and categories")
    for k, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise InputError(f"{file}: {key}[{k}] is not an object")
    return value


def _id(entry: dict, key: str, where: str, seen: dict[int, Any]) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{where}: needs an integer {key}, got {value!r:.40}")
    if value in seen:
        raise InputError(f"{where}: duplicate {key} {value}; ids must be unique")
    return value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _image_path(folder: Path, name: str) -> Path | None:
    for base in (folder, folder / "images"):
        if (base / name).is_file():
            return base / name
    return None


def _size(path: Path, where: str, image_id: int | str) -> tuple[int, int]:
    try:
        return upright_size(path)
    except InputError as e:
        raise InputError(f"{where} ({image_id}): {e}") from None


def _checked_box(box: Box, size: tuple[int, int], where: str, image: Path) -> Box:
    """`box` clipped to the image when it reaches at most `EDGE_TOLERANCE` beyond it; else an error."""
    x1, y1, x2, y2 = box
    width, height = size
    if not (x2 > x1 and y2 > y1):
        raise InputError(f"{where}: the box has no area; boxes need a positive width and height")
    tol = EDGE_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise InputError(f"{where}: the box is outside the {width}x{height} image {image.name}; fix the coordinates "
                         f"(pixels of the image as stored, EXIF orientation applied)")
    clipped = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        raise InputError(f"{where}: the box has no area inside the {width}x{height} image {image.name}")
    return clipped


# -- CSV --------------------------------------------------------------------------------------

def _read_csv(file: Path) -> BoxDataset:
    folder = file.parent
    rows: list[tuple[int, Path, Box | None, str | None]] = []
    try:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if tuple(header) != CSV_HEADER:
                raise InputError(f"{file}: line 1: the header must be {','.join(CSV_HEADER)}, got {','.join(header)}")
            for line, row in enumerate(reader, start=2):
                if not row or all(not v.strip() for v in row):
                    continue
                rows.append(_csv_row(file, line, row, folder))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{file}: cannot read the CSV ({e})") from None
    if not rows:
        raise InputError(f"{file}: no rows; list one box per row as {','.join(CSV_HEADER)}")
    names = sorted({label for *_, label in rows if label is not None})
    if not names:
        raise InputError(f"{file}: no boxes, only images without objects; label at least one box")
    order: dict[Path, int] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    boxes: list[list[Box]] = []
    labels: list[list[int]] = []
    for line, path, box, label in rows:
        if path not in order:
            if not path.is_file():
                raise InputError(f"{file}: line {line}: the image {path} is missing; add it or remove the row")
            sizes[path] = _size(path, f"{file}: line {line}", path.name)
            order[path] = len(order)
            boxes.append([])
            labels.append([])
        if box is None or label is None:
            continue
        boxes[order[path]].append(_checked_box(box, sizes[path], f"{file}: line {line}", path))
        labels[order[path]].append(names.index(label) + 1)
    samples = tuple(BoxSample(p, tuple(boxes[i]), tuple(labels[i]), i + 1) for p, i in order.items())
    return BoxDataset(file, samples, tuple(names), tuple(range(1, len(names) + 1)))


def _csv_row(file: Path, line: int, row: list[str], folder: Path) -> tuple[int, Path, Box | None, str | None]:
    where = f"{file}: line {line}"
    if len(row) != len(CSV_HEADER):
        raise InputError(f"{where}: {len(row)} fields; each row is {','.join(CSV_HEADER)}")
    name, *coords, label = (v.strip() for v in row)
    if not name:
        raise InputError(f"{where}: no image path")
    path = Path(name).expanduser()
    path = path if path.is_absolute() else folder / path
    if not any(coords) and not label:
        return line, path, None, None  # an image without objects
    if not all(coords) or not label:
        raise InputError(f"{where}: give all of x1,y1,x2,y2,label for a box, or none of them for an image "
                         f"without objects")
    try:
        values = tuple(float(v) for v in coords)
    except ValueError:
        raise InputError(f"{where}: the coordinates {','.join(coords)} are not numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{where}: the coordinates {','.join(coords)} are not finite")
    return line, path, (values[0], values[1], values[2], values[3]), label


# -- augmentation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BoxAugment:
    """A random rescale, flip and square crop of an image with its boxes, drawn from an explicit generator.

    The image's shorter side is scaled to `base * U(scale)`, flipped half the time with `hflip`, and
    a random `crop` x `crop` window is cut (the image padded with black where it is smaller).
    The boxes follow; each is clipped to the window and dropped when less than `min_side` pixels
    wide or high, or less than `min_visible` of its area is left inside. Without `random`, the
    scale is 1, nothing is flipped and the window is centred. `flip_keypoints` (see
    `flip_permutation`) says which keypoint becomes which in a flip.
    """

    base: int  # the shorter side before the random factor
    crop: int
    scale: tuple[float, float] = (0.75, 1.25)
    hflip: bool = True
    random: bool = True
    min_side: float = 2.0
    min_visible: float = 0.4
    flip_keypoints: tuple[int, ...] | None = None

    def __call__(self, img: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image CHW in [0, 1], boxes (N, 4) in its pixels, labels (N,))."""
        x, boxes, labels, _ = self.apply(img, boxes, labels, None, g)
        return x, boxes, labels

    def apply(self, img: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As a call, with the instance masks ((N, H, W) uint8 at the image's size, or None) moved with the
        image: resized to the nearest pixel (centres aligned as the image's resize aligns them), flipped,
        cropped (zero where the window overhangs), and dropped with their boxes."""
        x, boxes, labels, masks, _ = self.apply_all(img, boxes, labels, masks, None, g)
        return x, boxes, labels, masks

    def apply_all(self, img: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None,
                  keypoints: torch.Tensor | None, g: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """As `apply`, with the keypoints ((N, K, 3): x, y, v in the image's pixels, or None) moved too: scaled,
        mirrored and reordered by `flip_keypoints` in a flip, shifted into the window; those outside the
        image's part of the window become (0, 0, 0), and they are dropped with their boxes."""
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        factor = self.scale[0] + u[0] * (self.scale[1] - self.scale[0]) if self.random else 1.0
        ratio = self.base * factor / min(img.width, img.height)
        size = (max(1, round(img.width * ratio)), max(1, round(img.height * ratio)))
        sx, sy = size[0] / img.width, size[1] / img.height
        img = img.resize(size, Image.Resampling.BILINEAR)
        boxes = boxes.to(torch.float32) * torch.tensor([sx, sy, sx, sy])
        if keypoints is not None:
            keypoints = keypoints.to(torch.float32) * torch.tensor([sx, sy, 1.0])
        if masks is not None:
            masks = (torch.nn.functional.interpolate(masks[None], size=(size[1], size[0]), mode="nearest-exact")[0]
                     if len(masks) else masks.new_zeros((0, size[1], size[0])))
        if self.random and self.hflip and u[1] < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = torch.stack((size[0] - boxes[:, 2], boxes[:, 1], size[0] - boxes[:, 0], boxes[:, 3]), 1)
            masks = None if masks is None else masks.flip(-1)
            if keypoints is not None:
                keypoints = torch.stack((size[0] - keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]), -1)
                if self.flip_keypoints is not None:
                    keypoints = keypoints[:, list(self.flip_keypoints)]
        left, top = self._offset(u[2], size[0]), self._offset(u[3], size[1])
        canvas = Image.new("RGB", (self.crop, self.crop))
        region = (max(left, 0), max(top, 0), min(left + self.crop, size[0]), min(top + self.crop, size[1]))
        at = (max(-left, 0), max(-top, 0))
        canvas.paste(img.crop(region), at)
        window = (left, top, left + self.crop, top + self.crop)
        inside = (min(size[0], left + self.crop) - left, min(size[1], top + self.crop) - top)
        keep = kept_boxes(boxes, window, inside, self.min_side, self.min_visible)
        boxes, labels = crop_boxes(boxes, labels, window, inside, self.min_side, self.min_visible)
        if masks is not None:
            cropped = torch.zeros((int(keep.sum()), self.crop, self.crop), dtype=masks.dtype)
            w, h = region[2] - region[0], region[3] - region[1]
            cropped[:, at[1]:at[1] + h, at[0]:at[0] + w] = masks[keep, region[1]:region[3], region[0]:region[2]]
            masks = cropped
        if keypoints is not None:
            keypoints = crop_keypoints(keypoints[keep], window, inside)
        x = torch.from_numpy(_rgb_array(canvas)).permute(2, 0, 1).float().div_(255)
        return x, boxes, labels, masks, keypoints

    def _offset(self, u: float, size: int) -> int:
        """Where the window starts along an axis of `size` pixels (negative: it overhangs the image)."""
        if not self.random:
            return (size - self.crop) // 2
        return int(u * (size - self.crop + 1)) if size >= self.crop else -int(u * (self.crop - size + 1))


def crop_boxes(boxes: torch.Tensor, labels: torch.Tensor, window: tuple[int, int, int, int],
               inside: tuple[int, int], min_side: float, min_visible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`boxes` (N, 4) moved into `window` (left, top, right, bottom) and clipped to the part of it the
    image covers (`inside`: its width and height from the window's corner); boxes with a side under
    `min_side` or under `min_visible` of their area left are dropped, with their labels."""
    clipped = _clipped(boxes, window, inside)
    keep = kept_boxes(boxes, window, inside, min_side, min_visible)
    return clipped[keep], labels[keep]


def crop_keypoints(keypoints: torch.Tensor, window: tuple[int, int, int, int], inside: tuple[int, int]
                   ) -> torch.Tensor:
    """`keypoints` (N, K, 3) moved into `window`; those outside the part of it the image covers (or not
    labelled) become (0, 0, 0)."""
    left, top = window[0], window[1]
    x, y = keypoints[..., 0] - left, keypoints[..., 1] - top
    low_x, low_y = max(0, -left), max(0, -top)
    seen = (keypoints[..., 2] > 0) & (x >= low_x) & (x <= inside[0]) & (y >= low_y) & (y <= inside[1])
    return torch.stack((x, y, keypoints[..., 2]), -1) * seen[..., None]


def _clipped(boxes: torch.Tensor, window: tuple[int, int, int, int], inside: tuple[int, int]) -> torch.Tensor:
    left, top = window[0], window[1]
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    low_x, low_y = max(0, -left), max(0, -top)
    return torch.stack((shifted[:, 0].clamp(low_x, inside[0]), shifted[:, 1].clamp(low_y, inside[1]),
                        shifted[:, 2].clamp(low_x, inside[0]), shifted[:, 3].clamp(low_y, inside[1])), 1)


def kept_boxes(boxes: torch.Tensor, window: tuple[int, int, int, int], inside: tuple[int, int], min_side: float,
               min_visible: float) -> torch.Tensor:
    """Which of `boxes` `crop_boxes` keeps (a boolean (N,) tensor)."""
    clipped = _clipped(boxes, window, inside)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    return (w >= min_side) & (h >= min_side) & (w * h >= min_visible * area)


def _rgb_array(img: Image.Image):
    import numpy as np

    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
