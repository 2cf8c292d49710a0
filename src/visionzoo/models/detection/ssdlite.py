"""SSDlite320 with a MobileNetV3-Large trunk.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (2018) introduced SSDlite:
SSD with depthwise-separable prediction heads and extra stages; Howard et al., "Searching for
MobileNetV3" (2019) put it on MobileNetV3-Large with a halved last stage (`reduced_tail`). The
trunk gives two maps, the C4 block's expansion (stride 16) and the last layer (stride 32); four
extra stages (1x1, depthwise 3x3 stride 2, 1x1, ReLU6) add four more, each with 6 default boxes.
State-dict names match torchvision's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..layers import ConvNormAct
from ..mobilenetv3 import VARIANTS as MOBILENETV3_VARIANTS
from ..mobilenetv3 import InvertedResidual, MobileNetV3
from .anchors import DefaultBoxGenerator
from .base import check_num_classes, declared_out_channels
from .ssd import SSD, ClassScoringHeads, SSDScoringHead, freeze_layers


@dataclass(frozen=True)
class SSDLiteConfig:
    size: int = 320  # images are resized to size x size
    trunk: str = "mobilenet_v3_large"
    reduced_tail: bool = True  # the last stage at half width (as the published weights were trained)
    width_mult: float = 1.0  # of the extra stages
    min_depth: int = 16  # smallest width of an extra stage
    num_maps: int = 6  # feature maps with default boxes (the trunk's 2 and the extra stages)
    min_ratio: float = 0.2  # default box scales, spread linearly over the maps
    max_ratio: float = 0.95
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)


VARIANTS: dict[str, SSDLiteConfig] = {"ssdlite320_mobilenet_v3_large": SSDLiteConfig()}

NormLayer = Callable[[int], nn.Module]


def default_norm_layer() -> NormLayer:
    """BatchNorm as the published SSDlite was trained with (eps 1e-3, momentum 0.03)."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


def _normal_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def extra_block(in_channels: int, out_channels: int, norm_layer: NormLayer) -> nn.Sequential:
    """A stride-2 extra stage: 1x1 to half the width, depthwise 3x3 stride 2, 1x1 out; ReLU6 after each."""
    mid = out_channels // 2
    conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=nn.ReLU6)
    return nn.Sequential(conv(in_channels, mid, 1), conv(mid, mid, 3, stride=2, groups=mid),
                         conv(mid, out_channels, 1))


def extra_blocks(in_channels: int, norm_layer: NormLayer, width_mult: float = 1.0, min_depth: int = 16,
                 num_blocks: int = 4) -> nn.ModuleList:
    """SSDlite's extra stages after a trunk of `in_channels`: widths 512, 256, 256, 128 (scaled)."""
    widths = [max(min_depth, int(d * width_mult)) for d in (512, 256, 256, 128)][:num_blocks]
    blocks = nn.ModuleList()
    for width in widths:
        blocks.append(extra_block(in_channels, width, norm_layer))
        in_channels = width
    _normal_init(blocks)
    return blocks


def stage_out_channels(module: nn.Module) -> int:
    """The width of a ConvNormAct, or of the last one of a Sequential of them (an extra stage)."""
    last = module if isinstance(module, ConvNormAct) or not isinstance(module, nn.Sequential) else module[-1]
    if not isinstance(last, ConvNormAct):
        raise TypeError(f"expected a ConvNormAct, got {type(last).__name__}")
    return last.out_channels


class SSDLiteFeatureExtractorMobileNet(nn.Module):
    """MobileNetV3 cut at the expansion of its last stride-2 block (`features.0`), the rest of it
    (`features.1`), and the extra stages (`extra`)."""

    def __init__(self, trunk: MobileNetV3, c4_pos: int, norm_layer: NormLayer, width_mult: float = 1.0,
                 min_depth: int = 16):
        super().__init__()
        layers = list(trunk.features)
        c4, last = layers[c4_pos], layers[-1]
        if not isinstance(c4, InvertedResidual) or c4.use_res_connect:
            raise ValueError("the C4 block must be a stride-2 block (no residual connection)")
        expand = c4.block[0]
        self.features = nn.Sequential(
            nn.Sequential(*layers[:c4_pos], expand),  # up to the C4 block's expansion
            nn.Sequential(c4.block[1:], *layers[c4_pos + 1:]),  # its depthwise convolution onwards
        )
        last_channels = stage_out_channels(last)
        self.extra = extra_blocks(last_channels, norm_layer, width_mult, min_depth)
        self.out_channels = [stage_out_channels(expand), last_channels] + [
            stage_out_channels(block) for block in self.extra]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in (*self.features, *self.extra):
            x = block(x)
            outputs.append(x)
        return outputs


