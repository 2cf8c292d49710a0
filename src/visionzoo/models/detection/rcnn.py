"""Faster R-CNN, Mask R-CNN and Keypoint R-CNN.

Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks"
(2015) on a feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", 2017);
He et al., "Mask R-CNN" (2017) adds instance masks and keypoints. The v2 variants follow Li et
al., "Benchmarking Detection Transfer Learning with Vision Transformers" (2021) as torchvision
trains them: BatchNorm in the backbone, the pyramid and the heads, a two-convolution RPN head and
a four-convolution box head. The MobileNetV3-Large variants put a two-level pyramid (both at
stride 32) on the trunk's last two stages (Howard et al., "Searching for MobileNetV3", 2019).

This file holds the configurations (`VARIANTS`, with each torchvision builder's defaults), the
MobileNetV3 pyramid backbone, and the model: transform, backbone, `rpn` (`rpn.py`) and
`roi_heads` (`roi_heads.py`), with torchvision's state-dict names, so its published files load
unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import InputError
from ...ops import MultiScaleRoIAlign, paste_masks_in_image
from ..layers import FrozenBatchNorm2d, set_norm_eps
from ..mobilenetv3 import VARIANTS as MOBILENETV3_VARIANTS
from ..mobilenetv3 import MobileNetV3
from .anchors import AnchorGenerator
from .backbones import BackboneWithFPN, resnet_body
from .base import IMAGENET_MEAN, IMAGENET_STD, DetectionModel, check_num_classes, check_targets, declared_out_channels
from .fpn import FeaturePyramidNetwork, LastLevelMaxPool
from .roi_heads import (
    ConvFCHead,
    FastRCNNPredictor,
    KeypointRCNNHeads,
    KeypointRCNNPredictor,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    RoIHeads,
    TwoMLPHead,
)
from .rpn import RegionProposalNetwork, RPNHead, TopN
from .transform import DetectionTransform, ImageBatch, Target, as_image_list


class Kind(Enum):
    FASTER = "faster"  # boxes
    MASK = "mask"  # boxes and instance masks
    KEYPOINT = "keypoint"  # boxes and keypoints


@dataclass(frozen=True)
class RCNNConfig:
    kind: Kind = Kind.FASTER
    backbone: str = "resnet50"  # a zoo ResNet variant, or "mobilenet_v3_large"
    v2: bool = False  # BatchNorm backbone, pyramid and heads; two-convolution RPN head; conv box head
    # the builder's defaults (a constructor argument left at None takes these)
    num_classes: int = 91
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_score_thresh: float = 0.0
    num_keypoints: int = 17  # (keypoint models)
    keypoint_convs: tuple[int, ...] = (512,) * 8  # the keypoint head's 3x3 convolutions (widths)

    @property
    def mobilenet(self) -> bool:
        return self.backbone.startswith("mobilenet")


_MOBILENET = dict(backbone="mobilenet_v3_large", rpn_score_thresh=0.05)
VARIANTS: dict[str, RCNNConfig] = {
    "fasterrcnn_resnet50_fpn": RCNNConfig(),
    "fasterrcnn_resnet50_fpn_v2": RCNNConfig(v2=True),
    "fasterrcnn_mobilenet_v3_large_fpn": RCNNConfig(**_MOBILENET),  # type: ignore[arg-type]
    "fasterrcnn_mobilenet_v3_large_320_fpn": RCNNConfig(**_MOBILENET, min_size=320, max_size=640,  # type: ignore[arg-type]
                                                        rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150),
    "maskrcnn_resnet50_fpn": RCNNConfig(Kind.MASK),
    "maskrcnn_resnet50_fpn_v2": RCNNConfig(Kind.MASK, v2=True),
    # trained at several scales; evaluated at the last
    "keypointrcnn_resnet50_fpn": RCNNConfig(Kind.KEYPOINT, num_classes=2, min_size=(640, 672, 704, 736, 768, 800)),
}

# COCO's person keypoints, in the published Keypoint R-CNN's order (the catalog's `keypoint_names`), and the
# pairs of them joined when drawing a skeleton
COCO_PERSON_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
COCO_PERSON_SKELETON: tuple[tuple[str, str], ...] = (
    ("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("right_ankle", "right_knee"),
    ("right_knee", "right_hip"), ("left_hip", "right_hip"), ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"), ("left_shoulder", "right_shoulder"), ("left_shoulder", "left_elbow"),
    ("right_shoulder", "right_elbow"), ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"),
    ("left_eye", "right_eye"), ("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"),
    ("right_eye", "right_ear"), ("left_ear", "left_shoulder"), ("right_ear", "right_shoulder"),
)


def fpn_anchors(levels: int = 5) -> AnchorGenerator:
    """One size per pyramid level (32 to 512 pixels), three aspect ratios."""
    return AnchorGenerator([(32 * 2 ** i,) for i in range(levels)], [(0.5, 1.0, 2.0)] * levels)


def mobilenet_anchors(levels: int = 3) -> AnchorGenerator:
    """Five sizes (32 to 512 pixels) on every level: the MobileNet pyramid's levels share one stride."""
    return AnchorGenerator([(32, 64, 128, 256, 512)] * levels, [(0.5, 1.0, 2.0)] * levels)


