"""RetinaNet.

Lin et al., "Focal Loss for Dense Object Detection" (2017): a ResNet-50 feature pyramid (P3-P7),
9 anchors per location, and two convolutional heads shared across levels, one scoring every
anchor for every class (sigmoid, trained with the focal loss), one regressing its box. The v2
variant follows Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection"
(ATSS, 2019) as torchvision trains it: GroupNorm in the heads, P6 from C5, a GIoU box loss, and
a BatchNorm backbone. State-dict names match torchvision's.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import BoxCoder, box_iou
from ..layers import ConvNormAct
from .anchors import AnchorGenerator
from .backbones import BackboneWithFPN, resnet_body
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionModel,
    check_num_classes,
    declared_out_channels,
    dense_detections,
    split_levels,
)
from .fpn import LastLevelP6P7
from .losses import generalized_box_iou_loss, sigmoid_focal_loss
from .matching import BETWEEN_THRESHOLDS, Matcher
from .transform import DetectionTransform, ImageBatch, Target


class BoxLoss(Enum):
    L1 = "l1"  # on the encoded deltas
    SMOOTH_L1 = "smooth_l1"  # on the encoded deltas, beta 1
    GIOU = "giou"  # 1 - GIoU of the decoded boxes


@dataclass(frozen=True)
class RetinaNetConfig:
    backbone: str = "resnet50"  # a zoo ResNet variant
    frozen_norm: bool = True  # FrozenBatchNorm2d in the backbone (else BatchNorm2d)
    head_norm: bool = False  # GroupNorm(32) after each head convolution
    p6_from_c5: bool = False  # P6 from the backbone's last stage instead of from P5
    box_loss: BoxLoss = BoxLoss.L1


VARIANTS: dict[str, RetinaNetConfig] = {
    "retinanet_resnet50_fpn": RetinaNetConfig(),
    "retinanet_resnet50_fpn_v2": RetinaNetConfig(frozen_norm=False, head_norm=True, p6_from_c5=True,
                                                 box_loss=BoxLoss.GIOU),
}


def retinanet_anchors(strides: Sequence[int] = (8, 16, 32, 64, 128)) -> AnchorGenerator:
    """Three sizes (4 x stride, times 2^0, 2^(1/3), 2^(2/3)) and three aspect ratios per level."""
    sizes = [(4 * s, int(4 * s * 2 ** (1.0 / 3)), int(4 * s * 2 ** (2.0 / 3))) for s in strides]
    return AnchorGenerator(sizes, [(0.5, 1.0, 2.0)] * len(sizes))


def flatten_level(x: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, A * columns, H, W) head output as (N, H * W * A, columns), location-major like the anchors."""
    n, _, h, w = x.shape
    return x.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)


def normal_init(*modules: nn.Module) -> None:
    """Every convolution in `modules`: weights from N(0, 0.01^2), biases zero (the heads' init)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _conv_tower(channels: int, norm_layer: Callable[[int], nn.Module] | None) -> nn.Sequential:
    tower = nn.Sequential(*(ConvNormAct(channels, channels, 3, norm_layer=norm_layer) for _ in range(4)))
    normal_init(tower)
    return tower


def class_logits_conv(in_channels: int, num_anchors: int, num_classes: int, prior_probability: float = 0.01
                      ) -> nn.Conv2d:
    """The final classification convolution, biased so every class starts at `prior_probability`."""
    conv = nn.Conv2d(in_channels, num_anchors * num_classes, 3, 1, 1)
    nn.init.normal_(conv.weight, std=0.01)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, -math.log((1 - prior_probability) / prior_probability))
    return conv


def reset_class_logits(head: Any, num_classes: int) -> int:  # RetinaNet's or FCOS's classification head
    """Give a dense classification head (`cls_logits`, `num_anchors`, `num_classes`) a new class
    layer for `num_classes`, on the old layer's device and dtype; returns `num_classes`."""
    old = head.cls_logits
    head.cls_logits = class_logits_conv(old.in_channels, head.num_anchors, check_num_classes(num_classes)).to(
        device=old.weight.device, dtype=old.weight.dtype)
    head.num_classes = num_classes
    return num_classes


class DenseClassificationHead(nn.Module):
    """A convolution tower (`conv`, built by the caller) and a class-logit convolution, shared by
    every pyramid level: (N, locations x anchors, classes) logits. RetinaNet's and FCOS's."""

    def __init__(self, tower: nn.Module, in_channels: int, num_anchors: int, num_classes: int):
        super().__init__()
        self.conv = tower
        self.cls_logits = class_logits_conv(in_channels, num_anchors, num_classes)
        self.num_classes = num_classes
        self.num_anchors = num_anchors

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([flatten_level(self.cls_logits(self.conv(f)), self.num_classes) for f in features], dim=1)


class RetinaNetClassificationHead(DenseClassificationHead):
    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__(_conv_tower(in_channels, norm_layer), in_channels, num_anchors, num_classes)


class RetinaNetRegressionHead(nn.Module):
    def __init__(self, in_channels: int, num_anchors: int, norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.conv = _conv_tower(in_channels, norm_layer)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, 1, 1)
        normal_init(self.bbox_reg)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([flatten_level(self.bbox_reg(self.conv(f)), 4) for f in features], dim=1)


class RetinaNetHead(nn.Module):
    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.classification_head = RetinaNetClassificationHead(in_channels, num_anchors, num_classes, norm_layer)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"cls_logits": self.classification_head(features), "bbox_regression": self.regression_head(features)}


