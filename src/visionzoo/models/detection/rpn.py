"""Region proposal network: the first stage of the two-stage detectors.

Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks"
(2015). A small convolutional head, shared by every pyramid level, scores each anchor's
objectness and regresses its box; the proposals are the best-scoring decoded anchors: at most
`pre_nms_top_n` per level, clipped to the image, tiny boxes and (optionally) low scores dropped,
NMS per level, then the best `post_nms_top_n` per image. Training samples anchors by overlap
with the ground truth (`sample_balanced`, also used by the second stage). Names and arithmetic
follow torchvision's `rpn` module, so the proposals are the same boxes in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import BoxCoder, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes
from ..layers import ConvNormAct
from .anchors import AnchorGenerator
from .matching import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher
from .retinanet import flatten_level
from .transform import ImageBatch, Target

MIN_PROPOSAL_SIZE = 1e-3  # proposals narrower or lower than this (pixels) are dropped


class RPNHead(nn.Module):
    """`conv_depth` 3x3 convolutions with ReLU, then a 1x1 objectness logit and a 1x1 box regression
    (4 deltas) per anchor, on each level."""

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(*(ConvNormAct(in_channels, in_channels, 3, norm_layer=None)
                                    for _ in range(conv_depth)))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hidden = [self.conv(f) for f in features]
        return [self.cls_logits(h) for h in hidden], [self.bbox_pred(h) for h in hidden]


@dataclass(frozen=True)
class TopN:
    """How many boxes a stage keeps in training and in evaluation."""

    train: int
    test: int

    def get(self, training: bool) -> int:
        return self.train if training else self.test


def sample_balanced(labels: list[torch.Tensor], batch_size_per_image: int, positive_fraction: float
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image, boolean masks of a random sample of positives (label >= 1) and negatives (label 0):
    at most `batch_size_per_image * positive_fraction` positives, negatives filling the rest.
    Labels of -1 are never sampled."""
    positives, negatives = [], []
    for image_labels in labels:
        pos = torch.where(image_labels >= 1)[0]
        neg = torch.where(image_labels == 0)[0]
        num_pos = min(pos.numel(), int(batch_size_per_image * positive_fraction))
        num_neg = min(neg.numel(), batch_size_per_image - num_pos)
        pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_pos]]
        neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
        pos_mask = torch.zeros_like(image_labels, dtype=torch.bool)
        neg_mask = torch.zeros_like(image_labels, dtype=torch.bool)
        pos_mask[pos] = True
        neg_mask[neg] = True
        positives.append(pos_mask)
        negatives.append(neg_mask)
    return positives, negatives


class RegionProposalNetwork(nn.Module):
    """Proposals (per image, (P, 4) boxes in the resized image's pixels, best first) from the pyramid.

    Args:
        anchor_generator, head: the anchors and the head scoring them.
        fg_iou_thresh, bg_iou_thresh: training: anchors overlapping a ground-truth box at least / less
            than this are positive / negative.
        batch_size_per_image, positive_fraction: training: anchors sampled per image for the loss.
        pre_nms_top_n: best anchors kept per level before NMS; post_nms_top_n: proposals kept per
            image after it.
        nms_thresh: IoU of the per-level NMS.
        score_thresh: proposals need an objectness probability of at least this.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, fg_iou_thresh: float, bg_iou_thresh: float,
                 batch_size_per_image: int, positive_fraction: float, pre_nms_top_n: TopN, post_nms_top_n: TopN,
                 nms_thresh: float, score_thresh: float = 0.0):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh

    def forward(self, batch: ImageBatch, features: list[torch.Tensor], targets: list[Target] | None = None
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(batch, features)
        num_images = len(anchors)
        per_level = [int(level[0].numel()) for level in logits]
        objectness = torch.cat([flatten_level(level, 1) for level in logits], dim=1).flatten(1)  # (N, sum HWA)
        regression = torch.cat([flatten_level(level, 4) for level in deltas], dim=1).reshape(-1, 4)
        # the proposals carry no gradient: the second stage does not train the first through them
        proposals = self.box_coder.decode_batched(regression.detach(), anchors).view(num_images, -1, 4)
        boxes = self.select_proposals(proposals, objectness.detach(), batch.image_sizes, per_level)
        if targets is None:
            return boxes, {}
        return boxes, self.compute_loss(objectness, regression, anchors, targets)

    def select_proposals(self, proposals: torch.Tensor, objectness: torch.Tensor, image_sizes: list[tuple[int, int]],
                         per_level: list[int]) -> list[torch.Tensor]:
        """Per image: the best `pre_nms_top_n` anchors of each level, clipped, small and low-scoring ones
        dropped, NMS per level, the best `post_nms_top_n` left."""
        top_n = self.pre_nms_top_n.get(self.training)
        chosen, offset = [], 0
        for level_scores in objectness.split(per_level, dim=1):
            chosen.append(level_scores.topk(min(top_n, level_scores.shape[1]), dim=1).indices + offset)
            offset += level_scores.shape[1]
        top = torch.cat(chosen, dim=1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=objectness.device)
                            for i, n in enumerate(per_level)])[top]
        rows = torch.arange(proposals.shape[0], device=proposals.device)[:, None]
        scores = torch.sigmoid(objectness[rows, top])
        proposals = proposals[rows, top]
        post_n = self.post_nms_top_n.get(self.training)
        selected = []
        for boxes, image_scores, image_levels, size in zip(proposals, scores, levels, image_sizes, strict=True):
            boxes = clip_boxes_to_image(boxes, size)
            keep = remove_small_boxes(boxes, MIN_PROPOSAL_SIZE)
            keep = keep[image_scores[keep] >= self.score_thresh]
            boxes, image_scores, image_levels = boxes[keep], image_scores[keep], image_levels[keep]
            keep = batched_nms(boxes, image_scores, image_levels, self.nms_thresh)[:post_n]
            selected.append(boxes[keep])
        return selected

    def compute_loss(self, objectness: torch.Tensor, regression: torch.Tensor, anchors: list[torch.Tensor],
                     targets: list[Target]) -> dict[str, torch.Tensor]:
        """Binary cross entropy of the sampled anchors' objectness, and smooth L1 (beta 1/9) of the
        sampled positives' deltas, summed over the sample and divided by its size."""
        labels, matched_boxes = [], []
        for image_anchors, target in zip(anchors, targets, strict=True):
            gt = target["boxes"].to(image_anchors.dtype)
            if gt.numel() == 0:
                labels.append(torch.zeros(image_anchors.shape[0], dtype=image_anchors.dtype,
                                          device=image_anchors.device))
                matched_boxes.append(torch.zeros_like(image_anchors))
                continue
            matched = self.proposal_matcher(box_iou(gt, image_anchors))
            image_labels = (matched >= 0).to(image_anchors.dtype)
            image_labels[matched == BELOW_LOW_THRESHOLD] = 0.0
            image_labels[matched == BETWEEN_THRESHOLDS] = -1.0
            labels.append(image_labels)
            matched_boxes.append(gt[matched.clamp(min=0)])
        positives, negatives = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        pos = torch.where(torch.cat(positives))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(negatives))[0]])
        all_anchors = torch.cat(anchors)
        box_targets = self.box_coder.encode(torch.cat(matched_boxes)[pos], all_anchors[pos])
        box_loss = F.smooth_l1_loss(regression[pos], box_targets, beta=1 / 9, reduction="sum") / max(1, sampled.numel())
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
