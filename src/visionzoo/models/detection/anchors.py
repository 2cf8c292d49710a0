"""Anchor boxes: the reference boxes a dense detector's regression is relative to.

`AnchorGenerator` tiles every feature map with boxes of a few sizes and aspect ratios centred on
each cell's top-left corner (RetinaNet: Lin et al., "Focal Loss for Dense Object Detection",
2017; FCOS uses one square per cell, its size the level's stride). `DefaultBoxGenerator` places
SSD's default boxes (Liu et al., "SSD: Single Shot MultiBox Detector", 2016): scales that grow
linearly across the feature maps, two squares and two boxes per extra aspect ratio, centred on
the cells.

Both compute their templates in float32 and only then convert to the features' dtype, as
torchvision does, so that float64 models get the same (float32-rounded) anchors.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .transform import ImageBatch


class AnchorGenerator(nn.Module):
    """Anchors for each feature map: `sizes[i]` x `aspect_ratios[i]` (height / width) per cell of map i.

    `forward` returns, per image, the (sum over maps of H*W*A, 4) anchors in (x1, y1, x2, y2)
    pixels of the padded batch, ordered map by map, then row, column, anchor.
    """

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]]):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"one tuple of sizes and one of aspect ratios per feature map, got {len(sizes)} "
                             f"and {len(aspect_ratios)}")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(a) for a in aspect_ratios)

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios, strict=True)]

    @staticmethod
    def cell_anchors(sizes: Sequence[int], aspect_ratios: Sequence[float]) -> torch.Tensor:
        """(A, 4) zero-centred anchors, aspect ratio major, rounded to whole pixels (in float32)."""
        scales = torch.as_tensor(sizes, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32))
        ws = (1 / h_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def forward(self, batch: ImageBatch, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.sizes):
            raise ValueError(f"{len(features)} feature maps, but anchors are configured for {len(self.sizes)}")
        image_h, image_w = batch.tensors.shape[-2:]
        dtype, device = features[0].dtype, features[0].device
        per_map = []
        for fmap, sizes, ratios in zip(features, self.sizes, self.aspect_ratios, strict=True):
            grid_h, grid_w = fmap.shape[-2:]
            stride_h, stride_w = image_h // grid_h, image_w // grid_w
            shift_x = torch.arange(grid_w, dtype=torch.int32, device=device) * stride_w
            shift_y = torch.arange(grid_h, dtype=torch.int32, device=device) * stride_h
            shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
            base = self.cell_anchors(sizes, ratios).to(dtype=dtype, device=device)
            per_map.append((shifts + base.view(1, -1, 4)).reshape(-1, 4))
        anchors = torch.cat(per_map)
        return [anchors] * len(batch.image_sizes)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"


class DefaultBoxGenerator(nn.Module):
    """SSD's default boxes for each feature map.

    Args:
        aspect_ratios: per map, the aspect ratios beyond 1 (each adds a wide and a tall box).
        min_ratio, max_ratio: the smallest and largest scale (fraction of the image), spread
            linearly over the maps, when `scales` is not given.
        scales: one scale per map plus one (the last only sizes the last map's second square).
        steps: per map, the pixel distance between box centres; by default the image size over
            the map size.
        clip: clamp box widths and heights to [0, 1] of the image.
    """

    def __init__(self, aspect_ratios: Sequence[Sequence[float]], min_ratio: float = 0.15, max_ratio: float = 0.9,
                 scales: Sequence[float] | None = None, steps: Sequence[int] | None = None, clip: bool = True):
        super().__init__()
        if steps is not None and len(steps) != len(aspect_ratios):
            raise ValueError("aspect_ratios and steps need one entry per feature map")
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.steps = tuple(steps) if steps is not None else None
        self.clip = clip
        n = len(aspect_ratios)
        if scales is None:
            scales = ([min_ratio + (max_ratio - min_ratio) * k / (n - 1.0) for k in range(n)] + [1.0] if n > 1
                      else [min_ratio, max_ratio])
        self.scales = tuple(float(s) for s in scales)

    def num_anchors_per_location(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def box_sizes(self, k: int) -> torch.Tensor:
        """(A, 2) widths and heights (fractions of the image) of map k's boxes, in float32."""
        s_k = self.scales[k]
        s_prime = math.sqrt(self.scales[k] * self.scales[k + 1])
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ar in self.aspect_ratios[k]:
            w, h = s_k * math.sqrt(ar), s_k / math.sqrt(ar)
            pairs.extend([[w, h], [h, w]])
        sizes = torch.as_tensor(pairs, dtype=torch.float32)
        return sizes.clamp(min=0, max=1) if self.clip else sizes

    def forward(self, batch: ImageBatch, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.aspect_ratios):
            raise ValueError(f"{len(features)} feature maps, but default boxes are configured for "
                             f"{len(self.aspect_ratios)}")
        image_h, image_w = batch.tensors.shape[-2:]
        dtype, device = features[0].dtype, features[0].device
        boxes = []
        for k, fmap in enumerate(features):
            grid_h, grid_w = fmap.shape[-2:]
            steps_x, steps_y = (image_w / self.steps[k], image_h / self.steps[k]) if self.steps else (grid_w, grid_h)
            # centres in float32 (then converted), as the published models computed them
            cx = ((torch.arange(grid_w, dtype=torch.float32) + 0.5) / steps_x).to(dtype)
            cy = ((torch.arange(grid_h, dtype=torch.float32) + 0.5) / steps_y).to(dtype)
            cy, cx = torch.meshgrid(cy, cx, indexing="ij")
            sizes = self.box_sizes(k)
            centres = torch.stack((cx.reshape(-1), cy.reshape(-1)) * len(sizes), dim=-1).reshape(-1, 2)
            boxes.append(torch.cat((centres, sizes.repeat(grid_h * grid_w, 1)), dim=1))
        default = torch.cat(boxes).to(device)  # (cx, cy, w, h) as fractions of the image
        scale = torch.tensor([image_w, image_h], device=device)
        corners = torch.cat([(default[:, :2] - 0.5 * default[:, 2:]) * scale,
                             (default[:, :2] + 0.5 * default[:, 2:]) * scale], -1)
        return [corners] * len(batch.image_sizes)

    def extra_repr(self) -> str:
        return f"aspect_ratios={self.aspect_ratios}, scales={self.scales}, steps={self.steps}, clip={self.clip}"
