"""Semantic segmentation: FCN, DeepLabV3 and LR-ASPP, the six published models and the same heads on any zoo classifier.

Long et al., "Fully Convolutional Networks for Semantic Segmentation" (2015); Chen et al.,
"Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLabV3, 2017); Howard
et al., "Searching for MobileNetV3" (LR-ASPP, 2019). The heads are in `segmentation_heads.py`.

- `VARIANTS` / `MODEL_CLASS`: torchvision's six (`fcn_resnet50`, ..., `lraspp_mobilenet_v3_large`,
  21 classes), on our ResNet (stride of stages 3 and 4 replaced by dilation: output stride 8)
  and MobileNetV3 (last stage dilated: output stride 16). State-dict names are torchvision's
  (`backbone.layer4.2.conv3.weight`, `backbone.16.0.weight`, `classifier.0.convs.0.0.weight`,
  `aux_classifier.0.weight`), so the published files load strictly.
- `segmentation_model(backbone, head)`: the same heads on any classifier of the zoo, through
  its `feature_info` stages, dilated where the family allows it.
- `segmentation_loss`: the pixel-wise cross-entropy torchvision's recipe trains them with.

`model(x)` returns `{"out": logits}` (plus `"aux"` with the auxiliary classifier), each
(N, num_classes, H, W) at the input's size.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..data.preprocess import Preprocess
from ..enums import Task, parse_enum
from ..errors import InputError
from . import mobilenetv3, resnet
from .base import FeatureInfo, VisionModel, ZooModel
from .features import FeatureExtractor
from .layers import ConvNormAct
from .resnet import Bottleneck
from .segmentation_heads import DeepLabHead, FCNHead, LRASPPHead, upsample_to

log = logging.getLogger("visionzoo")


class HeadKind(str, Enum):
    FCN = "fcn"
    DEEPLABV3 = "deeplabv3"
    LRASPP = "lraspp"


@dataclass(frozen=True)
class SegmentationConfig:
    head: HeadKind
    backbone: str  # a variant of our ResNet or MobileNetV3 family, built dilated
    # backbone layers torchvision taps: (auxiliary or low-level, main); ResNet stages or
    # positions in MobileNetV3's `features` (the block opening the stride-8 stage, the last layer)
    taps: tuple[str, str]


_RESNET_TAPS = ("layer3", "layer4")
_MOBILENET_TAPS = ("4", "16")
VARIANTS: dict[str, SegmentationConfig] = {
    "fcn_resnet50": SegmentationConfig(HeadKind.FCN, "resnet50", _RESNET_TAPS),
    "fcn_resnet101": SegmentationConfig(HeadKind.FCN, "resnet101", _RESNET_TAPS),
    "deeplabv3_resnet50": SegmentationConfig(HeadKind.DEEPLABV3, "resnet50", _RESNET_TAPS),
    "deeplabv3_resnet101": SegmentationConfig(HeadKind.DEEPLABV3, "resnet101", _RESNET_TAPS),
    "deeplabv3_mobilenet_v3_large": SegmentationConfig(HeadKind.DEEPLABV3, "mobilenet_v3_large", _MOBILENET_TAPS),
    "lraspp_mobilenet_v3_large": SegmentationConfig(HeadKind.LRASPP, "mobilenet_v3_large", _MOBILENET_TAPS),
}


class StageTaps(nn.Sequential):
    """The first layers of a network whose forward runs its children in order (ResNet's stem
    and stages, MobileNetV3's `features`), under their own names, up to the last tapped one;
    `forward` returns the outputs of the `taps` layers in the order given."""

    def __init__(self, layers: Iterable[tuple[str, nn.Module]], taps: Sequence[str]):
        layers = list(layers)
        names = [name for name, _ in layers]
        unknown = [t for t in taps if t not in names]
        if unknown or not taps:
            raise ValueError(f"taps {tuple(taps)} are not among the layers {names}")
        super().__init__(OrderedDict(layers[: max(names.index(t) for t in taps) + 1]))
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for name, layer in self.named_children():
            x = layer(x)
            if name in self.taps:
                found[name] = x
        return [found[t] for t in self.taps]


class SegmentationModel(VisionModel):
    """A backbone giving feature maps, a head turning them into class scores, and optionally
    an auxiliary FCN head (a training aid on a shallower stage); logits are upsampled to the
    input size (bilinear, corners not aligned).

    `backbone(x)` returns a list of maps with `channels` channels: `[main]`, or
    `[secondary, main]` where the secondary map feeds the auxiliary head (FCN, DeepLabV3) or
    is LR-ASPP's low-level (stride 8) input.

    `feature_info` lists the backbone's stages (as a classifier's, shallow to deep), named within
    this model (`backbone.layer3`, `backbone.model.features.5`): what fine-tuning freezes or
    trains stage by stage, the heads being what runs after the last one.
    """

    task: ClassVar[Task] = Task.SEGMENTATION

    def __init__(self, backbone: nn.Module, channels: Sequence[int], head: HeadKind | str, num_classes: int = 21,
                 aux_loss: bool = False, feature_info: Sequence[FeatureInfo] = ()):
        super().__init__()
        head = parse_enum(HeadKind, head, "segmentation head")
        _check_num_classes(num_classes)
        needed = 2 if aux_loss or head is HeadKind.LRASPP else 1
        if len(channels) != needed:
            raise ValueError(f"a {head.value} head{' with aux_loss' if aux_loss else ''} takes {needed} backbone "
                             f"map(s), got channels {tuple(channels)}")
        if aux_loss and head is HeadKind.LRASPP:
            raise InputError("the LR-ASPP head has no auxiliary classifier; pass aux_loss=False")
        self.head = head
        self.num_classes = num_classes
        self.backbone = backbone
        if head is HeadKind.LRASPP:
            self.classifier: LRASPPHead | DeepLabHead | FCNHead = LRASPPHead(channels[0], channels[1], num_classes)
        elif head is HeadKind.DEEPLABV3:
            self.classifier = DeepLabHead(channels[-1], num_classes)
        else:
            self.classifier = FCNHead(channels[-1], num_classes)
        self.aux_classifier = FCNHead(channels[0], num_classes) if aux_loss else None
        self.feature_info = list(feature_info)

    @property
    def class_layers(self) -> tuple[str, ...]:
        """Dotted names of the final class layers (main head first), the ones `reset_classifier` replaces."""
        heads = [("classifier", self.classifier), ("aux_classifier", self.aux_classifier)]
        return tuple(f"{prefix}.{name}" for prefix, head in heads if head is not None for name in head.class_layers)

    @property
    def classifier_name(self) -> str:
        """The main head's (last) class layer, as on classifiers."""
        return f"classifier.{self.classifier.class_layers[-1]}"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        maps = self.backbone(x)
        out = self.classifier(maps[0], maps[1]) if self.head is HeadKind.LRASPP else self.classifier(maps[-1])
        result = {"out": upsample_to(out, size)}
        if self.aux_classifier is not None:
            result["aux"] = upsample_to(self.aux_classifier(maps[0]), size)
        return result

    def reset_classifier(self, num_classes: int) -> None:
        """New final 1x1 convolutions (main and auxiliary heads) for `num_classes`, on the old
        ones' device and dtype."""
        _check_num_classes(num_classes)
        for name in self.class_layers:
            parent_name, _, leaf = name.rpartition(".")
            parent = self.get_submodule(parent_name)
            old = cast(nn.Conv2d, parent.get_submodule(leaf))  # the heads' class layers are 1x1 convolutions
            new = nn.Conv2d(old.in_channels, num_classes, 1)
            setattr(parent, leaf, new.to(device=old.weight.device, dtype=old.weight.dtype))
        self.num_classes = num_classes

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop the checkpoint's auxiliary classifier when this model was built without one."""
        prefix = "aux_classifier."
        if self.aux_classifier is not None or not any(k.startswith(prefix) for k in state_dict):
            return state_dict
        dropped = sum(k.startswith(prefix) for k in state_dict)
        log.info("%s: dropped the checkpoint's auxiliary classifier (%d tensors): the model was built with "
                 "aux_loss=False", self.arch or type(self).__name__, dropped)
        return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}


