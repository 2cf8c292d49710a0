"""Channel counts that differ from the registry's architecture (a structurally pruned model).

A pruned network is the registry's architecture with fewer channels in some layers. A
bundle stores it as data, never as pickled code: `bundle.json` lists, per changed layer,
its channel attributes (`in_channels`, `out_channels`, `groups`, `num_features`,
`in_features`, `out_features`, ...), and the weights file holds tensors of the new
shapes. Loading builds the registry architecture, applies the attributes, gives each
changed parameter and buffer the checkpoint's shape, then loads the weights strictly.

The model-level facts that follow from the channels (`num_features`, `feature_info`
channel counts) are recorded too, so the loaded model's interface (embed, features_only,
reset_classifier) describes what it really computes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .base import FeatureInfo, ZooModel

# the attributes of torch's layers that hold channel counts (only those that exist on a module are used)
CHANNEL_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
                 "normalized_shape", "num_channels", "num_groups", "embed_dim", "num_heads")


def _attrs(module: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CHANNEL_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
        elif isinstance(value, tuple) and all(isinstance(v, int) for v in value):
            out[name] = list(value)
    return out


def structure_changes(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """What differs in `model` from `reference` (the registry build): {} when nothing does.

    Returns {"modules": {name: {attr: value}}, "num_features": int, "feature_chs": [int, ...]}.
    """
    ref_modules = dict(reference.named_modules())
    modules = {}
    for name, module in model.named_modules():
        ref = ref_modules.get(name)
        if ref is None or type(ref) is not type(module):
            continue  # a different module tree is not a channel change; strict loading will say so
        ours, theirs = _attrs(module), _attrs(ref)
        changed = {k: v for k, v in ours.items() if theirs.get(k) != v}
        if changed:
            modules[name] = changed
    if not modules:
        return {}
    return {"modules": modules, "num_features": int(getattr(model, "num_features", 0)),
            "feature_chs": [int(info.num_chs) for info in getattr(model, "feature_info", [])]}


def apply_structure(model: nn.Module, structure: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give `model` the recorded channel attributes and the checkpoint's tensor shapes (values
    come from loading `state_dict` afterwards)."""
    for name, attrs in (structure.get("modules") or {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the recorded structure names a layer {name!r} that the architecture lacks; "
                                  f"write the bundle again") from None
        for key, value in attrs.items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        saved = state_dict.get(name)
        if saved is not None and tuple(saved.shape) != tuple(tensor.shape):
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            fresh = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(owner, leaf, nn.Parameter(fresh, requires_grad=tensor.requires_grad))
            else:
                owner.register_buffer(leaf, fresh, persistent=leaf not in owner._non_persistent_buffers_set)
    # attributes of classifiers, not of every model: set by name
    if "num_features" in structure and hasattr(model, "num_features"):
        setattr(model, "num_features", int(structure["num_features"]))  # noqa: B010
    chs = structure.get("feature_chs")
    infos: list[FeatureInfo] = getattr(model, "feature_info", [])
    if chs and len(chs) == len(infos):
        setattr(model, "feature_info", [dataclasses.replace(info, num_chs=int(c))  # noqa: B010
                                        for info, c in zip(infos, chs, strict=True)])


def refresh_interface(model: ZooModel, size: int) -> None:
    """Set `num_features` and the `feature_info` channel counts from what the model computes on
    a `size` x `size` input (after its channels were changed in place)."""
    from .features import FeatureExtractor

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
            model.num_features = int(model.forward_features(x).shape[1])
            maps = FeatureExtractor(model)(x)
        model.feature_info = [dataclasses.replace(info, num_chs=int(m.shape[1]))
                              for info, m in zip(model.feature_info, maps, strict=True)]
    finally:
        model.train(was_training)
