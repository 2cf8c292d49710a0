"""What every detector shares: the forward pass, target checks, and the dense heads' post-processing.

`DetectionModel` runs torchvision's detector protocol: `model(images)` in eval mode returns one
dict per image with `boxes` (x1, y1, x2, y2 in that image's pixels), `scores` and `labels`;
`model(images, targets)` in train mode returns a dict of losses. A family supplies the
transform, backbone, anchor generator and head, and implements `compute_loss` and
`postprocess_detections`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ...enums import Task
from ...errors import InputError
from ...ops import batched_nms, clip_boxes_to_image
from ..base import VisionModel
from .transform import DetectionTransform, ImageBatch, Target, as_image_list

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# checkpoints saved before torchvision wrapped the FPN's convolutions (its FPN "version 1")
_LEGACY_FPN = re.compile(r"^(.*fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$")


class DetectionModel(VisionModel):
    """Base of the detectors. Subclasses set `transform`, `backbone`, `anchor_generator`, `head`,
    `num_classes` and the post-processing settings in `__init__`."""

    task: ClassVar[Task] = Task.DETECTION
    first_label: ClassVar[int] = 0  # the smallest valid target label (1 where 0 is the background)
    transform: DetectionTransform
    backbone: nn.Module
    anchor_generator: nn.Module
    head: nn.Module

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], targets: Sequence[Target] | None = None
                ) -> list[Target] | dict[str, torch.Tensor]:
        """Detections per image (eval mode), or the training losses (train mode, `targets` required:
        per image a dict with `boxes` (N, 4) in pixels and `labels` (N,))."""
        images = as_image_list(images, len(self.transform.image_mean))
        checked = check_targets(targets, images, self.num_classes, self.first_label) if self.training else None
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, scaled = self.transform(images, checked)
        features = self.backbone(batch.tensors)
        outputs = self.head(features)
        anchors = self.anchor_generator(batch, features)
        if scaled is not None:  # (training)
            return self.compute_loss(scaled, outputs, anchors, features)
        detections = self.postprocess_detections(outputs, anchors, batch, features)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def detect_with_losses(self, images: Sequence[torch.Tensor], targets: Sequence[Target]
                           ) -> tuple[list[Target], dict[str, torch.Tensor]]:
        """(detections, losses) of one pass in the current mode: what validation needs (the training
        losses of held-out images, and what the model detects on them) without running the network twice."""
        images = as_image_list(images, len(self.transform.image_mean))
        checked = check_targets(targets, images, self.num_classes, self.first_label)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, scaled = self.transform(images, checked)
        features = self.backbone(batch.tensors)
        outputs = self.head(features)
        anchors = self.anchor_generator(batch, features)
        losses = self.compute_loss(scaled or [], outputs, anchors, features)
        detections = self.postprocess_detections(outputs, anchors, batch, features)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes), losses

    def compute_loss(self, targets: list[Target], outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                     features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def postprocess_detections(self, outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                               batch: ImageBatch, features: list[torch.Tensor]) -> list[Target]:
        raise NotImplementedError

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the keys of checkpoints saved by older torchvision releases (the published
        RetinaNet and FCOS files predate its FPN's `inner_blocks.i.0` names)."""
        own = self.state_dict().keys()
        renamed = {}
        for key, value in state_dict.items():
            new = self._current_name(key)
            renamed[new if new in own and key not in own else key] = value
        return renamed

    def _current_name(self, key: str) -> str:
        return _LEGACY_FPN.sub(r"\1.0.\2", key)


def declared_out_channels(backbone: nn.Module) -> Any:
    """The `out_channels` a detection backbone declares: the pyramid's width (RetinaNet, FCOS) or one width
    per map (SSD, SSDlite)."""
    channels = backbone.__dict__.get("out_channels")
    if channels is None:
        raise InputError(f"a detection backbone must declare its out_channels; {type(backbone).__name__} does not")
    return channels


def check_num_classes(num_classes: int, smallest: int = 1) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < smallest:
        raise InputError(f"num_classes must be an integer >= {smallest}, got {num_classes!r}")
    return num_classes


