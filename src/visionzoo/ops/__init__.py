"""Detection operators in plain PyTorch (no compiled extension): box utilities and the box coder,
non-maximum suppression, RoIAlign and its multi-scale pooler, mask pasting.

Each function takes and returns tensors only, vectorised over boxes, and reproduces the results of
torchvision's compiled operators (the same kept boxes in the same order, the same pooled values).
"""
from .masks import heatmaps_to_keypoints, paste_masks_in_image
from .poolers import MultiScaleRoIAlign
from .roi_align import roi_align

__all__ = ["MultiScaleRoIAlign", "heatmaps_to_keypoints", "paste_masks_in_image", "roi_align"]