class PublishedSegmentationModel(SegmentationModel):
    """torchvision's FCN / DeepLabV3 / LR-ASPP on its dilated ResNet or MobileNetV3 backbone.

    `aux_loss=None` keeps the auxiliary classifier of FCN and DeepLabV3, as the published
    files (and torchvision's builder with weights="DEFAULT") have it; LR-ASPP has none.
    """

    def __init__(self, cfg: SegmentationConfig, num_classes: int = 21, aux_loss: bool | None = None):
        aux = cfg.head is not HeadKind.LRASPP if aux_loss is None else bool(aux_loss)
        layers, channels, stages = _dilated_backbone(cfg.backbone)
        taps = cfg.taps if aux or cfg.head is HeadKind.LRASPP else cfg.taps[1:]
        backbone = StageTaps(layers, taps)
        kept = {f"backbone.{name}" for name, _ in backbone.named_children()}
        super().__init__(backbone, [channels[t] for t in taps], cfg.head, num_classes, aux,
                         [info for info in stages if info.module in kept])


def _dilated_backbone(name: str) -> tuple[list[tuple[str, nn.Module]], dict[str, int], list[FeatureInfo]]:
    """The layers of torchvision's segmentation backbone `name` (our classifier built dilated,
    its class head left out), the output channels of each layer that can be tapped, and the
    classifier's stages named as they will be in the segmentation model (`backbone.<layer>`)."""
    if name in resnet.VARIANTS:
        net = resnet.ResNet(resnet.VARIANTS[name], num_classes=0, replace_stride_with_dilation=(False, True, True))
        stages = [replace(info, module=f"backbone.{info.module}") for info in net.feature_info]
        return list(net.named_children()), {info.module: info.num_chs for info in net.feature_info}, stages
    if name in mobilenetv3.VARIANTS:
        classifier = mobilenetv3.MobileNetV3(mobilenetv3.VARIANTS[name], dilated=True)
        layers = list(classifier.features.named_children())
        # its stages are `features.<i>`; the backbone holds `features`' layers themselves
        stages = [replace(info, module="backbone." + info.module.removeprefix("features."))
                  for info in classifier.feature_info]
        return layers, {n: cast(int, m.out_channels) for n, m in layers}, stages
    raise ValueError(f"no dilated segmentation backbone {name!r}")


