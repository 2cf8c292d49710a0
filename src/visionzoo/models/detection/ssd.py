"""SSD300 with a VGG-16 trunk.

Liu et al., "SSD: Single Shot MultiBox Detector" (2016): a VGG-16 truncated after conv5_3, its
fully connected layers turned into a dilated 3x3 and a 1x1 convolution, and four extra stages
of decreasing resolution; each of the six maps (conv4_3, L2-normalised with a learned scale,
fc7, conv8_2 ... conv11_2) predicts class scores (softmax over the classes, 0 the background)
and box offsets for 4 or 6 default boxes per cell. Training matches default boxes to ground
truth by IoU and mines the hardest negatives (3 per positive). `SSD` is also the base of SSDlite
(`ssdlite.py`). State-dict names match torchvision's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ...ops import BoxCoder, batched_nms, box_iou, clip_boxes_to_image
from ..base import init_weights_torchvision
from ..vgg import VARIANTS as VGG_VARIANTS
from ..vgg import vgg_features
from .anchors import DefaultBoxGenerator
from .base import DetectionModel, check_num_classes, declared_out_channels
from .matching import SSDMatcher
from .retinanet import flatten_level
from .transform import DetectionTransform, ImageBatch, Target

if TYPE_CHECKING:
    from .ssdlite import SSDLiteConfig


@dataclass(frozen=True)
class SSDConfig:
    size: int = 300  # images are resized to size x size
    trunk: str = "vgg16"  # a zoo VGG variant (without batch normalisation)
    aspect_ratios: tuple[tuple[float, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    scales: tuple[float, ...] = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
    steps: tuple[int, ...] = (8, 16, 32, 64, 100, 300)
    image_mean: tuple[float, ...] = (0.48235, 0.45882, 0.40784)
    image_std: tuple[float, ...] = (1.0 / 255.0,) * 3  # undoes the 0-1 scaling: the trunk saw 0-255 pixels


VARIANTS: dict[str, SSDConfig] = {"ssd300_vgg16": SSDConfig()}


def _xavier_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def freeze_layers(layers: nn.Sequential, stage_starts: Sequence[int], trainable_layers: int) -> None:
    """Stop gradients in `layers` before the last `trainable_layers` of the stages starting at `stage_starts`."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) \
            or not 0 <= trainable_layers <= len(stage_starts):
        raise InputError(f"trainable_backbone_layers must be an integer from 0 to {len(stage_starts)}, "
                         f"got {trainable_layers!r}")
    first_trained = len(layers) if trainable_layers == 0 else stage_starts[len(stage_starts) - trainable_layers]
    for layer in list(layers)[:first_trained]:
        for parameter in layer.parameters():
            parameter.requires_grad_(False)


class SSDFeatureExtractorVGG(nn.Module):
    """VGG-16 up to conv4_3 (`features`), then fc6/fc7 and the extra stages (`extra`); six maps."""

    def __init__(self, vgg: nn.Sequential):
        super().__init__()
        pools = [i for i, layer in enumerate(vgg) if isinstance(layer, nn.MaxPool2d)]
        pool = vgg[pools[2]]
        if isinstance(pool, nn.MaxPool2d):  # (always)
            pool.ceil_mode = True  # 75 -> 38 at 300 px, as in the paper
        self.scale_weight = nn.Parameter(torch.ones(512) * 20)
        self.features = nn.Sequential(*list(vgg)[:pools[3]])  # up to conv4_3 and its ReLU
        extra = nn.ModuleList([
            self._stage(1024, 256, 512, stride=2, padding=1),  # conv8_2
            self._stage(512, 128, 256, stride=2, padding=1),  # conv9_2
            self._stage(256, 128, 256, stride=1, padding=0),  # conv10_2
            self._stage(256, 128, 256, stride=1, padding=0),  # conv11_2
        ])
        _xavier_init(extra)
        fc = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=False),  # pool5 without subsampling
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),  # fc6, dilated
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=1),  # fc7
            nn.ReLU(inplace=True),
        )
        _xavier_init(fc)
        extra.insert(0, nn.Sequential(*list(vgg)[pools[3]:-1], fc))  # pool4, conv5_x (not pool5), fc6, fc7
        self.extra = extra
        self.out_channels = [512, 1024, 512, 256, 256, 256]

    @staticmethod
    def _stage(in_channels: int, mid: int, out_channels: int, stride: int, padding: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(in_channels, mid, 1), nn.ReLU(inplace=True),
                             nn.Conv2d(mid, out_channels, 3, stride=stride, padding=padding), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.features(x)
        outputs = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return outputs


class SSDScoringHead(nn.Module):
    """One prediction module per feature map; outputs concatenated as (N, sum H*W*A, columns)."""

    def __init__(self, module_list: nn.ModuleList, num_columns: int):
        super().__init__()
        self.module_list = module_list
        self.num_columns = num_columns

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([flatten_level(module(f), self.num_columns)
                          for module, f in zip(self.module_list, features, strict=True)], dim=1)


class SSDClassificationHead(SSDScoringHead):
    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int):
        convs = nn.ModuleList(nn.Conv2d(c, num_classes * a, 3, padding=1)
                              for c, a in zip(in_channels, num_anchors, strict=True))
        _xavier_init(convs)
        super().__init__(convs, num_classes)


