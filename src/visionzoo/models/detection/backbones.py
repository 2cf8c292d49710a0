"""Detection backbones: any zoo classifier's stages with a feature pyramid on top.

`BackboneWithFPN` keeps the classifier itself as `body` (so a ResNet's parameters are named
`backbone.body.layer1...`, as in torchvision's checkpoints) and takes the stages it needs from
the classifier's `feature_info`, so the same class serves torchvision's ResNet-50-FPN and a
detector built on any classifier of the zoo.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...errors import InputError
from ..base import ZooModel
from ..features import capture_stages, resolve_out_indices
from ..layers import FrozenBatchNorm2d, set_norm_eps
from ..resnet import VARIANTS as RESNET_VARIANTS
from ..resnet import ResNet
from .fpn import ExtraLevels, FeaturePyramidNetwork


class BackboneWithFPN(nn.Module):
    """The stages `out_indices` of `body` (a zoo classifier) followed by a feature pyramid.

    `forward(x)` returns the pyramid's levels, finest first; `out_channels` is their width and
    `reductions` their strides.
    """

    def __init__(self, body: ZooModel, out_indices: Sequence[int | str], out_channels: int = 256,
                 extra_blocks: ExtraLevels | None = None, norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        if not isinstance(body, ZooModel):
            raise InputError(f"a detection backbone must be a visionzoo classifier, got {type(body).__name__}")
        self.body = body
        self.out_indices = resolve_out_indices(body, out_indices)
        stages = [body.feature_info[i] for i in self.out_indices]
        self.fpn = FeaturePyramidNetwork([s.num_chs for s in stages], out_channels, extra_blocks, norm_layer)
        self.out_channels = out_channels
        extra = self.fpn.num_levels - len(stages)
        self.reductions = [s.reduction for s in stages] + [stages[-1].reduction * 2 ** (i + 1) for i in range(extra)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(capture_stages(self.body, self.out_indices, x))


def resnet_body(variant: str = "resnet50", frozen_norm: bool = True, trainable_layers: int | None = 3,
                frozen_bn_eps: float | None = None) -> ResNet:
    """A zoo ResNet without its classifier, as detection backbones use it: FrozenBatchNorm2d (the
    batches are too small for batch statistics) or BatchNorm2d, and the first `5 - trainable_layers`
    of (conv1, layer1, ..., layer4) frozen (None: 3 trainable, torchvision's default).
    `frozen_bn_eps` overrides the normalisation eps (some published files need 0.0)."""
    norm_layer = FrozenBatchNorm2d if frozen_norm else nn.BatchNorm2d
    body = ResNet(RESNET_VARIANTS[variant], num_classes=0, norm_layer=norm_layer)
    freeze_resnet_layers(body, 3 if trainable_layers is None else trainable_layers)
    if frozen_bn_eps is not None:
        if frozen_bn_eps < 0:
            raise InputError(f"frozen_bn_eps must be >= 0, got {frozen_bn_eps!r}")
        set_norm_eps(body, frozen_bn_eps)
    return body


def freeze_resnet_layers(body: ResNet, trainable_layers: int) -> None:
    """Stop gradients in all but the last `trainable_layers` of (conv1 + bn1, layer1, ..., layer4)."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise InputError(f"trainable_backbone_layers must be an integer from 0 to 5, got {trainable_layers!r}")
    trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trained.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(prefix) for prefix in trained):
            parameter.requires_grad_(False)


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a FrozenBatchNorm2d holding the same statistics,
    affine terms and eps (detection batches are too small to train batch statistics)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            # (the affine terms and the statistics, those the layer has)
            given = {key: t for key, t in (("weight", child.weight), ("bias", child.bias),
                                             ("running_mean", child.running_mean),
                                             ("running_var", child.running_var)) if t is not None}
            like = next(iter(given.values()))
            frozen = FrozenBatchNorm2d(child.num_features, child.eps).to(device=like.device, dtype=like.dtype)
            with torch.no_grad():
                for key, tensor in given.items():
                    frozen.get_buffer(key).copy_(tensor)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module