class MobileNetV3FPN(nn.Module):
    """MobileNetV3's `features` (as `body`, so parameters are named `backbone.body.0...`) with a pyramid on
    its last two stages: the output of the last stride-2 block and of the final 1x1 convolution."""

    def __init__(self, trunk: MobileNetV3, trainable_layers: int = 3, out_channels: int = 256):
        super().__init__()
        self.body = trunk.features
        blocks = [m for m in self.body]
        # stage starts: the stem, every stride-2 block, and the final convolution
        strided = [i for i, m in enumerate(blocks) if _is_strided_block(m)]
        stages = [0, *strided, len(blocks) - 1]
        if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) \
                or not 0 <= trainable_layers <= len(stages):
            raise InputError(f"trainable_backbone_layers must be an integer from 0 to {len(stages)}, "
                             f"got {trainable_layers!r}")
        freeze_before = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        for block in blocks[:freeze_before]:
            for parameter in block.parameters():
                parameter.requires_grad_(False)
        self.taps = (stages[-2], stages[-1])
        widths = [_out_channels(blocks[i]) for i in self.taps]
        self.fpn = FeaturePyramidNetwork(widths, out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, block in enumerate(self.body):
            x = block(x)
            if i in self.taps:
                outputs.append(x)
        return self.fpn(outputs)


def _is_strided_block(module: nn.Module) -> bool:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return hasattr(module, "block") and any(c.stride[0] > 1 for c in convs)


def _out_channels(module: nn.Module) -> int:
    channels = getattr(module, "out_channels", None)
    if not isinstance(channels, int):
        raise InputError(f"cannot tell the width of {type(module).__name__}")
    return channels


_LEGACY_RPN_CONV = re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$")
_LEGACY_MASK_FCN = re.compile(r"^(roi_heads\.mask_head)\.mask_fcn(\d+)\.(weight|bias)$")


class RCNN(DetectionModel):
    """A two-stage detector: `backbone` (a pyramid), `rpn` proposals, `roi_heads` per proposal.

    `RCNN(config, ...)` returns a `FasterRCNN`, `MaskRCNN` or `KeypointRCNN` as the config's kind
    says. The arguments are torchvision's (`num_classes` counts the background); those left at None
    take the variant's builder defaults (the MobileNet variants' `rpn_score_thresh` 0.05 and the
    320 variant's sizes and proposal counts, Keypoint R-CNN's 2 classes, 17 keypoints and
    multi-scale `min_size`). `frozen_bn_eps` sets the eps of the ResNet backbones'
    FrozenBatchNorm2d (0.0 for the published COCO_V1 files of the v1 ResNet models).
    `keypoint_names` (comma-separated or a list; their number is `num_keypoints`) and
    `keypoint_skeleton` (0-based pairs, as "0-1,1-2" or a list of pairs) name a keypoint model's
    keypoints and how they are drawn (default: COCO's person keypoints and skeleton for 17,
    numbered names and no skeleton otherwise); a fine-tuned bundle records them.

    `model(images)` in eval mode returns per image `boxes`, `labels`, `scores`, and `masks`
    ((D, 1, H, W) probabilities at the image's size) or `keypoints` ((D, K, 3): x, y, 1) and
    `keypoints_scores`; in train mode `model(images, targets)` returns the losses (targets as
    for the other detectors, plus `masks` (N, H, W) or `keypoints` (N, K, 3) where the model has
    those branches).
    """

    first_label: ClassVar[int] = 1  # 0 is the background
    rpn: RegionProposalNetwork
    roi_heads: RoIHeads

    def __new__(cls, cfg: RCNNConfig | None = None, *args: Any, **kwargs: Any) -> RCNN:
        # (no arguments: copy.deepcopy and pickle make the instance before restoring its state)
        if cls is RCNN and isinstance(cfg, RCNNConfig):
            cls = _CLASS_OF_KIND[cfg.kind]
        return super().__new__(cls)

    def __init__(self, cfg: RCNNConfig, num_classes: int | None = None, min_size: int | Sequence[int] | None = None,
                 max_size: int | None = None, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None,
                 rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int | None = None,
                 rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int | None = None,
                 rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_score_thresh: float | None = None, box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
                 box_detections_per_img: int = 100, box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights: tuple[float, float, float, float] | None = None, num_keypoints: int | None = None,
                 trainable_backbone_layers: int | None = None, frozen_bn_eps: float = 1e-5, size_divisible: int = 32,
                 fixed_size: tuple[int, int] | None = None, backbone: nn.Module | None = None,
                 keypoint_names: str | Sequence[str] | None = None,
                 keypoint_skeleton: str | Sequence[Sequence[int]] | None = None):
        super().__init__()
        if not isinstance(cfg, RCNNConfig):
            raise InputError(f"RCNN needs an RCNNConfig (a row of VARIANTS), got {type(cfg).__name__}")
        self.cfg = cfg
        self.num_classes = check_num_classes(cfg.num_classes if num_classes is None else num_classes, 2)
        if frozen_bn_eps < 0:
            raise InputError(f"frozen_bn_eps must be >= 0, got {frozen_bn_eps!r}")
        self.backbone = backbone if backbone is not None else self._default_backbone(
            3 if trainable_backbone_layers is None else trainable_backbone_layers, frozen_bn_eps)
        channels = declared_out_channels(self.backbone)
        v2_norm = nn.BatchNorm2d if cfg.v2 else None

        anchors = mobilenet_anchors() if cfg.mobilenet else fpn_anchors()
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2 if cfg.v2 else 1),
            rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image, rpn_positive_fraction,
            TopN(rpn_pre_nms_top_n_train, _given(rpn_pre_nms_top_n_test, cfg.rpn_pre_nms_top_n_test)),
            TopN(rpn_post_nms_top_n_train, _given(rpn_post_nms_top_n_test, cfg.rpn_post_nms_top_n_test)),
            rpn_nms_thresh, _given(rpn_score_thresh, cfg.rpn_score_thresh))

        levels = ["0", "1", "2", "3"]
        box_head: nn.Module = (ConvFCHead(channels, 7, (256,) * 4, (1024,), v2_norm) if cfg.v2
                               else TwoMLPHead(channels * 7 * 7, 1024))
        heads: dict[str, nn.Module] = {}
        if cfg.kind is Kind.MASK:
            # (as wide as the pyramid: 256 for the published models, narrower on a small classifier's pyramid)
            heads = dict(mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
                         mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1, v2_norm),
                         mask_predictor=MaskRCNNPredictor(channels, channels, self.num_classes))
        elif cfg.kind is Kind.KEYPOINT:
            names = parse_keypoint_names(keypoint_names)
            self.num_keypoints = _given(num_keypoints, cfg.num_keypoints if names is None else len(names))
            if isinstance(self.num_keypoints, bool) or not isinstance(self.num_keypoints, int) \
                    or self.num_keypoints < 1:
                raise InputError(f"num_keypoints must be a positive integer, got {self.num_keypoints!r}")
            self.set_keypoint_layout(names, keypoint_skeleton)
            heads = dict(keypoint_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
                         keypoint_head=KeypointRCNNHeads(channels, cfg.keypoint_convs),
                         keypoint_predictor=KeypointRCNNPredictor(cfg.keypoint_convs[-1], self.num_keypoints))
        elif keypoint_names is not None or keypoint_skeleton is not None:
            raise InputError("keypoint_names and keypoint_skeleton are for Keypoint R-CNN; drop them")
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(levels, 7, 2), box_head, FastRCNNPredictor(1024, self.num_classes),
            box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image, box_positive_fraction, bbox_reg_weights,
            box_score_thresh, box_nms_thresh, box_detections_per_img, **heads)  # type: ignore[arg-type]
        self.transform = DetectionTransform(_given(min_size, cfg.min_size), _given(max_size, cfg.max_size),
                                            image_mean or IMAGENET_MEAN, image_std or IMAGENET_STD, size_divisible,
                                            fixed_size)

    def _default_backbone(self, trainable_layers: int, frozen_bn_eps: float) -> nn.Module:
        cfg = self.cfg
        if cfg.mobilenet:
            if cfg.backbone not in MOBILENETV3_VARIANTS:
                raise InputError(f"unknown MobileNetV3 backbone {cfg.backbone!r}")
            trunk = MobileNetV3(MOBILENETV3_VARIANTS[cfg.backbone], num_classes=0, norm_layer=FrozenBatchNorm2d)
            set_norm_eps(trunk, frozen_bn_eps)
            return MobileNetV3FPN(trunk, trainable_layers)
        body = resnet_body(cfg.backbone, frozen_norm=not cfg.v2, trainable_layers=trainable_layers,
                           frozen_bn_eps=frozen_bn_eps)
        return BackboneWithFPN(body, (1, 2, 3, 4), 256, LastLevelMaxPool(), nn.BatchNorm2d if cfg.v2 else None)

    @property
    def class_layers(self) -> tuple[str, ...]:
        # (the box regression, 4 per class, is replaced with them)
        layers = ["roi_heads.box_predictor.cls_score"]
        if self.roi_heads.has_mask:
            layers.append("roi_heads.mask_predictor.mask_fcn_logits")
        return tuple(layers)

    def reset_classifier(self, num_classes: int) -> None:
        """New box predictor (and mask logits) for `num_classes` classes, the background included."""
        num_classes = check_num_classes(num_classes, 2)
        old = self.roi_heads.box_predictor.cls_score
        device, dtype = old.weight.device, old.weight.dtype
        self.roi_heads.box_predictor = FastRCNNPredictor(old.in_features, num_classes).to(device=device, dtype=dtype)
        predictor = self.roi_heads.mask_predictor
        if isinstance(predictor, MaskRCNNPredictor):
            new = nn.Conv2d(predictor.dim_reduced, num_classes, 1)
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(new.bias)  # type: ignore[arg-type]
            predictor.mask_fcn_logits = new.to(device=device, dtype=dtype)
        self.num_classes = num_classes
        self._forget_classes_unless(num_classes)

    def set_keypoint_layout(self, names: tuple[str, ...] | None, skeleton: Any) -> None:
        """Name the keypoints (None: the defaults for their number) and set the skeleton (pairs of indices;
        None: COCO's for COCO's names, else none)."""
        count = self.num_keypoints
        if names is not None and len(names) != count:
            raise InputError(f"keypoint_names names {len(names)} keypoints but num_keypoints is {count}")
        if names is None:
            names = COCO_PERSON_KEYPOINTS if count == len(COCO_PERSON_KEYPOINTS) else tuple(
                f"keypoint_{j}" for j in range(count))
        pairs = parse_skeleton(skeleton, count)
        if pairs is None:
            index = {n: j for j, n in enumerate(names)}
            pairs = (tuple((index[a], index[b]) for a, b in COCO_PERSON_SKELETON)
                     if names == COCO_PERSON_KEYPOINTS else ())
        self.keypoint_names: tuple[str, ...] = names
        self.keypoint_skeleton: tuple[tuple[int, int], ...] = pairs

    def reset_keypoints(self, names: Sequence[str], skeleton: Sequence[tuple[int, int]] = ()) -> None:
        """A new keypoint predictor (the last layer of the keypoint branch) for the keypoints `names`
        (joined by `skeleton` when drawn); the rest of the branch is kept."""
        if not self.roi_heads.has_keypoint:
            raise InputError(f"{type(self).__name__} has no keypoint head")
        old = self.roi_heads.keypoint_predictor
        if not isinstance(old, KeypointRCNNPredictor):
            raise InputError(f"cannot replace a keypoint predictor of type {type(old).__name__}")
        layer = old.kps_score_lowres
        self.num_keypoints = len(names)
        self.roi_heads.keypoint_predictor = KeypointRCNNPredictor(layer.in_channels, len(names)).to(
            device=layer.weight.device, dtype=layer.weight.dtype)
        self.set_keypoint_layout(tuple(names), tuple(skeleton))

    def named_features(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pyramid's levels by torchvision's names: "0", "1", ... and "pool" for the max-pooled top."""
        return {(str(i) if i < len(features) - 1 else "pool"): f for i, f in enumerate(features)}

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], targets: Sequence[Target] | None = None
                ) -> list[Target] | dict[str, torch.Tensor]:
        images = as_image_list(images, len(self.transform.image_mean))
        checked = self.check_training_targets(targets, images) if self.training else None
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, scaled = self.transform(images, checked)
        features = self.named_features(self.backbone(batch.tensors))
        proposals, rpn_losses = self.rpn(batch, list(features.values()), scaled)
        detections, head_losses = self.roi_heads(features, proposals, batch.image_sizes, scaled)
        if scaled is not None:
            return {**rpn_losses, **head_losses}
        return self.postprocess(detections, batch, original_sizes)

    def detect_with_losses(self, images: Sequence[torch.Tensor], targets: Sequence[Target]
                           ) -> tuple[list[Target], dict[str, torch.Tensor]]:
        """(detections, losses) of held-out images in evaluation mode: the proposals and detections as
        `forward` makes them, the losses as training computes them on those proposals. The anchors and
        proposals the losses sample are drawn from a fixed seed, leaving the global random state as it was."""
        images = as_image_list(images, len(self.transform.image_mean))
        checked = self.check_training_targets(targets, images)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, scaled = self.transform(images, checked)
        features = self.named_features(self.backbone(batch.tensors))
        device = batch.tensors.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.random.default_generator.manual_seed(0)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(0)
            proposals, rpn_losses = self.rpn(batch, list(features.values()), scaled)
            _, head_losses = self.roi_heads(features, proposals, batch.image_sizes, scaled)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes, None)
        return self.postprocess(detections, batch, original_sizes), {**rpn_losses, **head_losses}

    def postprocess(self, detections: list[Target], batch: ImageBatch, original_sizes: list[tuple[int, int]]
                    ) -> list[Target]:
        """Boxes and keypoints in the original images' pixels; masks pasted into the original images."""
        detections = self.transform.postprocess(detections, batch.image_sizes, original_sizes)
        for det, size in zip(detections, original_sizes, strict=True):
            if "masks" in det:
                det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], size)
        return detections

    def check_training_targets(self, targets: Sequence[Target] | None, images: list[torch.Tensor]) -> list[Target]:
        checked = check_targets(targets, images, self.num_classes, self.first_label)
        for i, (target, image) in enumerate(zip(checked, images, strict=True)):
            count = target["boxes"].shape[0]
            if self.roi_heads.has_mask:
                masks = target.get("masks")
                if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (count, *image.shape[-2:]):
                    shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
                    raise InputError(f"target {i}: masks must be a tensor of shape ({count}, {image.shape[-2]}, "
                                     f"{image.shape[-1]}) (one image-sized mask per box), got {shape}")
            if self.roi_heads.has_keypoint:
                kps = target.get("keypoints")
                if not isinstance(kps, torch.Tensor) or tuple(kps.shape) != (count, self.num_keypoints, 3) \
                        or not kps.is_floating_point():
                    shape = tuple(kps.shape) if isinstance(kps, torch.Tensor) else type(kps).__name__
                    raise InputError(f"target {i}: keypoints must be a float tensor of shape ({count}, "
                                     f"{self.num_keypoints}, 3) (x, y, visibility), got {shape}")
        return checked

    def _current_name(self, key: str) -> str:
        # files saved before torchvision wrapped the RPN's and the mask head's convolutions in blocks
        key = _LEGACY_RPN_CONV.sub(r"\1.0.0.\2", key)
        match = _LEGACY_MASK_FCN.match(key)
        if match:
            return f"{match[1]}.{int(match[2]) - 1}.0.{match[3]}"
        return super()._current_name(key)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def parse_keypoint_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Keypoint names given as "a,b,c" or a list."""
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",")) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise InputError(f"keypoint_names must be distinct non-empty names, got {value!r:.80}")
    return names


def parse_skeleton(value: str | Sequence[Sequence[int]] | None, count: int) -> tuple[tuple[int, int], ...] | None:
    """A skeleton given as "0-1,1-2" or a list of 0-based pairs."""
    if value is None:
        return None
    try:
        pairs = (tuple(tuple(int(v) for v in p.split("-")) for p in value.split(",") if p.strip())
                 if isinstance(value, str) else tuple(tuple(int(v) for v in p) for p in value))
    except (TypeError, ValueError):
        pairs = ((-1,),)
    if not all(len(p) == 2 and all(0 <= v < count for v in p) for p in pairs):
        raise InputError(f"keypoint_skeleton must be pairs of keypoint indices from 0 to {count - 1} (\"0-1,1-2\"), "
                         f"got {value!r:.80}")
    return tuple((p[0], p[1]) for p in pairs)


def layout_kwargs(names: Sequence[str], skeleton: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The builder arguments that record a keypoint layout in a bundle (plain strings)."""
    return {"num_keypoints": len(names), "keypoint_names": ",".join(names),
            "keypoint_skeleton": ",".join(f"{a}-{b}" for a, b in skeleton)}


class FasterRCNN(RCNN):
    """Boxes only."""


class MaskRCNN(RCNN):
    """Boxes and instance masks."""


class KeypointRCNN(RCNN):
    """Boxes and keypoints."""

    num_keypoints: int


_CLASS_OF_KIND: dict[Kind, type[RCNN]] = {Kind.FASTER: FasterRCNN, Kind.MASK: MaskRCNN, Kind.KEYPOINT: KeypointRCNN}
MODEL_CLASS = RCNN
