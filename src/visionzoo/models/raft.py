"""RAFT optical flow, large and small.

Teed & Deng, "RAFT: Recurrent All-Pairs Field Transforms for Optical Flow" (2020). Two
encoders see the frames at 1/8 resolution: the feature encoder (both frames) gives the
features whose dot products form the all-pairs correlation volume, pooled into a pyramid;
the context encoder (first frame) gives the initial hidden state and the context of a
recurrent update block. Each update looks the correlation pyramid up around the current
match of every pixel, encodes it with the current flow (motion encoder), updates the
hidden state with convolutional GRUs and predicts a flow correction; the flow is brought
to full resolution by a learned convex combination of 3x3 neighbours (large) or bilinear
interpolation (small).

State-dict names and shapes follow torchvision's `raft_large` / `raft_small`
(`feature_encoder.layer1.0.convnormrelu1.0.weight`, `update_block.recurrent_block.convgru1.convz`,
`mask_predictor.conv`, ...), so its published checkpoints load strictly.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..enums import Task
from ..errors import InputError
from .base import VisionModel
from .layers import ConvNormAct

FLOW_STRIDE = 8  # both encoders work at 1/8 of the input resolution


class BlockType(Enum):
    RESIDUAL = "residual"  # two 3x3 convolutions
    BOTTLENECK = "bottleneck"  # 1x1 down to a quarter of the width, 3x3, 1x1 back up


class Norm(Enum):
    INSTANCE = "instance"  # InstanceNorm2d without affine terms: nothing in the state dict
    BATCH = "batch"
    NONE = "none"


@dataclass(frozen=True)
class EncoderConfig:
    block: BlockType
    widths: tuple[int, int, int, int, int]  # stem, layer1, layer2, layer3, output projection
    norm: Norm


@dataclass(frozen=True)
class RAFTConfig:
    feature_encoder: EncoderConfig
    context_encoder: EncoderConfig  # its output is split into the hidden state and the context
    corr_levels: int  # levels of the correlation pyramid, each pooled 2x from the previous
    corr_radius: int  # a lookup reads the (2r+1)^2 neighbours of the match on every level
    motion_corr_widths: tuple[int, ...]  # one or two convolutions over the correlation features
    motion_flow_widths: tuple[int, int]  # two convolutions over the current flow
    motion_out: int  # motion features, the current flow (2 channels) included
    hidden: int  # hidden state of the recurrent block
    gru_kernels: tuple[tuple[int, int], ...]  # one ConvGRU per kernel, applied in turn
    flow_head_hidden: int
    convex_upsampling: bool  # learned 8x upsampling mask; bilinear interpolation otherwise


VARIANTS: dict[str, RAFTConfig] = {
    "raft_large": RAFTConfig(
        feature_encoder=EncoderConfig(BlockType.RESIDUAL, (64, 64, 96, 128, 256), Norm.INSTANCE),
        context_encoder=EncoderConfig(BlockType.RESIDUAL, (64, 64, 96, 128, 256), Norm.BATCH),
        corr_levels=4, corr_radius=4, motion_corr_widths=(256, 192), motion_flow_widths=(128, 64),
        motion_out=128, hidden=128, gru_kernels=((1, 5), (5, 1)), flow_head_hidden=256, convex_upsampling=True,
    ),
    "raft_small": RAFTConfig(
        feature_encoder=EncoderConfig(BlockType.BOTTLENECK, (32, 32, 64, 96, 128), Norm.INSTANCE),
        context_encoder=EncoderConfig(BlockType.BOTTLENECK, (32, 32, 64, 96, 160), Norm.NONE),
        corr_levels=4, corr_radius=3, motion_corr_widths=(96,), motion_flow_widths=(64, 32),
        motion_out=82, hidden=96, gru_kernels=((3, 3),), flow_head_hidden=128, convex_upsampling=False,
    ),
}

_NORM_LAYERS: dict[Norm, Callable[[int], nn.Module] | None] = {
    Norm.INSTANCE: nn.InstanceNorm2d, Norm.BATCH: nn.BatchNorm2d, Norm.NONE: None,
}


def _conv_norm(in_chs: int, out_chs: int, kernel: int, stride: int, norm_layer, act: bool = True) -> ConvNormAct:
    # the convolutions keep their bias even before a norm layer: the published weights have one
    # (RAFT trains with BatchNorm frozen after the first dataset, where the bias still learns)
    return ConvNormAct(in_chs, out_chs, kernel, stride, norm_layer=norm_layer, act_layer=nn.ReLU if act else None,
                       bias=True)


class ResidualBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, norm_layer):
        super().__init__()
        self.convnormrelu1 = _conv_norm(in_chs, out_chs, 3, stride, norm_layer)
        self.convnormrelu2 = _conv_norm(out_chs, out_chs, 3, 1, norm_layer)
        self.downsample = (nn.Identity() if stride == 1 and in_chs == out_chs
                           else _conv_norm(in_chs, out_chs, 1, stride, norm_layer, act=False))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.downsample(x) + self.convnormrelu2(self.convnormrelu1(x)))


class BottleneckBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, norm_layer):
        super().__init__()
        mid = out_chs // 4
        self.convnormrelu1 = _conv_norm(in_chs, mid, 1, 1, norm_layer)
        self.convnormrelu2 = _conv_norm(mid, mid, 3, stride, norm_layer)
        self.convnormrelu3 = _conv_norm(mid, out_chs, 1, 1, norm_layer)
        self.downsample = (nn.Identity() if stride == 1 and in_chs == out_chs
                           else _conv_norm(in_chs, out_chs, 1, stride, norm_layer, act=False))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convnormrelu3(self.convnormrelu2(self.convnormrelu1(x)))
        return self.relu(self.downsample(x) + y)


_BLOCKS = {BlockType.RESIDUAL: ResidualBlock, BlockType.BOTTLENECK: BottleneckBlock}


class Encoder(nn.Module):
    """7x7 stem (stride 2), three stages of two blocks (strides 1, 2, 2), 1x1 projection: 1/8 resolution."""

    layer1: nn.Sequential  # the three stages, added by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        block, norm_layer, widths = _BLOCKS[cfg.block], _NORM_LAYERS[cfg.norm], cfg.widths
        self.convnormrelu = _conv_norm(3, widths[0], 7, 2, norm_layer)
        for i, stride in enumerate((1, 2, 2)):
            stage = nn.Sequential(block(widths[i], widths[i + 1], stride, norm_layer),
                                  block(widths[i + 1], widths[i + 1], 1, norm_layer))
            self.add_module(f"layer{i + 1}", stage)
        self.conv = nn.Conv2d(widths[3], widths[4], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer3(self.layer2(self.layer1(self.convnormrelu(x)))))


class MotionEncoder(nn.Module):
    """Encodes the looked-up correlations and the current flow; the flow itself is appended."""

    def __init__(self, corr_chs: int, corr_widths: tuple[int, ...], flow_widths: tuple[int, int], out_chs: int):
        super().__init__()
        if len(corr_widths) not in (1, 2):
            raise ValueError(f"the motion encoder takes 1 or 2 correlation convolutions, got {corr_widths!r}")
        self.convcorr1 = ConvNormAct(corr_chs, corr_widths[0], 1, norm_layer=None)
        self.convcorr2 = (ConvNormAct(corr_widths[0], corr_widths[1], 3, norm_layer=None) if len(corr_widths) == 2
                          else nn.Identity())
        self.convflow1 = ConvNormAct(2, flow_widths[0], 7, norm_layer=None)
        self.convflow2 = ConvNormAct(flow_widths[0], flow_widths[1], 3, norm_layer=None)
        self.conv = ConvNormAct(corr_widths[-1] + flow_widths[1], out_chs - 2, 3, norm_layer=None)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        corr = self.convcorr2(self.convcorr1(corr))
        motion = self.conv(torch.cat([corr, self.convflow2(self.convflow1(flow))], dim=1))
        return torch.cat([motion, flow], dim=1)


class ConvGRU(nn.Module):
    def __init__(self, input_chs: int, hidden: int, kernel: tuple[int, int]):
        super().__init__()
        padding = (kernel[0] // 2, kernel[1] // 2)
        self.convz = nn.Conv2d(hidden + input_chs, hidden, kernel, padding=padding)
        self.convr = nn.Conv2d(hidden + input_chs, hidden, kernel, padding=padding)
        self.convq = nn.Conv2d(hidden + input_chs, hidden, kernel, padding=padding)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


class RecurrentBlock(nn.Module):
    """ConvGRUs applied in turn: one 3x3 (small), or a 1x5 then a 5x1 (large, "separable")."""

    def __init__(self, input_chs: int, hidden: int, kernels: tuple[tuple[int, int], ...]):
        super().__init__()
        self.names = [f"convgru{i + 1}" for i in range(len(kernels))]
        for name, kernel in zip(self.names, kernels, strict=True):
            self.add_module(name, ConvGRU(input_chs, hidden, kernel))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            h = getattr(self, name)(h, x)
        return h


class FlowHead(nn.Module):
    def __init__(self, in_chs: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


class UpdateBlock(nn.Module):
    def __init__(self, cfg: RAFTConfig):
        super().__init__()
        corr_chs = cfg.corr_levels * (2 * cfg.corr_radius + 1) ** 2
        context_chs = cfg.context_encoder.widths[-1] - cfg.hidden
        self.motion_encoder = MotionEncoder(corr_chs, cfg.motion_corr_widths, cfg.motion_flow_widths, cfg.motion_out)
        self.recurrent_block = RecurrentBlock(cfg.motion_out + context_chs, cfg.hidden, cfg.gru_kernels)
        self.flow_head = FlowHead(cfg.hidden, cfg.flow_head_hidden)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, corr: torch.Tensor,
                flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([context, self.motion_encoder(flow, corr)], dim=1)
        hidden = self.recurrent_block(hidden, x)
        return hidden, self.flow_head(hidden)


class MaskPredictor(nn.Module):
    """Softmax logits of the 9 neighbours' weights for each of the 8x8 output pixels of a cell."""

    def __init__(self, in_chs: int, hidden: int = 256, scale: float = 0.25):
        super().__init__()
        self.convrelu = ConvNormAct(in_chs, hidden, 3, norm_layer=None)
        self.conv = nn.Conv2d(hidden, 9 * FLOW_STRIDE * FLOW_STRIDE, 1)
        # the original training scales this branch down (to damp its gradients); the weights expect it
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.conv(self.convrelu(x))