def box_regression_loss(kind: BoxLoss, coder: BoxCoder, anchors: torch.Tensor, matched_boxes: torch.Tensor,
                        regression: torch.Tensor) -> torch.Tensor:
    """Summed box loss of the foreground anchors' `regression` against their `matched_boxes`."""
    if kind is BoxLoss.GIOU:
        return generalized_box_iou_loss(coder.decode(regression, anchors), matched_boxes, reduction="sum")
    deltas = coder.encode(matched_boxes, anchors)
    if kind is BoxLoss.SMOOTH_L1:
        return F.smooth_l1_loss(regression, deltas, reduction="sum", beta=1.0)
    return F.l1_loss(regression, deltas, reduction="sum")


class DenseDetector(DetectionModel):
    """RetinaNet's and FCOS's common ground: a head with a `classification_head` scoring every
    location of the pyramid, torchvision's resizing transform, and the dense post-processing
    settings (score threshold, per-class NMS, detections kept, candidates per level)."""

    def set_inference(self, min_size: int | Sequence[int], max_size: int, image_mean: Sequence[float] | None,
                      image_std: Sequence[float] | None, size_divisible: int, fixed_size: tuple[int, int] | None,
                      score_thresh: float, nms_thresh: float, detections_per_img: int, topk_candidates: int) -> None:
        self.transform = DetectionTransform(min_size, max_size, image_mean or IMAGENET_MEAN,
                                            image_std or IMAGENET_STD, size_divisible, fixed_size)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = reset_class_logits(self.head.classification_head, num_classes)


_LEGACY_HEAD = re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$")


class RetinaNet(DenseDetector):
    """RetinaNet on a ResNet-FPN (or any `backbone` returning `out_channels`-wide pyramid levels).

    Arguments are torchvision's (`num_classes` counts the background, as COCO's 91 do); the
    transform arguments are documented on `DetectionTransform`. `frozen_bn_eps` sets the eps of
    the backbone's FrozenBatchNorm2d layers (0.0 for the published COCO_V1 weights of
    `retinanet_resnet50_fpn`); `backbone` and `anchor_generator` replace the ResNet-50-FPN and the
    default anchors (detectors on other classifiers).
    """

    head: RetinaNetHead

    def __init__(self, cfg: RetinaNetConfig, num_classes: int = 91, min_size: int | Sequence[int] = 800,
                 max_size: int = 1333, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 300, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                 topk_candidates: int = 1000, trainable_backbone_layers: int | None = None,
                 frozen_bn_eps: float = 1e-5, size_divisible: int = 32, fixed_size: tuple[int, int] | None = None,
                 backbone: nn.Module | None = None, anchor_generator: AnchorGenerator | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_classes = check_num_classes(num_classes)
        if backbone is None:
            body = resnet_body(cfg.backbone, cfg.frozen_norm, trainable_backbone_layers, frozen_bn_eps)
            extra = LastLevelP6P7(body.num_features if cfg.p6_from_c5 else 256, 256)
            backbone = BackboneWithFPN(body, (2, 3, 4), 256, extra)
        self.backbone = backbone
        self.anchor_generator = anchor_generator or retinanet_anchors()
        head_norm = partial(nn.GroupNorm, 32) if cfg.head_norm else None
        self.head = RetinaNetHead(declared_out_channels(backbone), self.anchor_generator.num_anchors_per_location()[0],
                                  num_classes, head_norm)
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.set_inference(min_size, max_size, image_mean, image_std, size_divisible, fixed_size, score_thresh,
                           nms_thresh, detections_per_img, topk_candidates)

    def compute_loss(self, targets: list[Target], outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                     features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        cls_losses, box_losses = [], []
        for target, logits, regression, image_anchors in zip(
                targets, outputs["cls_logits"], outputs["bbox_regression"], anchors, strict=True):
            if target["boxes"].numel() == 0:
                matched = torch.full((image_anchors.shape[0],), -1, dtype=torch.int64, device=image_anchors.device)
            else:
                matched = self.proposal_matcher(box_iou(target["boxes"], image_anchors))
            foreground = matched >= 0
            num_foreground = foreground.sum()
            gt_classes = torch.zeros_like(logits)
            gt_classes[foreground, target["labels"][matched[foreground]]] = 1.0
            valid = matched != BETWEEN_THRESHOLDS
            cls_losses.append(sigmoid_focal_loss(logits[valid], gt_classes[valid], reduction="sum")
                              / num_foreground.clamp(min=1))
            fg = torch.where(foreground)[0]
            box_losses.append(box_regression_loss(self.cfg.box_loss, self.box_coder, image_anchors[fg],
                                                  target["boxes"][matched[fg]], regression[fg]) / max(1, fg.numel()))
        return {"classification": sum(cls_losses[1:], cls_losses[0]) / len(targets),
                "bbox_regression": sum(box_losses[1:], box_losses[0]) / max(1, len(targets))}

    def postprocess_detections(self, outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                               batch: ImageBatch, features: list[torch.Tensor]) -> list[Target]:
        logits = split_levels(outputs["cls_logits"], features)
        return dense_detections(self, lambda i: [torch.sigmoid(level[i]).flatten() for level in logits], outputs,
                                anchors, batch, features)

    def _current_name(self, key: str) -> str:
        # torchvision's first RetinaNet heads had plain conv/ReLU lists: conv.0, conv.2, ... are conv.i.0
        match = _LEGACY_HEAD.match(key)
        if match and int(match[2]) % 2 == 0:
            return f"{match[1]}.{int(match[2]) // 2}.0.{match[3]}"
        return super()._current_name(key)


MODEL_CLASS = RetinaNet
