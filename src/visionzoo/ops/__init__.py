"""Detection operators in plain PyTorch (no compiled extension): box utilities and the box coder,
non-maximum suppression, RoIAlign and its multi-scale pooler, mask pasting.

Each function takes and returns tensors only, vectorised over boxes, and reproduces the results of
torchvision's compiled operators (the same kept boxes in the same order, the same pooled values).
"""
from .boxes import (
    BoxCoder,
    BoxFormat,
    BoxLinearCoder,
    box_area,
    box_convert,
    box_inter_union,
    box_iou,
    clip_boxes_to_image,
    generalized_box_iou,
    remove_small_boxes,
)
from .masks import heatmaps_to_keypoints, paste_masks_in_image
from .nms import batched_nms, nms
from .poolers import MultiScaleRoIAlign
from .roi_align import roi_align

__all__ = ["BoxCoder", "BoxFormat", "BoxLinearCoder", "MultiScaleRoIAlign", "batched_nms", "box_area", "box_convert",
           "box_inter_union", "box_iou", "clip_boxes_to_image", "generalized_box_iou", "heatmaps_to_keypoints", "nms",
           "paste_masks_in_image", "remove_small_boxes", "roi_align"]
