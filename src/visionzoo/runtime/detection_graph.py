"""A single-stage detector as one exportable graph: image in, boxes, scores and labels out; the pieces
that the two-stage detectors' graph (`rcnn_graph.py`) shares with it.

The detectors' own forward pass (`models/detection/base.py`) computes sizes and counts in Python,
which a traced ONNX graph would freeze at the traced image's values. `DetectorGraph` runs the same
steps with every size taken from the tensors, so the exported file takes an image of any height
and width:

1. normalise with the model's mean and std; resize (bilinear) so that the shorter side is
   `min_size` unless the longer would exceed `max_size` (the scale computed in float64, as the
   eager transform computes it in Python floats), or to SSD's fixed size; pad the bottom and
   right to a multiple of `size_divisible`;
2. backbone, heads (level by level for the pyramid heads, so that no level's size is frozen),
   anchors from the feature maps' sizes;
3. per level (RetinaNet, FCOS) or per class (SSD, SSDlite): the `topk_candidates` best scores,
   those above `score_thresh`, their boxes decoded and clipped to the resized image;
4. NMS within each class: one NMS over boxes shifted apart by class, written to ONNX as the
   `NonMaxSuppression` operator with at most `detections_per_img` boxes kept, which is exactly
   keeping NMS's first `detections_per_img`;
5. boxes scaled back to the input image's pixels.

The input is one image, (1, 3, H, W) float32 RGB in [0, 1] (what `visionzoo detect` decodes a
file to: nothing else happens outside the graph). The outputs are `boxes` (K, 4) as (x1, y1,
x2, y2) in the input's pixels, `scores` (K,) and `labels` (K,) int64, by decreasing score.

What can differ from the eager model, and why: the eager model takes the best `topk_candidates`
of the scores above the threshold, the graph the scores above the threshold among the best
`topk_candidates` (the same set, ties at the cut aside); above 1,000 candidates the eager
`batched_nms` runs NMS class by class on unshifted boxes, the graph always shifts (the shifted
coordinates round differently by ~1e-2 px at COCO's 91 classes); equal scores may be visited in
another order by the runtime's NMS. Boxes and labels agree, scores to float32 rounding, as sets
(`compare_detections`).

Shared with `rcnn_graph.py`: the transform (`graph_input`), per-class NMS as one `NonMaxSuppression`
(`class_nms`), clipping and the scaling back to the input's pixels; `graph_detections` turns a
graph's outputs into the eager model's detections (pasting a Mask R-CNN's masks after the graph).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models.detection.anchors import AnchorGenerator
from ..models.detection.base import DetectionModel
from ..models.detection.fcos import FCOS
from ..models.detection.retinanet import RetinaNet
from ..models.detection.ssd import SSD
from ..models.detection.transform import ImageBatch
from ..ops import nms, paste_masks_in_image

OP_NAME = "visionzoo::nms_keep"
NMS_OPSET = 10  # the first with NonMaxSuppression; the translation holds for every later opset too
_registered: list[bool] = []


@torch.library.custom_op(OP_NAME, mutates_args=())
def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_kept: int) -> torch.Tensor:
    """The first `max_kept` indices NMS keeps: in eager mode `ops.nms`, in an ONNX graph the
    `NonMaxSuppression` operator (one class, at most `max_kept` selected)."""
    return nms(boxes, scores, iou_threshold)[:max_kept]


@nms_keep.register_fake
def _nms_keep_fake(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_kept: int) -> torch.Tensor:
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


def _nms_keep_onnx(g, boxes, scores, iou_threshold, max_kept):
    batched = g.op("Unsqueeze", boxes, g.op("Constant", value_t=torch.tensor([0])))  # (1, N, 4)
    per_class = g.op("Unsqueeze", scores, g.op("Constant", value_t=torch.tensor([0, 1])))  # (1, 1, N)
    # any diagonal pair of corners is accepted (center_point_box=0), and the IoU is symmetric in x and y
    selected = g.op("NonMaxSuppression", batched, per_class, g.op("Constant", value_t=torch.tensor([max_kept])),
                    g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)))
    return g.op("Gather", selected, g.op("Constant", value_t=torch.tensor(2)), axis_i=1)  # (batch, class, box)


def register_onnx_nms() -> None:
    """Teach torch's TorchScript-based ONNX exporter to write `nms_keep` as `NonMaxSuppression`."""
    if _registered:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    register_custom_op_symbolic(OP_NAME, parse_args("v", "v", "f", "i")(_nms_keep_onnx), NMS_OPSET)
    _registered.append(True)


def _size(x: torch.Tensor) -> torch.Tensor:
    """(height, width) of `x` as an int64 tensor that a trace keeps symbolic."""
    return torch._shape_as_tensor(x)[-2:]


def as_int(size: torch.Tensor) -> int:
    """A size computed as a tensor, where torch's signatures say int: tracing keeps the tensor (and so the
    size symbolic); eagerly, the operators read a one-element tensor as its value."""
    return cast(int, size)