# -- the heads on any classifier of the zoo ----------------------------------------------------------
# registered as architectures of their own: `create_model("lraspp", backbone="efficientnet_lite0", ...)`
COMPOSED: dict[str, HeadKind] = {"fcn": HeadKind.FCN, "deeplabv3": HeadKind.DEEPLABV3, "lraspp": HeadKind.LRASPP}
COMPOSED_CLASS = SegmentationModel
# the published models' recipe; the factory takes the normalisation of the backbone's own weights
COMPOSED_PREPROCESS = Preprocess(520, None, kind="SemanticSegmentation")


def compose(head: HeadKind, backbone: ZooModel, num_classes: int = 21, aux_loss: bool = False,
            dilate: bool = True) -> SegmentationModel:
    """The registry's builder of a `COMPOSED` entry: `segmentation_model` with the entry's head."""
    return segmentation_model(backbone, head, num_classes=num_classes, aux_loss=aux_loss, dilate=dilate)


def segmentation_model(backbone: ZooModel, head: HeadKind | str, num_classes: int = 21, aux_loss: bool = False,
                       dilate: bool = True) -> SegmentationModel:
    """An FCN, DeepLabV3 or LR-ASPP head on `backbone`, a classifier of the zoo (pre-trained or not).

    The backbone is taken over, not copied: its class layer is removed (`reset_classifier(0)`)
    and, with `dilate`, ResNet (bottleneck) and MobileNetV3 trade their last strides for
    dilation as the published models do (output stride 8 and 16); other families keep their
    native stride. The heads read its `feature_info` stages: FCN and DeepLabV3 the deepest
    (the auxiliary head the one before it), LR-ASPP the shallowest stage at stride 8 and the
    deepest. The state-dict names are `backbone.model.<the classifier's names>`.
    """
    if not isinstance(backbone, ZooModel):
        raise InputError(f"segmentation_model needs a visionzoo classifier as backbone, got {type(backbone).__name__}")
    head = parse_enum(HeadKind, head, "segmentation head")
    _check_num_classes(num_classes)
    if aux_loss and head is HeadKind.LRASPP:
        raise InputError("the LR-ASPP head has no auxiliary classifier; pass aux_loss=False")
    # the stages are chosen before dilating (which only lowers the reduction of the deepest
    # stages), so that a backbone that does not fit is left untouched
    infos = backbone.feature_info
    deepest = len(infos) - 1
    name = backbone.arch or type(backbone).__name__
    if head is HeadKind.LRASPP:
        low = next((i for i, info in enumerate(infos) if info.reduction == 8), None)
        if low is None or low == deepest:
            listed = ", ".join(f"{info.module} (/{info.reduction})" for info in infos)
            raise InputError(f"LR-ASPP needs a stage at stride 8 before the deepest one, and {name} has none "
                             f"({listed}); use the fcn or deeplabv3 head")
        taps: tuple[int, ...] = (low, deepest)
    elif aux_loss:
        if deepest == 0:
            raise InputError(f"{name} has a single stage: no room for an auxiliary head; pass aux_loss=False")
        taps = (deepest - 1, deepest)
    else:
        taps = (deepest,)
    if dilate:
        dilate_(backbone)
    backbone.reset_classifier(0)
    extractor = FeatureExtractor(backbone, taps)
    # the extractor stops after the deepest tap: its stages are the ones up to there
    stages = [replace(info, module=f"backbone.model.{info.module}") for info in backbone.feature_info[:max(taps) + 1]]
    return SegmentationModel(extractor, extractor.channels, head, num_classes, aux_loss, stages)


