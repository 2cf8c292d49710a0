"""Box utilities over (..., 4) tensors: formats, areas, IoU, clipping, filtering, and the two box
coders detectors regress with.

Boxes are (x1, y1, x2, y2) in pixels unless a format says otherwise. The arithmetic follows
torchvision's operators step by step (same operations in the same order and precision), so that
detectors built on it reproduce torchvision's outputs to the last bits in float64.

`BoxCoder` is the R-CNN parametrisation (Girshick et al., "Rich feature hierarchies", 2014):
centre offsets scaled by the reference size and log size ratios, each divided by a weight.
`BoxLinearCoder` is FCOS's (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection",
2019): distances from the reference centre to the four sides, optionally divided by the
reference size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch

from ..enums import parse_enum
from ..errors import InputError


class BoxFormat(str, Enum):
    """How the four numbers of a box are laid out."""

    XYXY = "xyxy"  # top-left and bottom-right corners
    XYWH = "xywh"  # top-left corner, width, height
    CXCYWH = "cxcywh"  # centre, width, height


def check_boxes(boxes: torch.Tensor, what: str = "boxes") -> None:
    """InputError unless `boxes` is a tensor whose last dimension holds 4 coordinates."""
    if not isinstance(boxes, torch.Tensor):
        raise InputError(f"{what} must be a tensor of shape (..., 4), got {type(boxes).__name__}")
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise InputError(f"{what} must have shape (..., 4) (x1, y1, x2, y2 per box), got {tuple(boxes.shape)}")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Products of coordinates overflow in half precision and small integers: compute in float32 / int32."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_convert(boxes: torch.Tensor, in_fmt: BoxFormat | str, out_fmt: BoxFormat | str) -> torch.Tensor:
    """`boxes` (..., 4) from `in_fmt` to `out_fmt` (each "xyxy", "xywh" or "cxcywh"); a new tensor."""
    check_boxes(boxes)
    src, dst = parse_enum(BoxFormat, in_fmt, "box format"), parse_enum(BoxFormat, out_fmt, "box format")
    if src is dst:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if src is BoxFormat.XYWH:  # to corners first
        a, b, c, d = a, b, a + c, b + d
    elif src is BoxFormat.CXCYWH:
        a, b, c, d = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    if dst is BoxFormat.XYWH:
        c, d = c - a, d - b
    elif dst is BoxFormat.CXCYWH:
        a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
    return torch.stack((a, b, c, d), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each (x1, y1, x2, y2) box, shape (...,); negative for inverted boxes."""
    check_boxes(boxes)
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_inter_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersection and union areas, each (..., N, M), of (..., N, 4) and (..., M, 4) boxes."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = _upcast(bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area1[..., :, None] + area2[..., None, :] - inter


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union (..., N, M); 0/0 (two empty boxes) gives NaN, as torchvision's."""
    inter, union = box_inter_union(boxes1, boxes2)
    return inter / union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019), (N, M): IoU minus the share of the smallest
    enclosing box that the union leaves empty."""
    inter, union = box_inter_union(boxes1, boxes2)
    iou = inter / union
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = _upcast(bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def clip_boxes_to_image(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`boxes` (..., 4) with x clamped to [0, width] and y to [0, height]; `size` is (height, width)."""
    check_boxes(boxes)
    height, width = size
    xs = boxes[..., 0::2].clamp(min=0, max=width)
    ys = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((xs, ys), dim=boxes.dim()).reshape(boxes.shape)


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices of the boxes whose width and height are both at least `min_size`."""
    check_boxes(boxes)
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return torch.where((widths >= min_size) & (heights >= min_size))[0]


class BoxCoder:
    """Encodes boxes relative to reference boxes (anchors, proposals) as weighted
    (dx, dy, log dw, log dh), and decodes such deltas back into boxes.

    `bbox_xform_clip` caps the decoded log size ratios, so that an untrained or extreme
    regression cannot overflow `exp`.
    """

    def __init__(self, weights: Sequence[float], bbox_xform_clip: float = math.log(1000.0 / 16)):
        if len(weights) != 4:
            raise InputError(f"BoxCoder weights need 4 values (x, y, w, h), got {tuple(weights)!r}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, matched: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Deltas (N, 4) that turn each `reference` box (N, 4) into its `matched` box (N, 4)."""
        wx, wy, ww, wh = (torch.as_tensor(w, dtype=matched.dtype, device=matched.device) for w in self.weights)
        ref_w = (reference[:, 2] - reference[:, 0])[:, None]
        ref_h = (reference[:, 3] - reference[:, 1])[:, None]
        ref_cx = reference[:, 0, None] + 0.5 * ref_w
        ref_cy = reference[:, 1, None] + 0.5 * ref_h
        gt_w = (matched[:, 2] - matched[:, 0])[:, None]
        gt_h = (matched[:, 3] - matched[:, 1])[:, None]
        gt_cx = matched[:, 0, None] + 0.5 * gt_w
        gt_cy = matched[:, 1, None] + 0.5 * gt_h
        return torch.cat((wx * (gt_cx - ref_cx) / ref_w, wy * (gt_cy - ref_cy) / ref_h,
                          ww * torch.log(gt_w / ref_w), wh * torch.log(gt_h / ref_h)), dim=1)

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Boxes from `deltas` (N, 4k) on `reference` boxes (N, 4): (N, 4k), k boxes per reference
        (one per class in R-CNN box heads)."""
        reference = reference.to(deltas.dtype)
        widths = reference[:, 2] - reference[:, 0]
        heights = reference[:, 3] - reference[:, 1]
        ctr_x = reference[:, 0] + 0.5 * widths
        ctr_y = reference[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_cx = dx * widths[:, None] + ctr_x[:, None]
        pred_cy = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        boxes = torch.stack((pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h), dim=2)
        return boxes.flatten(1)

    def decode_batched(self, deltas: torch.Tensor, references: Sequence[torch.Tensor]) -> torch.Tensor:
        """Boxes (sum N_i, k, 4) from `deltas` (sum N_i, 4k) on the concatenated `references` of several
        images (N_i, 4 each): the R-CNN heads decode all images' proposals at once."""
        reference = torch.cat(list(references), dim=0)
        total, per_reference = reference.shape[0], deltas.shape[-1] // 4
        if total:
            deltas = deltas.reshape(total, -1)
        boxes = self.decode(deltas, reference)
        return boxes.reshape(total, per_reference, 4)  # (0, k, 4) when no image has a proposal