def clip_boxes(boxes: torch.Tensor, height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes clamped to [0, width] x [0, height] (sizes as tensors: kept symbolic in a trace)."""
    x = torch.minimum(boxes[:, 0::2].clamp(min=0), width.to(boxes.dtype))
    y = torch.minimum(boxes[:, 1::2].clamp(min=0), height.to(boxes.dtype))
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def graph_input(model: DetectionModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's transform of the one image of `images` (1, 3, H, W): its (height, width), the
    resized image's (height, width), and the normalised, resized and padded (1, 3, H', W') batch."""
    image = images[0]
    original = _size(image)
    resized = _resize(model, model.transform.normalize(image))
    size = _size(resized)
    return original, size, _pad(model, resized)[None]


def class_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
              max_kept: int) -> torch.Tensor:
    """The first `max_kept` indices of NMS within each class: one NMS over boxes shifted apart by class
    by more than the largest coordinate (the max over a zero too: an image may have no candidates)."""
    extent = torch.cat((boxes.flatten(), boxes.new_zeros(1))).max() + 1
    return nms_keep(boxes + (classes.to(boxes.dtype) * extent)[:, None], scores, float(iou_threshold), int(max_kept))


def to_input_pixels(boxes: torch.Tensor, original: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Boxes in the resized image's pixels (`size`) scaled to the input image's (`original`)."""
    ratio = original.to(torch.float32) / size.to(torch.float32)  # (h, w), as the eager transform's float32 ratios
    return boxes * torch.stack((ratio[1], ratio[0], ratio[1], ratio[0])).to(boxes.dtype)


def _resize(model: DetectionModel, image: torch.Tensor) -> torch.Tensor:
    transform = model.transform
    if transform.fixed_size is not None:
        width, height = transform.fixed_size
        return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    hw = _size(image).to(torch.float64)
    # the limits as float64 tensors: a Python number would become a float32 constant in the graph, and
    # 160 / 200 * 200 in float32 is 159.99998, one row short of the eager model's 160
    limits = torch.tensor([float(transform.min_size[-1]), float(transform.max_size)], dtype=torch.float64)
    scale = torch.min(limits / torch.stack((hw.min(), hw.max())))
    out = torch.floor(hw * scale).to(torch.int64)
    size = (as_int(out[0]), as_int(out[1]))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def _pad(model: DetectionModel, image: torch.Tensor) -> torch.Tensor:
    stride = model.transform.size_divisible
    if stride <= 1:
        return image
    hw = _size(image)
    pad = (hw + stride - 1) // stride * stride - hw
    return F.pad(image, (0, as_int(pad[1]), 0, as_int(pad[0])))


class DetectorGraph(nn.Module):
    """`model` (RetinaNet, FCOS, SSD, SSDlite, or one of them on another backbone) as a function
    of one image: `(1, 3, H, W)` in [0, 1] -> boxes (K, 4), scores (K,), labels (K,) int64."""

    def __init__(self, model: DetectionModel):
        super().__init__()
        if not isinstance(model, (RetinaNet, FCOS, SSD)):
            raise InputError(f"{type(model).__name__} has no single-stage graph: DetectorGraph covers RetinaNet, "
                             f"FCOS, SSD and SSDlite (Faster and Mask R-CNN: RCNNGraph in runtime/rcnn_graph.py)")
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        original, size, padded = graph_input(self.model, images)
        features = self.model.backbone(padded)
        if isinstance(self.model, SSD):
            boxes, scores, labels = self._ssd_candidates(features, padded, size)
        else:
            boxes, scores, labels = self._dense_candidates(features, padded, size)
        keep = class_nms(boxes, scores, labels, self.model.nms_thresh, self.model.detections_per_img)
        return to_input_pixels(boxes[keep], original, size), scores[keep], labels[keep]

    # -- candidates -----------------------------------------------------------------------------------

    def _dense_candidates(self, features: list[torch.Tensor], padded: torch.Tensor, size: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        assert isinstance(model, (RetinaNet, FCOS))  # (checked in __init__)
        generator = cast(AnchorGenerator, model.anchor_generator)
        anchors = generator(ImageBatch(padded, [(0, 0)]), features)[0]
        per_location = generator.num_anchors_per_location()
        boxes, scores, labels = [], [], []
        start = 0
        for level, f in enumerate(features):
            out = cast(nn.Module, model.head)([f])  # this level's outputs alone: (1, H * W * A, columns)
            count = f.shape[-2] * f.shape[-1] * per_location[level]
            level_anchors = anchors[start:start + count]
            start = start + count
            probs = torch.sigmoid(out["cls_logits"][0])
            if isinstance(model, FCOS):
                probs = torch.sqrt(probs * torch.sigmoid(out["bbox_ctrness"][0]))
            flat = probs.flatten()
            k = torch.clamp(torch._shape_as_tensor(flat)[0], max=model.topk_candidates)
            top_scores, top = flat.topk(as_int(k))
            above = top_scores > model.score_thresh
            top_scores, top = top_scores[above], top[above]
            anchor_idx = torch.div(top, model.num_classes, rounding_mode="floor")
            decoded = model.box_coder.decode(out["bbox_regression"][0][anchor_idx], level_anchors[anchor_idx])
            boxes.append(clip_boxes(decoded, size[0], size[1]))
            scores.append(top_scores)
            labels.append(top % model.num_classes)
        return torch.cat(boxes), torch.cat(scores), torch.cat(labels)

    def _ssd_candidates(self, features: list[torch.Tensor], padded: torch.Tensor, size: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        assert isinstance(model, SSD)
        out = model.head(features)  # a fixed input size: every map's size is fixed too
        anchors = model.anchor_generator(ImageBatch(padded, [(0, 0)]), features)[0]
        boxes = clip_boxes(model.box_coder.decode(out["bbox_regression"][0], anchors), size[0], size[1])
        per_class = F.softmax(out["cls_logits"][0], dim=-1).t()[1:]  # (classes - 1, anchors): no background
        top_scores, top = per_class.topk(min(model.topk_candidates, per_class.shape[1]), dim=1)
        above = top_scores > model.score_thresh
        classes = torch.arange(1, per_class.shape[0] + 1, device=per_class.device)[:, None].expand_as(top)
        return boxes[top[above]], top_scores[above], classes[above]


def graph_detections(outputs: Sequence[torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
    """A detection graph's outputs for an image of `height` x `width` as the eager model's detections:
    `boxes`, `scores`, `labels` (int64) and, for a Mask R-CNN, `masks` (D, 1, H, W) probabilities,
    its in-box masks pasted into the image here, after the graph (`ops.paste_masks_in_image`)."""
    boxes, scores, labels, *rest = outputs
    out = {"boxes": boxes, "scores": scores, "labels": labels.long()}
    if rest:
        out["masks"] = paste_masks_in_image(rest[0], boxes, (height, width))
    return out


# -- comparing two sets of detections ----------------------------------------------------------------

def compare_detections(got: tuple[np.ndarray, ...], expected: tuple[np.ndarray, ...]) -> tuple[float, ...]:
    """The largest differences between two detectors' outputs (boxes, scores, labels, and masks where
    both have them): boxes and scores relative to the range of the expected ones, masks (probabilities)
    as the largest mean absolute difference of one detection's mask (float32 rounding moves single
    pixels of a steep sigmoid by ~1e-4; a wrong mask moves its mean by far more), compared as sets
    (each expected detection paired with the closest one of the same label). A detection without a
    partner counts as `inf`, unless it is one of the lowest-scored (1e-3 of the top score from the
    lowest), which a last-bit difference in a score at the threshold or at the cut of
    `detections_per_img` decides either way. One value per output of `expected`
    (labels: 0 when they agree)."""
    with_masks = len(expected) > 3 and len(got) > 3
    g_masks, e_masks = ((np.asarray(got[3], np.float64), np.asarray(expected[3], np.float64)) if with_masks
                        else (None, None))
    (g_boxes, g_scores, g_labels), (e_boxes, e_scores, e_labels) = (
        [np.asarray(a, np.float64) for a in outputs[:3]] for outputs in (got, expected))
    failed = (float("inf"),) * (4 if with_masks else 3)

    def result(box_diff: float, score_diff: float, pairs: list[tuple[int, int]]) -> tuple[float, ...]:
        if g_masks is None or e_masks is None:
            return box_diff, score_diff, 0.0
        mask_diff = max((float(np.abs(g_masks[j] - e_masks[i]).mean()) for i, j in pairs), default=0.0)
        return box_diff, score_diff, 0.0, mask_diff

    if len(e_scores) == len(g_scores) and np.array_equal(e_labels, g_labels):
        if not len(e_scores):
            return result(0.0, 0.0, [])
        box_diff = float(np.abs(g_boxes - e_boxes).max())
        if box_diff <= 1e-3 * max(1.0, float(np.abs(e_boxes).max())):
            return result(box_diff / max(1e-12, float(np.abs(e_boxes).max())),
                          float(np.abs(g_scores - e_scores).max() / max(1e-12, np.abs(e_scores).max())),
                          [(i, i) for i in range(len(e_scores))])
    box_scale = max(1e-12, float(np.abs(e_boxes).max()) if len(e_boxes) else 1.0)
    score_scale = max(1e-12, float(np.abs(e_scores).max()) if len(e_scores) else 1.0)
    both = np.concatenate((e_scores, g_scores))
    low = (both.min() if both.size else 0.0) + 1e-3 * score_scale
    free = np.ones(len(g_scores), bool)
    box_diff = score_diff = 0.0
    pairs = []
    for i in np.argsort(-e_scores, kind="stable"):
        same = np.where(free & (g_labels == e_labels[i]))[0]
        if same.size:
            dist = np.abs(g_boxes[same] - e_boxes[i]).max(1)
            j = same[int(dist.argmin())]
            if dist.min() <= 1e-3 * box_scale:
                free[j] = False
                pairs.append((int(i), int(j)))
                box_diff = max(box_diff, float(dist.min()) / box_scale)
                score_diff = max(score_diff, abs(float(g_scores[j] - e_scores[i])) / score_scale)
                continue
        if e_scores[i] > low:
            return failed
    if (g_scores[free] > low).any():
        return failed
    return result(box_diff, score_diff, pairs)
