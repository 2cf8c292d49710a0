"""Detectors on any classifier of the zoo: RetinaNet, FCOS, SSDlite, Faster R-CNN or Mask R-CNN heads on its stages.

The classifier's `feature_info` says where its stages are and how wide and strided they are, so
the heads never know which network they sit on (as in segmentation_models_pytorch). RetinaNet and
FCOS get a feature pyramid over the last three stages plus P6/P7, with anchors sized from the
stages' strides; SSDlite gets the last two stages plus its four extra stages; Faster and Mask
R-CNN get a pyramid over the last four stages plus a max-pooled fifth level, as torchvision's
ResNet-50-FPN models have (the RPN's anchors, 32 to 512 pixels, one size a level); Keypoint
R-CNN's keypoint head there has four 3x3 convolutions as wide as the pyramid instead of the
published eight of 512 channels (about 1/60 of the computation a region, which is what lets it
fine-tune in minutes on a CPU; the heatmaps are the same 56x56 per keypoint). The
classifier's class head is removed and, by default, its BatchNorm layers are frozen with their
statistics.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from enum import Enum
from typing import Any

import torch
from torch import nn

from ...data.preprocess import Preprocess
from ...enums import parse_enum
from ...errors import InputError
from ..base import ZooModel
from ..features import capture_stages, resolve_out_indices
from .backbones import BackboneWithFPN, freeze_batch_norm
from .base import DetectionModel
from .fcos import FCOS, FCOSConfig, fcos_anchors
from .fpn import LastLevelMaxPool, LastLevelP6P7
from .rcnn import RCNN
from .rcnn import VARIANTS as RCNN_VARIANTS
from .retinanet import RetinaNet, RetinaNetConfig, retinanet_anchors
from .ssdlite import VARIANTS as SSDLITE_VARIANTS
from .ssdlite import NormLayer, SSDLite, default_norm_layer, extra_blocks, stage_out_channels

# the R-CNN heads' training samples, fewer than torchvision's (2000 proposals, 512 regions an image): these
# heads are fine-tuned on small images with a few objects each, where 500 proposals cover every object and
# 128 regions give the mask head its positives at a quarter of the cost (pass torchvision's values to override)
RCNN_TRAINING = {"rpn_pre_nms_top_n_train": 500, "rpn_post_nms_top_n_train": 500, "box_batch_size_per_image": 128}


class DetectorHead(str, Enum):
    RETINANET = "retinanet"  # anchors, focal loss; pyramid P3-P7
    FCOS = "fcos"  # anchor-free points with centre-ness; pyramid P3-P7
    SSDLITE = "ssdlite"  # default boxes on two stages + four extra stages; fixed input size
    FASTERRCNN = "fasterrcnn"  # two-stage: region proposals, then boxes per region; pyramid P2-P6
    MASKRCNN = "maskrcnn"  # Faster R-CNN with an instance mask per box
    KEYPOINTRCNN = "keypointrcnn"  # Faster R-CNN with keypoints per box (a lighter keypoint head)


class StagesWithExtraBlocks(nn.Module):
    """The stages `out_indices` of `body` (a zoo classifier), then SSDlite's extra stages on the last."""

    def __init__(self, body: ZooModel, out_indices: Sequence[int | str], num_extra: int, norm_layer: NormLayer):
        super().__init__()
        self.body = body
        self.out_indices = resolve_out_indices(body, out_indices)
        channels = [body.feature_info[i].num_chs for i in self.out_indices]
        self.extra = extra_blocks(channels[-1], norm_layer, num_blocks=num_extra)
        self.out_channels = channels + [stage_out_channels(block) for block in self.extra]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = capture_stages(self.body, self.out_indices, x)
        x = maps[-1]
        for block in self.extra:
            x = block(x)
            maps.append(x)
        return maps


