"""The second stage of the two-stage detectors: per-region heads on RoIAlign-pooled features.

Girshick, "Fast R-CNN" (2015) and Ren et al., "Faster R-CNN" (2015): each proposal's features
are pooled from the pyramid (`MultiScaleRoIAlign`), a box head turns them into a vector
(`TwoMLPHead`, or the v2 `ConvFCHead` of Li et al., "Benchmarking Detection Transfer Learning
with Vision Transformers", 2021: four 3x3 convolutions with BatchNorm and one FC layer), and the
predictor scores every class and regresses one box per class. He et al., "Mask R-CNN" (2017)
adds a mask head (four 3x3 convolutions, a 2x upsampling transposed convolution and a 1x1 logit
per class, 28x28 per region) and a keypoint head (eight 3x3 convolutions, a transposed
convolution and a 2x bilinear upsampling: a 56x56 heatmap per keypoint).

`RoIHeads` runs them: in evaluation the post-processing (softmax, per-class boxes, score
threshold, NMS per class, the best `detections_per_img`), the class's mask probabilities and
the decoded keypoints; in training the sampled proposals' losses. State-dict names and the
arithmetic follow torchvision's `roi_heads` module.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import (
    BoxCoder,
    MultiScaleRoIAlign,
    batched_nms,
    box_iou,
    clip_boxes_to_image,
    heatmaps_to_keypoints,
    remove_small_boxes,
    roi_align,
)
from ..layers import ConvNormAct
from .matching import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher
from .rpn import sample_balanced
from .transform import Target

NormLayer = Callable[[int], nn.Module]
MIN_DETECTION_SIZE = 1e-2  # detections narrower or lower than this (pixels) are dropped


def _kaiming_fan_out(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TwoMLPHead(nn.Module):
    """Flatten, then two fully connected layers with ReLU (`fc6`, `fc7`)."""

    def __init__(self, in_features: int, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_features = representation_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class ConvFCHead(nn.Sequential):
    """3x3 convolutions (with `norm_layer`, ReLU), flatten, fully connected layers with ReLU; the v2 box head."""

    def __init__(self, in_channels: int, resolution: int, conv_channels: tuple[int, ...], fc_features: tuple[int, ...],
                 norm_layer: NormLayer | None = None):
        layers: list[nn.Module] = []
        channels = in_channels
        for width in conv_channels:
            layers.append(ConvNormAct(channels, width, 3, norm_layer=norm_layer))
            channels = width
        layers.append(nn.Flatten())
        features = channels * resolution * resolution
        for width in fc_features:
            layers.extend([nn.Linear(features, width), nn.ReLU(inplace=True)])
            features = width
        super().__init__(*layers)
        self.out_features = features
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class FastRCNNPredictor(nn.Module):
    """Class logits (`num_classes`, the background included) and one box regression per class."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskRCNNHeads(nn.Sequential):
    """3x3 convolutions with ReLU (and `norm_layer` in v2) on the 14x14 pooled features."""

    def __init__(self, in_channels: int, layers: tuple[int, ...] = (256, 256, 256, 256), dilation: int = 1,
                 norm_layer: NormLayer | None = None):
        blocks, channels = [], in_channels
        for width in layers:
            blocks.append(ConvNormAct(channels, width, 3, padding=dilation, dilation=dilation, norm_layer=norm_layer))
            channels = width
        super().__init__(*blocks)
        self.out_channels = channels
        _kaiming_fan_out(self)


