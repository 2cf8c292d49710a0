"""FCOS.

Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection" (2019; the improved version of
2020 as torchvision trains it): no anchor boxes, every location of a ResNet-50 feature pyramid
(P3-P7) scores every class and regresses its distances to the four sides of the box, with a
centre-ness branch that down-weights locations far from a box's centre. Training assigns each
ground-truth box to the locations near its centre on the level matching its size. State-dict
names match torchvision's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ...ops import BoxLinearCoder
from .anchors import AnchorGenerator
from .backbones import BackboneWithFPN, resnet_body
from .base import (
    check_num_classes,
    declared_out_channels,
    dense_detections,
    split_levels,
)
from .fpn import LastLevelP6P7
from .losses import generalized_box_iou_loss, sigmoid_focal_loss
from .retinanet import DenseClassificationHead, DenseDetector, flatten_level, normal_init
from .transform import ImageBatch, Target


@dataclass(frozen=True)
class FCOSConfig:
    backbone: str = "resnet50"  # a zoo ResNet variant
    num_convs: int = 4  # convolution + GroupNorm + ReLU layers in each head branch


VARIANTS: dict[str, FCOSConfig] = {"fcos_resnet50_fpn": FCOSConfig()}


def fcos_anchors(strides: Sequence[int] = (8, 16, 32, 64, 128)) -> AnchorGenerator:
    """One square per location, as wide as the level's stride: only its centre (the point) matters."""
    return AnchorGenerator([(s,) for s in strides], [(1.0,)] * len(strides))


def _branch(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, 1, 1), nn.GroupNorm(32, channels), nn.ReLU()]
    branch = nn.Sequential(*layers)
    normal_init(branch)
    return branch


class FCOSClassificationHead(DenseClassificationHead):
    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4):
        super().__init__(_branch(in_channels, num_convs), in_channels, num_anchors, num_classes)


class FCOSRegressionHead(nn.Module):
    """Distances to the box sides (non-negative) and the centre-ness logit, from one shared branch."""

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 4):
        super().__init__()
        self.conv = _branch(in_channels, num_convs)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, 1, 1)
        self.bbox_ctrness = nn.Conv2d(in_channels, num_anchors, 3, 1, 1)
        normal_init(self.bbox_reg, self.bbox_ctrness)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, centreness = [], []
        for f in features:
            x = self.conv(f)
            boxes.append(flatten_level(F.relu(self.bbox_reg(x)), 4))
            centreness.append(flatten_level(self.bbox_ctrness(x), 1))
        return torch.cat(boxes, dim=1), torch.cat(centreness, dim=1)


class FCOSHead(nn.Module):
    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4):
        super().__init__()
        self.classification_head = FCOSClassificationHead(in_channels, num_anchors, num_classes, num_convs)
        self.regression_head = FCOSRegressionHead(in_channels, num_anchors, num_convs)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        boxes, centreness = self.regression_head(features)
        return {"cls_logits": self.classification_head(features), "bbox_regression": boxes,
                "bbox_ctrness": centreness}