def detector_from_classifier(classifier: ZooModel, head: DetectorHead | str, num_classes: int,
                             out_indices: Sequence[int | str] | None = None, fpn_channels: int = 256,
                             freeze_norm: bool = True, size: int = 320, **kwargs: Any) -> DetectionModel:
    """A detector whose backbone is `classifier` (which it takes over: its class head is removed).

    Args:
        head: "retinanet", "fcos", "ssdlite", "fasterrcnn", "maskrcnn" or "keypointrcnn".
        num_classes: classes the detector scores; for SSDlite and the R-CNNs, including the background
            (label 0).
        out_indices: the stages used (positions or module names in `classifier.feature_info`);
            by default the last three (RetinaNet, FCOS), the last two (SSDlite) or the last four
            (R-CNN: their pooled regions are assigned to four levels).
        fpn_channels: width of the feature pyramid (RetinaNet, FCOS, R-CNN; also the width of
            Mask R-CNN's mask head and of Keypoint R-CNN's keypoint head).
        freeze_norm: turn the classifier's BatchNorm2d layers into FrozenBatchNorm2d.
        size: SSDlite's fixed input size.
        kwargs: the detector's own arguments (thresholds, `min_size`/`max_size`, `image_mean`, ...);
            `image_mean`/`image_std` default to the classifier's preprocessing when it has one.
    """
    kind = parse_enum(DetectorHead, head, "detection head")
    if not isinstance(classifier, ZooModel):
        raise InputError(f"detector_from_classifier needs a visionzoo classifier, got {type(classifier).__name__}")
    if classifier.image_size is not None:
        raise InputError(f"{classifier.arch or type(classifier).__name__} takes only {classifier.image_size} px "
                         "inputs; detection heads need a classifier that accepts any image size")
    classifier.reset_classifier(0)
    if freeze_norm:
        freeze_batch_norm(classifier)
    if classifier.preprocess is not None:
        kwargs.setdefault("image_mean", tuple(classifier.preprocess.mean))
        kwargs.setdefault("image_std", tuple(classifier.preprocess.std))
    if kind is DetectorHead.SSDLITE:
        indices = resolve_out_indices(classifier, (-2, -1) if out_indices is None else out_indices)
        num_extra = 6 - len(indices)
        if not 0 <= num_extra <= 4:
            raise InputError(f"SSDlite uses 2 to 6 stages of the classifier, got {len(indices)}")
        norm_layer = default_norm_layer()
        stages = StagesWithExtraBlocks(classifier, indices, num_extra, norm_layer)
        cfg = replace(SSDLITE_VARIANTS["ssdlite320_mobilenet_v3_large"], size=size)
        return SSDLite(cfg, num_classes, norm_layer=norm_layer, backbone=stages, **kwargs)
    if kind in (DetectorHead.FASTERRCNN, DetectorHead.MASKRCNN, DetectorHead.KEYPOINTRCNN):
        indices = resolve_out_indices(classifier, (-4, -3, -2, -1) if out_indices is None else out_indices)
        if len(indices) != 4:
            raise InputError(f"a {kind.value} head uses 4 stages of the classifier (its regions are pooled from "
                             f"four pyramid levels), got {len(indices)}")
        body = BackboneWithFPN(classifier, indices, fpn_channels, LastLevelMaxPool())
        for key, value in RCNN_TRAINING.items():
            kwargs.setdefault(key, value)
        variant = {DetectorHead.MASKRCNN: "maskrcnn_resnet50_fpn",
                   DetectorHead.KEYPOINTRCNN: "keypointrcnn_resnet50_fpn"}
        rcnn = RCNN_VARIANTS[variant.get(kind, "fasterrcnn_resnet50_fpn")]
        if kind is DetectorHead.KEYPOINTRCNN:
            rcnn = replace(rcnn, keypoint_convs=(fpn_channels,) * 4)
        return RCNN(rcnn, num_classes, backbone=body, **kwargs)
    pyramid = BackboneWithFPN(classifier, (-3, -2, -1) if out_indices is None else out_indices, fpn_channels,
                              LastLevelP6P7(fpn_channels, fpn_channels))
    if kind is DetectorHead.RETINANET:
        return RetinaNet(RetinaNetConfig(), num_classes, backbone=pyramid,
                         anchor_generator=retinanet_anchors(pyramid.reductions), **kwargs)
    return FCOS(FCOSConfig(), num_classes, backbone=pyramid, anchor_generator=fcos_anchors(pyramid.reductions),
                **kwargs)


# -- the heads as architectures of their own --------------------------------------------------------
# `create_model("retinanet", backbone="efficientnet_lite0", pretrained_backbone=True, num_classes=3)`
VARIANTS: dict[str, Any] = {}  # (the published detectors are rows of the family modules' tables)
MODEL_CLASS = DetectionModel
COMPOSED: dict[str, DetectorHead] = {kind.value: kind for kind in DetectorHead}
COMPOSED_CLASS = DetectionModel
# the input is only scaled to [0, 1]: the detector normalises (with the backbone weights' mean and std)
# and resizes itself
COMPOSED_PREPROCESS = Preprocess(None, None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), kind="ObjectDetection")


def compose(head: DetectorHead, backbone: ZooModel, num_classes: int = 91, **kwargs: Any) -> DetectionModel:
    """The registry's builder of a `COMPOSED` entry: `detector_from_classifier` with the entry's head."""
    return detector_from_classifier(backbone, head, num_classes, **kwargs)