class MaskRCNNPredictor(nn.Sequential):
    """2x upsampling (`conv5_mask`, a stride-2 transposed convolution) and one mask logit per class."""

    dim_reduced: int

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int):
        super().__init__(OrderedDict([
            ("conv5_mask", nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
            ("relu", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
        ]))
        self.dim_reduced = dim_reduced
        _kaiming_fan_out(self)


class KeypointRCNNHeads(nn.Sequential):
    """3x3 convolutions, each followed by a ReLU (`0`, `2`, `4`, ... hold the weights)."""

    def __init__(self, in_channels: int, layers: tuple[int, ...] = (512,) * 8):
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in layers:
            blocks.extend([nn.Conv2d(channels, width, 3, 1, 1), nn.ReLU(inplace=True)])
            channels = width
        super().__init__(*blocks)
        self.out_channels = channels
        _kaiming_fan_out(self)


class KeypointRCNNPredictor(nn.Module):
    """One heatmap per keypoint: a stride-2 transposed convolution, then a 2x bilinear upsampling."""

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        self.kps_score_lowres = nn.ConvTranspose2d(in_channels, num_keypoints, 4, stride=2, padding=1)
        _kaiming_fan_out(self)
        self.up_scale = 2
        self.out_channels = num_keypoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.kps_score_lowres(x), scale_factor=float(self.up_scale), mode="bilinear",
                             align_corners=False, recompute_scale_factor=False)


class RoIHeads(nn.Module):
    """Box head and predictor, and optionally the mask and keypoint branches, on pooled proposals.

    Args:
        box_roi_pool, box_head, box_predictor: the box branch.
        fg_iou_thresh, bg_iou_thresh: training: proposals overlapping a ground-truth box at least /
            less than this are foreground / background.
        batch_size_per_image, positive_fraction: training: proposals sampled per image.
        bbox_reg_weights: the box coder's weights (10, 10, 5, 5 by default).
        score_thresh, nms_thresh, detections_per_img: evaluation post-processing.
        mask_roi_pool, mask_head, mask_predictor: the mask branch (all three or none).
        keypoint_roi_pool, keypoint_head, keypoint_predictor: the keypoint branch (all three or none).
    """

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, box_head: nn.Module, box_predictor: FastRCNNPredictor,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 bbox_reg_weights: tuple[float, float, float, float] | None, score_thresh: float, nms_thresh: float,
                 detections_per_img: int, mask_roi_pool: MultiScaleRoIAlign | None = None,
                 mask_head: nn.Module | None = None, mask_predictor: nn.Module | None = None,
                 keypoint_roi_pool: MultiScaleRoIAlign | None = None, keypoint_head: nn.Module | None = None,
                 keypoint_predictor: nn.Module | None = None):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_coder = BoxCoder(bbox_reg_weights or (10.0, 10.0, 5.0, 5.0))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.keypoint_roi_pool = keypoint_roi_pool
        self.keypoint_head = keypoint_head
        self.keypoint_predictor = keypoint_predictor

    @property
    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    @property
    def has_keypoint(self) -> bool:
        return self.keypoint_predictor is not None

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], targets: list[Target] | None = None
                ) -> tuple[list[Target], dict[str, torch.Tensor]]:
        """Detections per image in the resized images' pixels (evaluation: `targets` None; `masks`
        are the (D, 1, 28, 28) probabilities of each detection's class, not yet pasted), or the
        losses (training)."""
        if targets is not None:
            return [], self._losses(features, proposals, image_sizes, targets)
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        detections = self.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
        boxes = [d["boxes"] for d in detections]
        counts = [b.shape[0] for b in boxes]
        if self.has_mask:
            logits = self._mask_logits(features, boxes, image_sizes)
            labels = torch.cat([d["labels"] for d in detections])
            probs = logits.sigmoid()[torch.arange(labels.numel(), device=labels.device), labels][:, None]
            for det, masks in zip(detections, probs.split(counts), strict=True):
                det["masks"] = masks
        if self.has_keypoint:
            heatmaps = self._keypoint_logits(features, boxes, image_sizes)
            all_boxes = torch.cat(boxes)
            keypoints, scores = heatmaps_to_keypoints(heatmaps, all_boxes)
            for det, kps, kp_scores in zip(detections, keypoints.split(counts), scores.split(counts), strict=True):
                det["keypoints"] = kps
                det["keypoints_scores"] = kp_scores
        return detections, {}

    def _mask_logits(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                     image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        assert self.mask_roi_pool is not None and self.mask_head is not None and self.mask_predictor is not None
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_sizes)))

    def _keypoint_logits(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                         image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        assert (self.keypoint_roi_pool is not None and self.keypoint_head is not None
                and self.keypoint_predictor is not None)
        return self.keypoint_predictor(self.keypoint_head(self.keypoint_roi_pool(features, boxes, image_sizes)))

    def postprocess_detections(self, class_logits: torch.Tensor, box_regression: torch.Tensor,
                               proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]]) -> list[Target]:
        """Per image: one box per proposal and (non-background) class, those scoring above
        `score_thresh` and not tiny, NMS per class, the best `detections_per_img`."""
        num_classes = class_logits.shape[-1]
        counts = [p.shape[0] for p in proposals]
        boxes_all = self.box_coder.decode_batched(box_regression, proposals)
        scores_all = F.softmax(class_logits, -1)
        detections = []
        for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes, strict=True):
            boxes = clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=scores.device).repeat(scores.shape[0])
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            keep = keep[remove_small_boxes(boxes[keep], MIN_DETECTION_SIZE)]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    # -- training -----------------------------------------------------------------------------
    def _losses(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], targets: list[Target]) -> dict[str, torch.Tensor]:
        proposals, matched, labels, box_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        losses = dict(zip(("loss_classifier", "loss_box_reg"),
                          fastrcnn_loss(class_logits, box_regression, labels, box_targets), strict=True))
        if self.has_mask or self.has_keypoint:
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            pos_boxes = [p[i] for p, i in zip(proposals, positive, strict=True)]
            pos_matched = [m[i] for m, i in zip(matched, positive, strict=True)]
            if self.has_mask:
                logits = self._mask_logits(features, pos_boxes, image_sizes)
                losses["loss_mask"] = maskrcnn_loss(logits, pos_boxes, [t["masks"] for t in targets],
                                                    [t["labels"] for t in targets], pos_matched)
            if self.has_keypoint:
                heatmaps = self._keypoint_logits(features, pos_boxes, image_sizes)
                losses["loss_keypoint"] = keypointrcnn_loss(heatmaps, pos_boxes, [t["keypoints"] for t in targets],
                                                            pos_matched)
        return losses

    def select_training_samples(self, proposals: list[torch.Tensor], targets: list[Target]
                                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                                           list[torch.Tensor]]:
        """The sampled proposals (the ground-truth boxes added to them), their matched ground truth,
        class labels (0 background) and box regression targets, per image."""
        dtype, device = proposals[0].dtype, proposals[0].device
        sampled_props, matched_all, labels_all, gt_all = [], [], [], []
        for image_props, target in zip(proposals, targets, strict=True):
            gt = target["boxes"].to(dtype)
            image_props = torch.cat([image_props, gt])
            if gt.numel() == 0:
                matched = torch.zeros(image_props.shape[0], dtype=torch.int64, device=device)
                labels = torch.zeros(image_props.shape[0], dtype=torch.int64, device=device)
                gt = torch.zeros((1, 4), dtype=dtype, device=device)
            else:
                codes = self.proposal_matcher(box_iou(gt, image_props))
                matched = codes.clamp(min=0)
                labels = target["labels"][matched].to(torch.int64)
                labels[codes == BELOW_LOW_THRESHOLD] = 0
                labels[codes == BETWEEN_THRESHOLDS] = -1
            sampled_props.append(image_props)
            matched_all.append(matched)
            labels_all.append(labels)
            gt_all.append(gt)
        positives, negatives = sample_balanced(labels_all, self.batch_size_per_image, self.positive_fraction)
        box_targets = []
        for i, (pos, neg) in enumerate(zip(positives, negatives, strict=True)):
            chosen = torch.where(pos | neg)[0]
            sampled_props[i], matched_all[i], labels_all[i] = (sampled_props[i][chosen], matched_all[i][chosen],
                                                               labels_all[i][chosen])
            box_targets.append(self.box_coder.encode(gt_all[i][matched_all[i]], sampled_props[i]))
        return sampled_props, matched_all, labels_all, box_targets