def dilate_(model: ZooModel) -> bool:
    """Replace the last strides of a ResNet (bottleneck blocks: stages 3 and 4) or a MobileNetV3
    (its last stage) by dilation, in place, exactly as building it with
    `replace_stride_with_dilation=(False, True, True)` or `dilated=True` would; `feature_info`
    follows. Returns whether the model is now dilated (False for other families, and for
    ResNets of basic blocks, which torchvision does not dilate)."""
    if isinstance(model, resnet.ResNet):
        return _dilate_resnet_(model)
    if isinstance(model, mobilenetv3.MobileNetV3):
        return _dilate_mobilenetv3_(model)
    return False


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    conv.stride = (1, 1)
    conv.dilation = (dilation, dilation)
    conv.padding = ((conv.kernel_size[0] - 1) // 2 * dilation, (conv.kernel_size[1] - 1) // 2 * dilation)


def _dilate_resnet_(net: resnet.ResNet) -> bool:
    if not isinstance(net.layer1[0], Bottleneck):
        return False
    dilation = 1
    for name in ("layer3", "layer4"):
        stage = cast(list[Bottleneck], list(net.get_submodule(name).children()))  # checked above: bottlenecks
        if stage[0].conv2.stride == (1, 1):  # built dilated already
            dilation = stage[-1].conv2.dilation[0]
            continue
        # the stage's first block keeps the previous dilation (it used to downsample), the others double it
        first_dilation, dilation = dilation, dilation * 2
        for j, block in enumerate(stage):
            _set_dilation(block.conv2, first_dilation if j == 0 else dilation)
        cast(nn.Conv2d, cast(nn.Sequential, stage[0].downsample)[0]).stride = (1, 1)
    net.feature_info = [replace(info, reduction=8) if info.module in ("layer3", "layer4") else info
                        for info in net.feature_info]
    return True


def _dilate_mobilenetv3_(net: mobilenetv3.MobileNetV3) -> bool:
    block_convs = [[cast(nn.Conv2d, m[0]) for m in block.block if isinstance(m, ConvNormAct)]
                   for block in net.features if isinstance(block, mobilenetv3.InvertedResidual)]
    depthwise = [next(conv for conv in convs if conv.groups > 1) for convs in block_convs]
    if any(conv.dilation != (1, 1) for conv in depthwise):
        return True
    start = max(i for i, conv in enumerate(depthwise) if conv.stride == (2, 2))
    for conv in depthwise[start:]:
        _set_dilation(conv, 2)
    last = net.feature_info[-1]
    net.feature_info = [*net.feature_info[:-1], replace(last, reduction=last.reduction // 2)]
    return True


# -- training ---------------------------------------------------------------------------------------
def segmentation_loss(outputs: Mapping[str, torch.Tensor], target: torch.Tensor, ignore_index: int = 255,
                      aux_weight: float = 0.5, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise cross-entropy of `outputs["out"]` plus `aux_weight` times that of `outputs["aux"]`
    (when present): torchvision's training recipe for these models.

    `target` holds class indices (N, H, W), `ignore_index` marking pixels left out (VOC's
    object borders); `class_weights` (num_classes,) weighs each class's pixels. A batch with
    no labelled pixel gives a zero loss (not NaN).
    """
    if "out" not in outputs:
        raise InputError(f"segmentation_loss needs the model's output dict with an 'out' entry, got {list(outputs)}")
    out = outputs["out"]
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.ndim != 3 \
            or target.shape[0] != out.shape[0] or target.shape[1:] != out.shape[2:]:
        raise InputError(f"the target must be integer class indices of shape {(out.shape[0], *out.shape[2:])} "
                         f"(N, H, W), got {target.dtype} {tuple(target.shape)}")
    if class_weights is not None and class_weights.shape != (out.shape[1],):
        raise InputError(f"class_weights must hold one weight per class ({out.shape[1]}), "
                         f"got shape {tuple(class_weights.shape)}")
    target = target.long()
    loss = _cross_entropy(out, target, ignore_index, class_weights)
    if "aux" in outputs and aux_weight:
        loss = loss + aux_weight * _cross_entropy(outputs["aux"], target, ignore_index, class_weights)
    return loss


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                   weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels (weighted mean with `weights`), 0 when there are none;
    no host synchronisation."""
    if weights is not None:
        weights = weights.to(device=logits.device, dtype=logits.dtype)
    total = F.cross_entropy(logits, target, weight=weights, ignore_index=ignore_index, reduction="sum")
    labelled = target != ignore_index
    if weights is None:
        count = labelled.sum().to(total.dtype)
    else:
        count = (weights[target.masked_fill(~labelled, 0)] * labelled).sum()
    return total / count.clamp_min(torch.finfo(total.dtype).tiny)


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"num_classes must be an integer >= 1 for a segmentation model, got {num_classes!r}")


MODEL_CLASS = PublishedSegmentationModel