def prediction_block(in_channels: int, out_channels: int, norm_layer: NormLayer) -> nn.Sequential:
    """Depthwise 3x3 (with norm and ReLU6), then a 1x1 convolution to the predictions."""
    return nn.Sequential(ConvNormAct(in_channels, in_channels, 3, groups=in_channels, norm_layer=norm_layer,
                                     act_layer=nn.ReLU6),
                         nn.Conv2d(in_channels, out_channels, 1))


class SSDLiteClassificationHead(SSDScoringHead):
    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int,
                 norm_layer: NormLayer):
        blocks = nn.ModuleList(prediction_block(c, num_classes * a, norm_layer)
                               for c, a in zip(in_channels, num_anchors, strict=True))
        _normal_init(blocks)
        super().__init__(blocks, num_classes)


class SSDLiteRegressionHead(SSDScoringHead):
    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], norm_layer: NormLayer):
        blocks = nn.ModuleList(prediction_block(c, 4 * a, norm_layer)
                               for c, a in zip(in_channels, num_anchors, strict=True))
        _normal_init(blocks)
        super().__init__(blocks, 4)


class SSDLiteHead(ClassScoringHeads):
    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int,
                 norm_layer: NormLayer):
        super().__init__()
        self.classification_head = SSDLiteClassificationHead(in_channels, num_anchors, num_classes, norm_layer)
        self.regression_head = SSDLiteRegressionHead(in_channels, num_anchors, norm_layer)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"bbox_regression": self.regression_head(features), "cls_logits": self.classification_head(features)}

    def new_classification_head(self, num_classes: int) -> SSDScoringHead:
        """New final 1x1 convolutions for `num_classes` (the depthwise layers, class-independent, stay)."""
        head = self.classification_head
        for block in head.module_list:
            old = block.get_submodule("1")
            if not isinstance(old, nn.Conv2d) or not isinstance(block, nn.Sequential):
                raise TypeError(f"expected SSDlite prediction blocks, got {type(block).__name__}")
            new = nn.Conv2d(old.in_channels, num_classes * (old.out_channels // head.num_columns), 1)
            _normal_init(new)
            block[1] = new
        head.num_columns = num_classes
        return head


class SSDLite(SSD):
    """SSDlite320-MobileNetV3-Large; arguments are torchvision's (`norm_layer` replaces the
    BatchNorm of the trunk, extra stages and heads). `backbone` (maps with a list `out_channels`)
    replaces the MobileNetV3 trunk and extra stages."""

    def __init__(self, cfg: SSDLiteConfig, num_classes: int = 91, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, score_thresh: float = 0.001, nms_thresh: float = 0.55,
                 detections_per_img: int = 300, iou_thresh: float = 0.5, topk_candidates: int = 300,
                 positive_fraction: float = 0.25, trainable_backbone_layers: int | None = None,
                 norm_layer: NormLayer | None = None, backbone: nn.Module | None = None):
        norm_layer = norm_layer or default_norm_layer()
        if backbone is None:
            mobilenet_cfg = MOBILENETV3_VARIANTS[cfg.trunk]
            trunk = MobileNetV3(mobilenet_cfg, num_classes=0, reduced_tail=cfg.reduced_tail, norm_layer=norm_layer)
            _normal_init(trunk.features)
            # stages end before each stride-2 block; the last stride-2 block is C4
            strided = [i + 1 for i, block in enumerate(mobilenet_cfg.blocks) if block.stride == 2]
            freeze_layers(trunk.features, [0, *strided, len(trunk.features) - 1],
                          6 if trainable_backbone_layers is None else trainable_backbone_layers)
            backbone = SSDLiteFeatureExtractorMobileNet(trunk, strided[-1], norm_layer, cfg.width_mult,
                                                        cfg.min_depth)
        anchor_generator = DefaultBoxGenerator([(2, 3)] * cfg.num_maps, min_ratio=cfg.min_ratio,
                                               max_ratio=cfg.max_ratio)
        head = SSDLiteHead(declared_out_channels(backbone), anchor_generator.num_anchors_per_location(),
                           check_num_classes(num_classes, 2), norm_layer)
        super().__init__(cfg, num_classes, image_mean or cfg.image_mean, image_std or cfg.image_std, score_thresh,
                         nms_thresh, detections_per_img, iou_thresh, topk_candidates, positive_fraction,
                         backbone=backbone, anchor_generator=anchor_generator, head=head)


MODEL_CLASS = SSDLite