def fastrcnn_loss(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: list[torch.Tensor],
                  box_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy over the classes, and smooth L1 (beta 1/9) of the foreground proposals' boxes of
    their class, summed and divided by the number of sampled proposals."""
    all_labels = torch.cat(labels)
    targets = torch.cat(box_targets)
    classification = F.cross_entropy(class_logits, all_labels)
    foreground = torch.where(all_labels > 0)[0]
    per_class = box_regression.reshape(class_logits.shape[0], -1, 4)
    box_loss = F.smooth_l1_loss(per_class[foreground, all_labels[foreground]], targets[foreground], beta=1 / 9,
                                reduction="sum")
    return classification, box_loss / max(1, all_labels.numel())


def maskrcnn_loss(mask_logits: torch.Tensor, boxes: list[torch.Tensor], gt_masks: list[torch.Tensor],
                  gt_labels: list[torch.Tensor], matched: list[torch.Tensor]) -> torch.Tensor:
    """Binary cross entropy of each positive proposal's mask logits for its class against its ground-truth
    mask cropped to the proposal and resized (RoIAlign) to the logits' size."""
    size = mask_logits.shape[-1]
    labels = torch.cat([gt[m] for gt, m in zip(gt_labels, matched, strict=True)])
    targets = []
    for masks, image_boxes, image_matched in zip(gt_masks, boxes, matched, strict=True):
        rois = torch.cat([image_matched[:, None].to(image_boxes), image_boxes], dim=1)
        targets.append(roi_align(masks[:, None].to(rois), rois, (size, size), 1.0)[:, 0])
    mask_targets = torch.cat(targets)
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    chosen = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, mask_targets)