class FCOS(DenseDetector):
    """FCOS on a ResNet-FPN (or any `backbone` returning `out_channels`-wide pyramid levels).

    Arguments are torchvision's (`num_classes` counts the background, as COCO's 91 do);
    `center_sampling_radius` (in strides) bounds the locations a box is assigned to in training.
    `frozen_bn_eps`, `backbone`, `anchor_generator`: as for `RetinaNet`.
    """

    head: FCOSHead

    def __init__(self, cfg: FCOSConfig, num_classes: int = 91, min_size: int | Sequence[int] = 800,
                 max_size: int = 1333, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, center_sampling_radius: float = 1.5,
                 score_thresh: float = 0.2, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 topk_candidates: int = 1000, trainable_backbone_layers: int | None = None,
                 frozen_bn_eps: float = 1e-5, size_divisible: int = 32, fixed_size: tuple[int, int] | None = None,
                 backbone: nn.Module | None = None, anchor_generator: AnchorGenerator | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_classes = check_num_classes(num_classes)
        if backbone is None:
            body = resnet_body(cfg.backbone, True, trainable_backbone_layers, frozen_bn_eps)
            backbone = BackboneWithFPN(body, (2, 3, 4), 256, LastLevelP6P7(256, 256))
        self.backbone = backbone
        self.anchor_generator = anchor_generator or fcos_anchors()
        if self.anchor_generator.num_anchors_per_location()[0] != 1:
            raise InputError("FCOS needs one anchor (point) per location")
        self.head = FCOSHead(declared_out_channels(backbone), 1, num_classes, cfg.num_convs)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.set_inference(min_size, max_size, image_mean, image_std, size_divisible, fixed_size, score_thresh,
                           nms_thresh, detections_per_img, topk_candidates)
        self.center_sampling_radius = center_sampling_radius

    def match(self, target: Target, anchors: torch.Tensor, num_anchors_per_level: list[int]) -> torch.Tensor:
        """Each location's ground-truth box (or -1): the smallest box whose centre region (radius in
        strides) and interior hold the location, on the level responsible for the box's size."""
        gt_boxes = target["boxes"]
        if gt_boxes.numel() == 0:
            return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        strides = anchors[:, 2] - anchors[:, 0]
        match = ((centers[:, None, :] - gt_centers[None, :, :]).abs_().max(dim=2).values
                 < self.center_sampling_radius * strides[:, None])
        x, y = centers.unsqueeze(dim=2).unbind(dim=1)
        x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)
        distances = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
        match &= distances.min(dim=2).values > 0
        lower, upper = strides * 4, strides * 8
        lower[: num_anchors_per_level[0]] = 0
        upper[-num_anchors_per_level[-1]:] = float("inf")
        reach = distances.max(dim=2).values
        match &= (reach > lower[:, None]) & (reach < upper[:, None])
        areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
        ranked = match.to(torch.float32) * (1e8 - areas[None, :])  # the smallest box ranks highest
        best, matched = ranked.max(dim=1)
        matched[best < 1e-5] = -1
        return matched

    def compute_loss(self, targets: list[Target], outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                     features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        gt_classes, gt_boxes = [], []
        for target, image_anchors in zip(targets, anchors, strict=True):
            matched = self.match(target, image_anchors, per_level)
            if len(target["labels"]) == 0:
                classes = target["labels"].new_zeros((len(matched),))
                boxes = target["boxes"].new_zeros((len(matched), 4))
            else:
                classes = target["labels"][matched.clip(min=0)]
                boxes = target["boxes"][matched.clip(min=0)]
            classes[matched < 0] = -1  # background
            gt_classes.append(classes)
            gt_boxes.append(boxes)
        gt_boxes_all, gt_classes_all, anchors_all = torch.stack(gt_boxes), torch.stack(gt_classes), torch.stack(anchors)
        foreground = gt_classes_all >= 0
        num_foreground = max(1, foreground.sum().item())

        logits = outputs["cls_logits"]
        class_targets = torch.zeros_like(logits)
        class_targets[foreground, gt_classes_all[foreground]] = 1.0
        loss_cls = sigmoid_focal_loss(logits, class_targets, reduction="sum")

        pred_boxes = self.box_coder.decode(outputs["bbox_regression"], anchors_all)
        loss_box = generalized_box_iou_loss(pred_boxes[foreground], gt_boxes_all[foreground], reduction="sum")

        distances = self.box_coder.encode(anchors_all, gt_boxes_all)
        left_right, top_bottom = distances[:, :, [0, 2]], distances[:, :, [1, 3]]
        centreness = torch.sqrt((left_right.min(dim=-1).values / left_right.max(dim=-1).values)
                                * (top_bottom.min(dim=-1).values / top_bottom.max(dim=-1).values))
        loss_ctr = F.binary_cross_entropy_with_logits(outputs["bbox_ctrness"].squeeze(dim=2)[foreground],
                                                      centreness[foreground], reduction="sum")
        return {"classification": loss_cls / num_foreground, "bbox_regression": loss_box / num_foreground,
                "bbox_ctrness": loss_ctr / num_foreground}

    def postprocess_detections(self, outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                               batch: ImageBatch, features: list[torch.Tensor]) -> list[Target]:
        logits = split_levels(outputs["cls_logits"], features)
        centreness = split_levels(outputs["bbox_ctrness"], features)

        def scores(i: int) -> list[torch.Tensor]:
            return [torch.sqrt(torch.sigmoid(cls[i]) * torch.sigmoid(ctr[i])).flatten()
                    for cls, ctr in zip(logits, centreness, strict=True)]

        return dense_detections(self, scores, outputs, anchors, batch, features)


MODEL_CLASS = FCOS