class SSDRegressionHead(SSDScoringHead):
    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int]):
        convs = nn.ModuleList(nn.Conv2d(c, 4 * a, 3, padding=1) for c, a in zip(in_channels, num_anchors, strict=True))
        _xavier_init(convs)
        super().__init__(convs, 4)


class ClassScoringHeads(nn.Module):
    """The class and box heads of an SSD-style detector, and a way to renew the class head."""

    classification_head: SSDScoringHead
    regression_head: SSDScoringHead

    def new_classification_head(self, num_classes: int) -> SSDScoringHead:
        raise NotImplementedError


class SSDHead(ClassScoringHeads):
    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int):
        super().__init__()
        self.classification_head = SSDClassificationHead(in_channels, num_anchors, num_classes)
        self.regression_head = SSDRegressionHead(in_channels, num_anchors)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"bbox_regression": self.regression_head(features), "cls_logits": self.classification_head(features)}

    def new_classification_head(self, num_classes: int) -> SSDScoringHead:
        convs = [conv for conv in self.classification_head.module_list if isinstance(conv, nn.Conv2d)]
        num_anchors = [c.out_channels // self.classification_head.num_columns for c in convs]
        return SSDClassificationHead([c.in_channels for c in convs], num_anchors, num_classes)


class SSD(DetectionModel):
    """SSD300-VGG16, and the base of the SSD family (a fixed input size, softmax scores over the
    classes with 0 the background, per-class selection then NMS).

    Arguments are torchvision's (`num_classes` counts the background, as COCO's 91 do). `backbone`
    (returning one map per default-box level, with a list `out_channels`), `anchor_generator` and
    `head` replace the VGG trunk, the default boxes and the head.
    """

    head: ClassScoringHeads
    first_label = 1  # 0 is the background

    def __init__(self, cfg: SSDConfig | SSDLiteConfig, num_classes: int = 91, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, score_thresh: float = 0.01, nms_thresh: float = 0.45,
                 detections_per_img: int = 200, iou_thresh: float = 0.5, topk_candidates: int = 400,
                 positive_fraction: float = 0.25, trainable_backbone_layers: int | None = None,
                 backbone: nn.Module | None = None, anchor_generator: DefaultBoxGenerator | None = None,
                 head: ClassScoringHeads | None = None):
        super().__init__()
        self.cfg = cfg
        if backbone is None:
            vgg, info = vgg_features(VGG_VARIANTS[cfg.trunk])
            init_weights_torchvision(vgg)
            stage_starts = [0] + [int(stage.module.split(".")[1]) for stage in info][:-1]
            freeze_layers(vgg, stage_starts, 4 if trainable_backbone_layers is None else trainable_backbone_layers)
            backbone = SSDFeatureExtractorVGG(vgg)
        if anchor_generator is None:
            if not isinstance(cfg, SSDConfig):
                raise InputError("an SSD without SSD300's default boxes needs its anchor_generator")
            anchor_generator = DefaultBoxGenerator(cfg.aspect_ratios, scales=cfg.scales, steps=cfg.steps)
        if head is None:
            head = SSDHead(declared_out_channels(backbone), anchor_generator.num_anchors_per_location(),
                           check_num_classes(num_classes, 2))
        self._setup(backbone, anchor_generator, head, num_classes, image_mean or cfg.image_mean,
                    image_std or cfg.image_std, score_thresh, nms_thresh, detections_per_img, iou_thresh,
                    topk_candidates, positive_fraction)

    def _setup(self, backbone: nn.Module, anchor_generator: DefaultBoxGenerator, head: ClassScoringHeads,
               num_classes: int, image_mean: Sequence[float], image_std: Sequence[float], score_thresh: float,
               nms_thresh: float, detections_per_img: int, iou_thresh: float, topk_candidates: int,
               positive_fraction: float) -> None:
        num_maps = len(declared_out_channels(backbone))
        if num_maps != len(anchor_generator.aspect_ratios):
            raise InputError(f"the backbone gives {num_maps} feature maps but the default boxes "
                             f"are configured for {len(anchor_generator.aspect_ratios)}")
        if not 0 < positive_fraction <= 1:
            raise InputError(f"positive_fraction must be in (0, 1], got {positive_fraction!r}")
        self.num_classes = check_num_classes(num_classes, 2)
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.proposal_matcher = SSDMatcher(iou_thresh)
        size = self.cfg.size
        self.transform = DetectionTransform(size, size, image_mean, image_std, size_divisible=1,
                                            fixed_size=(size, size))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.neg_to_pos_ratio = (1.0 - positive_fraction) / positive_fraction

    def reset_classifier(self, num_classes: int) -> None:
        old = next(self.head.classification_head.parameters())
        self.head.classification_head = self.head.new_classification_head(check_num_classes(num_classes, 2)).to(
            device=old.device, dtype=old.dtype)
        self.num_classes = num_classes

    def compute_loss(self, targets: list[Target], outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                     features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        cls_logits = outputs["cls_logits"]
        num_foreground = 0
        box_losses, cls_targets = [], []
        for target, regression, logits, image_anchors in zip(
                targets, outputs["bbox_regression"], cls_logits, anchors, strict=True):
            if target["boxes"].numel() == 0:
                matched = torch.full((image_anchors.shape[0],), -1, dtype=torch.int64, device=image_anchors.device)
            else:
                matched = self.proposal_matcher(box_iou(target["boxes"], image_anchors))
            fg = torch.where(matched >= 0)[0]
            fg_matched = matched[fg]
            num_foreground += fg_matched.numel()
            deltas = self.box_coder.encode(target["boxes"][fg_matched], image_anchors[fg])
            box_losses.append(F.smooth_l1_loss(regression[fg], deltas, reduction="sum"))
            classes = torch.zeros(logits.shape[0], dtype=target["labels"].dtype, device=target["labels"].device)
            classes[fg] = target["labels"][fg_matched]
            cls_targets.append(classes)
        cls_target = torch.stack(cls_targets)
        cls_loss = F.cross_entropy(cls_logits.view(-1, cls_logits.shape[-1]), cls_target.view(-1),
                                   reduction="none").view(cls_target.shape)
        # hard negative mining: per image, the background anchors with the highest loss, 3 per positive
        foreground = cls_target > 0
        num_negative = self.neg_to_pos_ratio * foreground.sum(1, keepdim=True)
        negative_loss = cls_loss.clone()
        negative_loss[foreground] = -float("inf")  # positives sort last
        order = negative_loss.sort(1, descending=True)[1]
        background = order.sort(1)[1] < num_negative
        n = max(1, num_foreground)
        return {"bbox_regression": torch.stack(box_losses).sum() / n,
                "classification": (cls_loss[foreground].sum() + cls_loss[background].sum()) / n}

    def postprocess_detections(self, outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                               batch: ImageBatch, features: list[torch.Tensor]) -> list[Target]:
        all_scores = F.softmax(outputs["cls_logits"], dim=-1)
        detections = []
        for regression, scores, image_anchors, image_size in zip(
                outputs["bbox_regression"], all_scores, anchors, batch.image_sizes, strict=True):
            boxes = clip_boxes_to_image(self.box_coder.decode(regression, image_anchors), image_size)
            per_class = scores.t()[1:].contiguous()  # (classes - 1, anchors), background dropped
            candidates = per_class > self.score_thresh
            selected, image_scores, image_labels = [], [], []
            for label, (score, keep) in enumerate(zip(per_class, candidates, strict=True), start=1):
                # the scores above the threshold, then the best of them (index_select: cheaper than
                # masking, same values in the same order, so topk breaks ties the same way)
                anchor_idx = torch.where(keep)[0]
                score, order = score.index_select(0, anchor_idx).topk(min(self.topk_candidates, anchor_idx.numel()))
                selected.append(anchor_idx.index_select(0, order))
                image_scores.append(score)
                image_labels.append(torch.full_like(score, label, dtype=torch.int64))
            candidates = boxes.index_select(0, torch.cat(selected))
            scores_all, labels_all = torch.cat(image_scores), torch.cat(image_labels)
            keep = batched_nms(candidates, scores_all, labels_all, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": candidates[keep], "scores": scores_all[keep], "labels": labels_all[keep]})
        return detections


MODEL_CLASS = SSD