def keypoints_to_heatmap(keypoints: torch.Tensor, rois: torch.Tensor, heatmap_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each keypoint's (x, y, visibility) as the flat index of its heatmap cell in its box's
    `heatmap_size` grid, and whether it is visible and inside the box."""
    offset_x, offset_y = rois[:, 0, None], rois[:, 1, None]
    scale_x = heatmap_size / (rois[:, 2] - rois[:, 0])[:, None]
    scale_y = heatmap_size / (rois[:, 3] - rois[:, 1])[:, None]
    x, y = keypoints[..., 0], keypoints[..., 1]
    # a keypoint exactly on the right or bottom edge belongs to the last cell
    on_right, on_bottom = x == rois[:, 2, None], y == rois[:, 3, None]
    cx = ((x - offset_x) * scale_x).floor().long()
    cy = ((y - offset_y) * scale_y).floor().long()
    cx[on_right] = heatmap_size - 1
    cy[on_bottom] = heatmap_size - 1
    valid = (cx >= 0) & (cy >= 0) & (cx < heatmap_size) & (cy < heatmap_size) & (keypoints[..., 2] > 0)
    return (cy * heatmap_size + cx) * valid, valid


def keypointrcnn_loss(heatmaps: torch.Tensor, boxes: list[torch.Tensor], gt_keypoints: list[torch.Tensor],
                      matched: list[torch.Tensor]) -> torch.Tensor:
    """Cross entropy over each visible keypoint's heatmap cells (a softmax over the whole heatmap)."""
    count, joints, height, width = heatmaps.shape
    cells, valid = [], []
    for image_boxes, keypoints, image_matched in zip(boxes, gt_keypoints, matched, strict=True):
        image_cells, image_valid = keypoints_to_heatmap(keypoints[image_matched], image_boxes, height)
        cells.append(image_cells.reshape(-1))
        valid.append(image_valid.reshape(-1))
    targets = torch.cat(cells)
    chosen = torch.where(torch.cat(valid))[0]
    if targets.numel() == 0 or chosen.numel() == 0:
        return heatmaps.sum() * 0
    return F.cross_entropy(heatmaps.reshape(count * joints, height * width)[chosen], targets[chosen])
