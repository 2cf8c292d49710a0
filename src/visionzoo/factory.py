"""`create_model`: from a name (and weights) to a ready model.

The path: registry entry -> weights record or local file -> safe load -> build ->
remap a foreign layout -> `model.adapt_state_dict` -> strict load -> new head if `num_classes` differs ->
metadata (weights, preprocessing, categories) attached -> eval mode.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, InputError
from .models._base import ZooModel
from .registry import REGISTRY, Architecture, split_name
from .weights import hub
from .weights.io import load_state_dict
from .weights.records import Weights
from .weights.remap import remap

log = logging.getLogger("visionzoo")
WeightsArg = str | os.PathLike | Weights | bool | None


def create_model(name: str, weights: WeightsArg = None, num_classes: int | None = None, *,
                 pretrained: bool = False, progress: bool = True, **kwargs: Any) -> ZooModel:
    """Build an architecture, optionally with weights.

    Args:
        name: `"arch"` or `"arch.TAG"` (the tag selects weights).
        weights: None (random init), `"DEFAULT"`, a tag, a `Weights` record, or the
            path of a local checkpoint (PyTorch or safetensors).
        num_classes: size of the classifier. With weights for another number of
            classes, the head is replaced by a new, correctly sized one.
        pretrained: shorthand for `weights="DEFAULT"`.
        progress: show a progress bar when downloading.
        **kwargs: architecture arguments (`in_chans`, `dropout`, ...).

    Returns the model in eval mode with `.pretrained_weights`, `.preprocess` and
    `.categories` set.

    `name` (or `weights`) may also be a bundle folder written by `visionzoo finetune`
    or `save_bundle`: the model comes back with the bundle's classes and preprocessing.
    """
    bundle, expect_arch = _bundle_arg(name, weights)
    if bundle is not None:
        from .bundle import load_bundle

        return load_bundle(bundle, num_classes, expect_arch=expect_arch, **kwargs)
    arch_name, tag = split_name(name)
    arch = REGISTRY.get_architecture(arch_name)
    if tag is not None:
        if weights not in (None, True, "DEFAULT"):
            raise InputError(f"{name!r} already names weights; do not also pass weights={weights!r}")
        weights = tag
    elif weights is True or (pretrained and weights is None):
        weights = "DEFAULT"
    elif weights is False:
        weights = None
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 0):
        raise InputError(f"num_classes must be an integer >= 0, got {num_classes!r}")

    record, state_dict, source = _resolve_weights(arch, weights, progress)
    build_kwargs = dict(record.builder_kwargs) if record else {}
    build_kwargs.update(kwargs)
    if record is not None:
        head_classes = record.num_classes
    else:
        head_classes = 1000 if num_classes is None else num_classes
    model = arch.build(num_classes=head_classes, **build_kwargs)
    model.arch = arch.name

    categories = record.categories if record else None
    if state_dict is not None:
        state_dict = remap(state_dict, list(model.state_dict()), record.layout if record else None)
        state_dict = model.adapt_state_dict(state_dict)
        if record is None:
            # a local file: size the head from its classifier, so it loads as saved
            ckpt_head = state_dict.get(f"{model.classifier_name}.weight")
            if ckpt_head is not None and ckpt_head.shape[0] != model.num_classes:
                model.reset_classifier(int(ckpt_head.shape[0]))
            default = arch.default_weights
            if default is not None and model.num_classes == default.num_classes:
                categories = default.categories  # the published head size: assume its classes
        load_checked(model, state_dict, source)
    if num_classes is not None and num_classes != model.num_classes:
        log.info("%s: replaced the %d-class classifier with a new %d-class one",
                 arch.name, model.num_classes, num_classes)
        model.reset_classifier(num_classes)
        categories = None

    model.pretrained_weights = record
    model.weights_source = source
    model.preprocess = record.preprocess if record else arch.default_preprocess
    model.categories = categories
    return model.eval()


def _resolve_weights(arch: Architecture, weights: WeightsArg, progress: bool
                     ) -> tuple[Weights | None, dict[str, torch.Tensor] | None, str | None]:
    """(record, state dict, description of the source) for the `weights` argument."""
    if weights is None:
        return None, None, None
    if isinstance(weights, Weights):
        if weights.arch != arch.name:
            raise InputError(f"weights {weights.name} are for {weights.arch}, not {arch.name}")
        record = weights
    elif isinstance(weights, os.PathLike) or (isinstance(weights, str) and _looks_like_path(weights)):
        path = Path(weights).expanduser()
        return None, load_state_dict(path), str(path)
    elif isinstance(weights, str):
        record = REGISTRY.get_weights(arch.name, weights)
    else:
        raise InputError(f"weights must be None, 'DEFAULT', a tag, a Weights record or a file path; "
                         f"got {type(weights).__name__}")
    path = hub.weights_file(record, progress=progress)
    return record, load_state_dict(path), str(path)


def _bundle_arg(name: object, weights: WeightsArg) -> tuple[str | os.PathLike | None, str | None]:
    """(bundle folder, architecture it must hold) for `create_model(bundle)` or
    `create_model(arch, weights=bundle)`; (None, None) when no bundle is named."""
    from .bundle import is_bundle

    if isinstance(name, (str, os.PathLike)) and weights in (None, True, "DEFAULT") and is_bundle(name):
        return name, None
    if isinstance(weights, (str, os.PathLike)) and weights != "DEFAULT" and is_bundle(weights):
        return weights, split_name(name)[0]
    return None, None


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or Path(value).suffix in (".pth", ".pt", ".bin", ".safetensors",
                                                                    ".ckpt") or Path(value).exists()


def load_checked(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | None) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        arch = getattr(model, "arch", type(model).__name__)
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
        raise CheckpointError(
            f"checkpoint {source or '<state dict>'} does not fit {arch}: {'; '.join(parts)}. "
            f"Check the model name (`visionzoo inspect` tells which architecture a file is for) "
            f"or pass num_classes for a different head")
    model.load_state_dict(state_dict, strict=True)
