"""Assigning ground-truth boxes to anchors (or proposals) by overlap, for training.

`Matcher` gives each anchor the ground-truth box it overlaps most, if that overlap reaches
`high_threshold`; anchors below `low_threshold` are background and those in between are ignored.
With `allow_low_quality_matches` every ground-truth box also keeps the anchors it overlaps most,
however little (Faster R-CNN, RetinaNet). `SSDMatcher` is SSD's: one threshold, and every
ground-truth box takes its best anchor.
"""
from __future__ import annotations

import torch

BELOW_LOW_THRESHOLD = -1  # background
BETWEEN_THRESHOLDS = -2  # ignored


class Matcher:
    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} is above high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: torch.Tensor) -> torch.Tensor:
        """Index of the matched ground truth for each anchor (N,), or a negative code, from the
        (M ground truths, N anchors) `quality` matrix (IoUs)."""
        if quality.numel() == 0:
            raise ValueError("matching needs at least one ground-truth box and one anchor")
        best, matches = quality.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        matches[best < self.low_threshold] = BELOW_LOW_THRESHOLD
        matches[(best >= self.low_threshold) & (best < self.high_threshold)] = BETWEEN_THRESHOLDS
        if all_matches is not None:
            # each ground truth's best anchors (ties included) keep their best ground truth
            best_per_gt = quality.max(dim=1).values
            anchors = torch.where(quality == best_per_gt[:, None])[1]
            matches[anchors] = all_matches[anchors]
        return matches


class SSDMatcher(Matcher):
    def __init__(self, threshold: float):
        super().__init__(threshold, threshold, allow_low_quality_matches=False)

    def __call__(self, quality: torch.Tensor) -> torch.Tensor:
        matches = super().__call__(quality)
        best_anchor_per_gt = quality.max(dim=1).indices
        matches[best_anchor_per_gt] = torch.arange(best_anchor_per_gt.numel(), device=matches.device)
        return matches
