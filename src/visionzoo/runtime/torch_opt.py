"""The cheap wins for plain PyTorch inference: BatchNorm folded into convolutions, channels-last.

Folding: in eval mode a BatchNorm after a convolution is an affine map per channel, so it
can be merged into the convolution's weights and bias (one pass over the activations
instead of two). Which convolution feeds which BatchNorm is read from the model's own
forward with `torch.fx` (no family knowledge): a pair is folded when the BatchNorm's only
input is the convolution's output and nothing else uses that output. A (sub)module that
FX cannot trace (data-dependent control flow, e.g. Swin's padding) is split into its
children, which are traced in turn. The model keeps its module tree and its interface
(`forward_features`, `forward_head`, feature hooks): folded BatchNorms become `Identity`.

Channels-last: oneDNN's convolutions run on NHWC data without reordering each layer's
input and output. With the folding and `inference_mode`, the torch backend runs 1.6x
(ResNet-50) to 2.3x (EfficientNet-Lite0) eager's images/second at batch 32
(benchmarks/deploy_speed.py).
"""
from __future__ import annotations

import copy
import logging
from typing import TypeVar, cast

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from ..models.base import VisionModel
from ..models.layers import FrozenBatchNorm2d

log = logging.getLogger("visionzoo")
ModuleT = TypeVar("ModuleT", bound=nn.Module)
# folded into the convolution of the same dimension before them (FrozenBatchNorm2d: the detection backbones')
_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d, FrozenBatchNorm2d)


def optimize_for_inference(model: ModuleT, *, channels_last: bool = True, inplace: bool = False) -> ModuleT:
    """An eval-mode copy of `model` (the model itself with `inplace`) with BatchNorms folded
    into the convolutions before them and, with `channels_last`, NHWC parameters.

    The copy computes the same function (to float rounding); feed it channels-last inputs
    (`x.contiguous(memory_format=torch.channels_last)`) for the speed-up.
    """
    net = model if inplace else copy_model(model)
    net.eval()
    folded = fold_batchnorms(net)
    if folded:
        name = net.arch if isinstance(net, VisionModel) else None
        log.info("%s: folded %d BatchNorm layers into convolutions", name or type(net).__name__, folded)
    if channels_last:
        # Module.to takes memory_format at run time; torch's stubs list no overload with it
        net.to(memory_format=channels_last_format(net))  # type: ignore[call-overload]
    return net


def channels_last_format(net: nn.Module) -> torch.memory_format:
    """NDHWC for a network of 3-D convolutions (video), NHWC otherwise."""
    video = any(isinstance(m, nn.Conv3d) for m in net.modules())
    return torch.channels_last_3d if video else torch.channels_last


def copy_model(model: ModuleT) -> ModuleT:
    """A deep copy of the modules, parameters and buffers; plain attributes (weights records,
    preprocessing, class names: immutable or treated so) are shared, not copied, since some
    (mapping proxies) cannot be."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for key, value in vars(m).items():
            # torch's own state (`_parameters`, hooks, ...) is private and must be copied
            if not key.startswith("_") and not isinstance(value, (nn.Module, torch.Tensor)):
                memo[id(value)] = value
    return copy.deepcopy(model, memo)


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every (Conv2d -> BatchNorm2d) and (Conv3d -> BatchNorm3d) pair of an eval-mode model in place;
    returns how many."""
    pairs: list[tuple[str, str]] = []
    _find_pairs(model, "", pairs)
    for conv_name, bn_name in pairs:
        # _find_pairs checked the types
        conv, bn = cast(nn.Conv2d, model.get_submodule(conv_name)), model.get_submodule(bn_name)
        _set_submodule(model, conv_name, _fused(conv, bn))
        _set_submodule(model, bn_name, nn.Identity())
    return len(pairs)


def _find_pairs(module: nn.Module, prefix: str, pairs: list[tuple[str, str]]) -> None:
    if not any(isinstance(m, _NORMS) for m in module.modules()):
        return
    try:
        graph = _LeafTracer().trace(module)
    except Exception:  # noqa: BLE001  (any tracing failure: look inside instead)
        for name, child in module.named_children():
            _find_pairs(child, f"{prefix}{name}.", pairs)
        return
    for node in graph.nodes:
        target = cast(str, node.target)  # a call_module node's target is the module's qualified name
        if node.op != "call_module" or not isinstance(module.get_submodule(target), _NORMS):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        source_target = cast(str, source.target)
        conv, bn = module.get_submodule(source_target), cast(nn.BatchNorm2d, module.get_submodule(target))
        if _foldable(conv, bn):
            pairs.append((prefix + source_target, prefix + target))


class _LeafTracer(fx.Tracer):
    """Modules without children are leaves: only how they are wired matters here, and a custom
    layer's own code (TF "SAME" padding computed from the input size) need not be traceable."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return next(iter(m.children()), None) is None or super().is_leaf_module(m, qualname)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    conv_type = nn.Conv3d if isinstance(bn, nn.BatchNorm3d) else nn.Conv2d
    if not isinstance(conv, conv_type) or conv.transposed:
        return False
    if isinstance(bn, FrozenBatchNorm2d):  # fixed statistics: foldable in train mode too, but only inference folds
        return conv.out_channels == bn.weight.numel()
    return bool(not bn.training and bn.track_running_stats and bn.running_mean is not None
                and conv.out_channels == bn.num_features)


def _fused(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """`conv` with `bn` (a BatchNorm in eval mode or a FrozenBatchNorm2d) folded into a copy of it."""
    if not isinstance(bn, FrozenBatchNorm2d):
        return fuse_conv_bn_eval(conv, cast(nn.BatchNorm2d, bn))
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                    bn.weight, bn.bias)
    return fused


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)