def coords_grid(batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(batch, 2, height, width): the (x, y) pixel coordinates of every position."""
    ys = torch.arange(height, dtype=dtype, device=device)
    xs = torch.arange(width, dtype=dtype, device=device)
    grid = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)])
    return grid.expand(batch, 2, height, width)


def correlation_pyramid(fmap1: torch.Tensor, fmap2: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """The all-pairs correlation volume, (N*h*w, 1, h, w) (one map of frame-2 scores per frame-1 pixel),
    and `num_levels - 1` copies average-pooled 2x over the frame-2 dimensions."""
    n, c, h, w = fmap1.shape
    corr = torch.bmm(fmap1.flatten(2).transpose(1, 2), fmap2.flatten(2))
    # the scale is the float32 square root, as the published network computes it (sqrt(128) is not exact)
    corr = corr / torch.tensor(float(c), dtype=torch.float32).sqrt().item()
    level = corr.reshape(n * h * w, 1, h, w)
    pyramid = [level]
    for _ in range(num_levels - 1):
        level = F.avg_pool2d(level, 2, 2)
        pyramid.append(level)
    return pyramid


def lookup_correlation(pyramid: list[torch.Tensor], coords: torch.Tensor, radius: int) -> torch.Tensor:
    """Bilinear samples of every pyramid level on the (2r+1)^2 grid of integer offsets around `coords`
    (N, 2, h, w), scaled to the level; zero outside the map. Returns (N, levels*(2r+1)^2, h, w), the
    channel of offset (dx, dy) at level l being `l*(2r+1)^2 + (dx+r)*(2r+1) + (dy+r)`."""
    n, _, h, w = coords.shape
    side = 2 * radius + 1
    offsets = torch.arange(-radius, radius + 1, dtype=coords.dtype, device=coords.device)
    delta = torch.stack([offsets[:, None].expand(side, side), offsets[None, :].expand(side, side)], dim=-1)
    centres = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
    out = []
    for i, level in enumerate(pyramid):
        points = centres / 2**i + delta
        size = torch.tensor([level.shape[-1] - 1, level.shape[-2] - 1], dtype=coords.dtype, device=coords.device)
        sampled = F.grid_sample(level, 2 * points / size - 1, mode="bilinear", padding_mode="zeros",
                                align_corners=True)
        out.append(sampled.view(n, h, w, side * side))
    # contiguous NCHW: a channels-last view would switch the motion encoder's convolutions to that layout
    return torch.cat(out, dim=-1).permute(0, 3, 1, 2).contiguous()


def upsample_flow(flow: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flow at 1/8 resolution to full resolution (values scaled by 8): each output pixel a convex
    combination of the 3x3 neighbourhood of its cell, weighted by `mask`, or bilinear without one."""
    n, _, h, w = flow.shape
    s = FLOW_STRIDE
    if mask is None:
        return s * F.interpolate(flow, size=(h * s, w * s), mode="bilinear", align_corners=True)
    weights = torch.softmax(mask.view(n, 1, 9, s, s, h, w), dim=2)
    neighbours = F.unfold(s * flow, 3, padding=1).view(n, 2, 9, 1, 1, h, w)
    up = (weights * neighbours).sum(dim=2)  # (n, 2, s, s, h, w)
    return up.permute(0, 1, 4, 2, 5, 3).reshape(n, 2, h * s, w * s)


class RAFT(VisionModel):
    task: ClassVar[Task] = Task.OPTICAL_FLOW

    def __init__(self, cfg: RAFTConfig):
        super().__init__()
        if cfg.context_encoder.widths[-1] <= cfg.hidden:
            raise ValueError("the context encoder must output more channels than the hidden state")
        self.cfg = cfg
        self.num_classes = 0
        self.feature_encoder = Encoder(cfg.feature_encoder)
        self.context_encoder = Encoder(cfg.context_encoder)
        self.update_block = UpdateBlock(cfg)
        self.mask_predictor = MaskPredictor(cfg.hidden) if cfg.convex_upsampling else None

    @property
    def min_size(self) -> int:
        """Smallest input side: the coarsest correlation level must keep at least 2 pixels."""
        return FLOW_STRIDE * 2**self.cfg.corr_levels

    def reset_classifier(self, num_classes: int) -> None:
        raise InputError("optical flow models have no class head to reset; use a classification model")

    def _check_inputs(self, image1: torch.Tensor, image2: torch.Tensor, num_flow_updates: int) -> None:
        if image1.ndim != 4 or image1.shape[1] != 3:
            raise InputError(f"image1 must be a batch of RGB images (N, 3, H, W), got shape {tuple(image1.shape)}")
        if image2.shape != image1.shape:
            raise InputError(f"image2 has shape {tuple(image2.shape)} but image1 has {tuple(image1.shape)}; "
                             "pass two frames of the same size")
        h, w = image1.shape[-2:]
        if h % FLOW_STRIDE or w % FLOW_STRIDE:
            raise InputError(f"frame size {h}x{w} (HxW) is not a multiple of {FLOW_STRIDE}; pad the frames "
                             "(visionzoo.data.flow.pad_to_multiple) and crop the flow back")
        if min(h, w) < self.min_size:
            raise InputError(f"frame size {h}x{w} (HxW) is too small for {self.cfg.corr_levels} correlation "
                             f"levels; pad or resize the frames to at least {self.min_size} on each side")
        if isinstance(num_flow_updates, bool) or not isinstance(num_flow_updates, int) or num_flow_updates < 1:
            raise InputError(f"num_flow_updates must be an integer >= 1, got {num_flow_updates!r}")

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, num_flow_updates: int = 12, *,
                all_estimates: bool = True) -> list[torch.Tensor]:
        """Flow from `image1` to `image2` (N, 3, H, W each, values in [-1, 1]), refined `num_flow_updates`
        times: the list of every estimate, (N, 2, H, W) in pixels (x then y), the last the best.

        `all_estimates=False` returns only the last one (a list of one): the intermediate estimates
        are then never brought to full resolution, which saves the upsampling mask of every update.
        """
        self._check_inputs(image1, image2, num_flow_updates)
        n = image1.shape[0]
        fmap1, fmap2 = self.feature_encoder(torch.cat([image1, image2], dim=0)).chunk(2, dim=0)
        pyramid = correlation_pyramid(fmap1, fmap2, self.cfg.corr_levels)

        hidden, context = self.context_encoder(image1).split(
            [self.cfg.hidden, self.cfg.context_encoder.widths[-1] - self.cfg.hidden], dim=1)
        hidden, context = torch.tanh(hidden), torch.relu(context)

        h, w = fmap1.shape[-2:]
        coords0 = coords_grid(n, h, w, fmap1.dtype, fmap1.device)
        coords1 = coords0
        estimates = []
        for i in range(num_flow_updates):
            # the lookup position is not differentiated through (the paper's choice)
            coords1 = coords1.detach()
            corr = lookup_correlation(pyramid, coords1, self.cfg.corr_radius)
            hidden, delta = self.update_block(hidden, context, corr, coords1 - coords0)
            coords1 = coords1 + delta
            if all_estimates or i == num_flow_updates - 1:
                mask = None if self.mask_predictor is None else self.mask_predictor(hidden)
                estimates.append(upsample_flow(coords1 - coords0, mask))
        return estimates


MODEL_CLASS = RAFT
