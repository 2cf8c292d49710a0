"""Training losses of the single-stage detectors.

`sigmoid_focal_loss`: Lin et al., "Focal Loss for Dense Object Detection" (2017), binary cross
entropy down-weighted by (1 - p_t)^gamma on easy examples and balanced by alpha.
`generalized_box_iou_loss`: Rezatofighi et al., "Generalized Intersection over Union" (2019),
1 - GIoU of paired boxes. Both follow torchvision's formulas (including its eps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else 0.0 * loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> torch.Tensor:
    """Focal loss of `logits` against 0/1 `targets` of the same shape; `alpha` < 0 disables the balancing."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def generalized_box_iou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none",
                             eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU of each pair of (x1, y1, x2, y2) boxes in `boxes1` and `boxes2` (same shape (..., 4))."""
    if boxes1.dtype not in (torch.float32, torch.float64):
        boxes1, boxes2 = boxes1.float(), boxes2.float()
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    ix1, iy1 = torch.max(x1, x1g), torch.max(y1, y1g)
    ix2, iy2 = torch.min(x2, x2g), torch.min(y2, y2g)
    inter = torch.zeros_like(x1)
    overlap = (iy2 > iy1) & (ix2 > ix1)
    inter[overlap] = (ix2[overlap] - ix1[overlap]) * (iy2[overlap] - iy1[overlap])
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return _reduce(1 - (iou - (enclosing - union) / (enclosing + eps)), reduction)
