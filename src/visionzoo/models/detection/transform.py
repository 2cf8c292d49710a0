"""The input and output transform of every detector: normalise, resize, batch; map boxes back.

Images come in at any size, in [0, 1]. Each is normalised with the model's mean and std, then
resized (bilinear) so that its shorter side is `min_size` unless that would make its longer side
exceed `max_size` (SSD-style models instead resize to one fixed size), and the batch is padded
at the bottom and right to a multiple of `size_divisible`. Predictions come back in the resized
image's pixels and are mapped to the original image's.

The arithmetic is torchvision's (`GeneralizedRCNNTransform`): the scale factor is computed in
Python floats and given to `interpolate` with `recompute_scale_factor=True`, and the box scaling
ratios are float32 quotients of the sizes, as in its `resize_boxes`, so parity holds bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError

Target = dict[str, torch.Tensor]


@dataclass
class ImageBatch:
    """Resized, padded images and the size of each before padding."""

    tensors: torch.Tensor  # (N, C, H, W), H and W multiples of size_divisible
    image_sizes: list[tuple[int, int]]  # (height, width) of each resized image


def as_image_list(images: torch.Tensor | Sequence[torch.Tensor], channels: int) -> list[torch.Tensor]:
    """Detector input as a list of (C, H, W) float tensors: a list/tuple of them, or an (N, C, H, W) batch."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise InputError(f"detector input must be a list of (C, H, W) images or an (N, C, H, W) batch, "
                             f"got a tensor of shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    elif not isinstance(images, (list, tuple)) or not images:
        raise InputError(f"detector input must be a non-empty list of (C, H, W) image tensors, got {images!r:.80}")
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InputError(f"image {i} must be a (C, H, W) tensor, got {shape}")
        if not image.is_floating_point():
            raise InputError(f"image {i} must be floating point with values in [0, 1], got {image.dtype}; "
                             "convert it with .float() / 255")
        if image.shape[0] != channels:
            raise InputError(f"image {i} has {image.shape[0]} channels; the model expects {channels}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise InputError(f"image {i} is empty: shape {tuple(image.shape)}")
    return list(images)


def scale_boxes(boxes: torch.Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> torch.Tensor:
    """`boxes` (N, 4) in an image of `original_size` (h, w), mapped to one of `new_size`."""
    ratio_h, ratio_w = (torch.tensor(new, dtype=torch.float32, device=boxes.device)
                        / torch.tensor(old, dtype=torch.float32, device=boxes.device)
                        for new, old in zip(new_size, original_size, strict=True))
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def scale_keypoints(keypoints: torch.Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> torch.Tensor:
    """`keypoints` (N, K, 3) (x, y, visibility) in an image of `original_size`, mapped to `new_size`."""
    ratio_h, ratio_w = (torch.tensor(new, dtype=torch.float32, device=keypoints.device)
                        / torch.tensor(old, dtype=torch.float32, device=keypoints.device)
                        for new, old in zip(new_size, original_size, strict=True))
    scaled = keypoints.clone()
    scaled[..., 0] *= ratio_w
    scaled[..., 1] *= ratio_h
    return scaled


class DetectionTransform(nn.Module):
    """Normalise, resize and batch images (and their targets); map predictions back.

    Args:
        min_size: the shorter side after resizing; a sequence picks one at random per image in
            training (multi-scale training), the last one in evaluation.
        max_size: the longer side is never made longer than this.
        image_mean, image_std: per-channel normalisation.
        size_divisible: the batch's height and width are padded up to a multiple of this.
        fixed_size: (width, height) every image is resized to, ignoring the aspect ratio (SSD).
    """

    def __init__(self, min_size: int | Sequence[int], max_size: int, image_mean: Sequence[float],
                 image_std: Sequence[float], size_divisible: int = 32, fixed_size: tuple[int, int] | None = None):
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        if not self.min_size or any(s <= 0 for s in self.min_size) or max_size <= 0:
            raise InputError(f"min_size and max_size must be positive, got {min_size!r} and {max_size!r}")
        if len(image_mean) != len(image_std):
            raise InputError(f"image_mean and image_std need one value per channel, got {len(image_mean)} "
                             f"and {len(image_std)}")
        self.max_size = max_size
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.size_divisible = size_divisible
        self.fixed_size = fixed_size

    def forward(self, images: list[torch.Tensor], targets: list[Target] | None = None
                ) -> tuple[ImageBatch, list[Target] | None]:
        if targets is not None:
            targets = [dict(t) for t in targets]  # the caller's dicts stay untouched
        resized = []
        for i, image in enumerate(images):
            image, target = self.resize(self.normalize(image), None if targets is None else targets[i])
            resized.append(image)
            if targets is not None and target is not None:
                targets[i] = target
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in resized]
        return ImageBatch(self.batch(resized), sizes), targets

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(self, image: torch.Tensor, target: Target | None = None) -> tuple[torch.Tensor, Target | None]:
        h, w = image.shape[-2:]
        if self.training and len(self.min_size) > 1:
            # torch's generator (not Python's), so that seeding torch fixes the choice
            min_size = self.min_size[int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())]
        else:
            min_size = self.min_size[-1]
        size: list[int] | None = None
        scale: float | None = None
        if self.fixed_size is not None:
            size = [self.fixed_size[1], self.fixed_size[0]]
        else:
            scale = min(min_size / min(h, w), self.max_size / max(h, w))
        recompute = True if scale else None
        image = F.interpolate(image[None], size=size, scale_factor=scale, mode="bilinear", align_corners=False,
                              recompute_scale_factor=recompute)[0]
        if target is None:
            return image, None
        new_size = image.shape[-2:]
        target["boxes"] = scale_boxes(target["boxes"], (h, w), new_size)
        if "keypoints" in target:
            target["keypoints"] = scale_keypoints(target["keypoints"], (h, w), new_size)
        if "masks" in target:
            masks = F.interpolate(target["masks"][:, None].float(), size=size, scale_factor=scale,
                                  recompute_scale_factor=recompute)[:, 0]
            target["masks"] = masks.byte()
        return image, target

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The images, zero-padded at the bottom and right to a common size divisible by `size_divisible`."""
        stride = float(self.size_divisible)
        height = int(math.ceil(max(img.shape[-2] for img in images) / stride) * stride)
        width = int(math.ceil(max(img.shape[-1] for img in images) / stride) * stride)
        channels = max(img.shape[0] for img in images)
        batched = images[0].new_zeros((len(images), channels, height, width))
        for padded, img in zip(batched, images, strict=True):
            padded[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        return batched

    def postprocess(self, detections: list[Target], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[Target]:
        """Detections in each original image's pixels (boxes, and keypoints when present)."""
        for det, size, original in zip(detections, image_sizes, original_sizes, strict=True):
            det["boxes"] = scale_boxes(det["boxes"], size, original)
            if "keypoints" in det:
                det["keypoints"] = scale_keypoints(det["keypoints"], size, original)
        return detections

    def extra_repr(self) -> str:
        size = (f"fixed_size={self.fixed_size}" if self.fixed_size
                else f"min_size={self.min_size}, max_size={self.max_size}")
        return f"{size}, mean={self.image_mean}, std={self.image_std}, size_divisible={self.size_divisible}"
