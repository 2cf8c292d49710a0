"""Multi-scale RoIAlign: pooling each region from the pyramid level that matches its size.

Lin et al., "Feature Pyramid Networks for Object Detection" (2017), eq. 1: a region of area w*h
is pooled from level floor(k0 + log2(sqrt(w*h) / 224)), clamped to the levels present. This file
holds `MultiScaleRoIAlign` (torchvision's pooler of the same name: the same scale inference, level
rule and output order; no parameters or buffers) and its level rule, `map_levels`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from .roi_align import _pair, boxes_to_rois, roi_align_levels

_LEVEL_EPS = 1e-6  # keeps a box exactly at a level boundary on the upper level despite log2 rounding


def infer_scale(feature_size: Sequence[int], image_size: Sequence[int]) -> float:
    """The feature map's scale relative to the image: the nearest power of two of the height
    ratio (a stride-s map of a padded image is about 1/s of it)."""
    ratio = torch.tensor(float(feature_size[0]) / float(image_size[0]))  # float32, as torchvision rounds
    return 2.0 ** float(ratio.log2().round())


def map_levels(boxes: Sequence[torch.Tensor], k_min: int, k_max: int, canonical_scale: int = 224,
               canonical_level: int = 4) -> torch.Tensor:
    """Index (0 for level k_min) of the level each box of the concatenated `boxes` is pooled from.

    A box with negative area (x2 < x1 xor y2 < y1) has no level: its index is out of range."""
    areas = torch.cat([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes])
    sides = torch.sqrt(areas)
    level = torch.floor(canonical_level + torch.log2(sides / canonical_scale)
                        + torch.tensor(_LEVEL_EPS, dtype=sides.dtype, device=sides.device))
    level = torch.clamp(level, min=k_min, max=k_max)
    return torch.where(torch.isnan(level), -1, level.nan_to_num(0.0).long() - k_min)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over the feature maps named `featmap_names`, each region from one level.

    forward(features, boxes, image_shapes): `features` maps names to (N, C, H_l, W_l) maps (the
    listed ones are used, in the dict's order, finest first), `boxes` holds one (L_i, 4) tensor of
    x1, y1, x2, y2 per image in image coordinates, `image_shapes` the (height, width) of each image
    before the backbone. Returns (sum L_i, C, out_h, out_w) in the order of the boxes, with
    channels-last strides. Unlike torchvision, which keeps the scales of its first call, the
    scales are inferred on every call (the same values for padded batches).
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int | Sequence[int], sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        if isinstance(featmap_names, str) or not featmap_names:
            raise InputError(f"featmap_names must be a non-empty list of names, got {featmap_names!r}")
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        maps = [v for k, v in features.items() if k in self.featmap_names]
        if not maps:
            raise InputError(f"none of the pooled feature maps {self.featmap_names} is among the features "
                             f"{list(features)}; name the maps the backbone returns")
        if not image_shapes:
            raise InputError("image_shapes is empty; pass the (height, width) of each image")
        if len(boxes) != maps[0].shape[0]:
            raise InputError(f"{len(boxes)} box tensors for a batch of {maps[0].shape[0]} images; pass one "
                             "(L, 4) tensor per image")
        largest = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [infer_scale(m.shape[-2:], largest) for m in maps]
        rois = boxes_to_rois(boxes, maps[0])
        if len(maps) == 1:
            levels = None
        else:
            k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
            levels = map_levels(boxes, k_min, k_max, self.canonical_scale, self.canonical_level)
        return roi_align_levels(maps, scales, rois, levels, self.output_size, self.sampling_ratio)

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}")