def check_targets(targets: Sequence[Target] | None, images: list[torch.Tensor], num_classes: int,
                  first_label: int = 0) -> list[Target]:
    """The training targets, checked: one dict per image with `boxes` (N, 4), positive width and height,
    inside the image, and integer `labels` (N,) in [first_label, num_classes)."""
    if targets is None:
        raise InputError("in train mode the model needs targets: per image a dict with 'boxes' (N, 4) "
                         "and 'labels' (N,); call model.eval() to detect instead")
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        count = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise InputError(f"targets must be a list with one dict per image ({len(images)}), got {count}")
    for i, (target, image) in enumerate(zip(targets, images, strict=True)):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise InputError(f"target {i} must be a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
            raise InputError(f"target {i}: boxes must be a tensor of shape (N, 4), got {shape}")
        if not boxes.is_floating_point():
            raise InputError(f"target {i}: boxes must be floating point, got {boxes.dtype}")
        if not isinstance(labels, torch.Tensor) or labels.shape != boxes.shape[:1]:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise InputError(f"target {i}: labels must be a tensor of shape ({boxes.shape[0]},), got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise InputError(f"target {i}: labels must be integers, got {labels.dtype}")
        height, width = image.shape[-2:]
        bad = torch.where((boxes[:, 2:] <= boxes[:, :2]).any(1))[0]
        if bad.numel():
            raise InputError(f"target {i}: box {bad[0].item()} {boxes[bad[0]].tolist()} has no width or height; "
                             "boxes are (x1, y1, x2, y2) with x1 < x2 and y1 < y2")
        outside = torch.where((boxes[:, :2] < 0).any(1) | (boxes[:, 2] > width) | (boxes[:, 3] > height))[0]
        if outside.numel():
            raise InputError(f"target {i}: box {outside[0].item()} {boxes[outside[0]].tolist()} is outside the "
                             f"{width}x{height} image; clip boxes to the image")
        out_of_range = torch.where((labels < first_label) | (labels >= num_classes))[0]
        if out_of_range.numel():
            raise InputError(f"target {i}: label {labels[out_of_range[0]].item()} is outside [{first_label}, "
                             f"{num_classes}) (num_classes={num_classes})")
    return list(targets)


def postprocess_dense(level_scores: Sequence[torch.Tensor], decode: Callable[[int, torch.Tensor], torch.Tensor],
                      num_classes: int, image_size: tuple[int, int], score_thresh: float, topk_candidates: int,
                      nms_thresh: float, detections_per_img: int) -> Target:
    """One image's detections from a dense head: per level, the scores (anchors x classes, flattened)
    above `score_thresh`, at most `topk_candidates` of them, decoded (`decode(level, anchor_indices)`)
    and clipped; then NMS per class over all levels and the best `detections_per_img`."""
    boxes, scores, labels = [], [], []
    for level, flat_scores in enumerate(level_scores):
        keep = flat_scores > score_thresh
        candidate_scores = flat_scores[keep]
        candidates = torch.where(keep)[0]
        top_scores, order = candidate_scores.topk(min(topk_candidates, candidates.numel()))
        top = candidates[order]
        anchor_idx = torch.div(top, num_classes, rounding_mode="floor")
        boxes.append(clip_boxes_to_image(decode(level, anchor_idx), image_size))
        scores.append(top_scores)
        labels.append(top % num_classes)
    all_boxes, all_scores, all_labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(all_boxes, all_scores, all_labels, nms_thresh)[:detections_per_img]
    return {"boxes": all_boxes[keep], "scores": all_scores[keep], "labels": all_labels[keep]}


def dense_detections(model: Any, level_scores: Callable[[int], Sequence[torch.Tensor]],
                     outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor], batch: ImageBatch,
                     features: list[torch.Tensor]) -> list[Target]:
    """Every image's detections from a dense head (RetinaNet, FCOS): `level_scores(i)` gives image
    i's flattened scores per level; boxes are decoded from `outputs["bbox_regression"]` with the
    model's `box_coder` and kept by its thresholds (see `postprocess_dense`)."""
    regression = split_levels(outputs["bbox_regression"], features)
    detections = []
    for i, image_size in enumerate(batch.image_sizes):
        level_anchors = split_levels(anchors[i], features, dim=0)

        def decode(level: int, idx: torch.Tensor, i: int = i, level_anchors=level_anchors) -> torch.Tensor:
            return model.box_coder.decode(regression[level][i][idx], level_anchors[level][idx])

        detections.append(postprocess_dense(level_scores(i), decode, model.num_classes, image_size,
                                            model.score_thresh, model.topk_candidates, model.nms_thresh,
                                            model.detections_per_img))
    return detections


def split_levels(tensor: torch.Tensor, features: list[torch.Tensor], dim: int = 1) -> list[torch.Tensor]:
    """`tensor`'s per-location entries (H*W*A per level along `dim`) split by feature level."""
    locations = [f.shape[-2] * f.shape[-1] for f in features]
    per_location = tensor.shape[dim] // sum(locations)
    return list(tensor.split([n * per_location for n in locations], dim=dim))