class BoxLinearCoder:
    """FCOS's coder: a box as its distances (left, top, right, bottom) from the centre of a
    reference box, divided by the reference's width and height when `normalize_by_size`."""

    def __init__(self, normalize_by_size: bool = True):
        self.normalize_by_size = normalize_by_size

    def _sizes(self, reference: torch.Tensor) -> torch.Tensor:
        w = reference[..., 2] - reference[..., 0]
        h = reference[..., 3] - reference[..., 1]
        return torch.stack((w, h, w, h), dim=-1)

    def encode(self, reference: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Distances (..., 4) from each `reference` box's centre to the sides of its `boxes` box."""
        cx = 0.5 * (reference[..., 0] + reference[..., 2])
        cy = 0.5 * (reference[..., 1] + reference[..., 3])
        targets = torch.stack((cx - boxes[..., 0], cy - boxes[..., 1], boxes[..., 2] - cx, boxes[..., 3] - cy), dim=-1)
        return targets / self._sizes(reference) if self.normalize_by_size else targets

    def decode(self, codes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Boxes (..., 4) from distances `codes` (..., 4) around the centres of `reference` (..., 4)."""
        reference = reference.to(dtype=codes.dtype)
        cx = 0.5 * (reference[..., 0] + reference[..., 2])
        cy = 0.5 * (reference[..., 1] + reference[..., 3])
        if self.normalize_by_size:
            codes = codes * self._sizes(reference)
        return torch.stack((cx - codes[..., 0], cy - codes[..., 1], cx + codes[..., 2], cy + codes[..., 3]), dim=-1)
