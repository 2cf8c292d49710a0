"""`create_model`: from a name (and weights) to a ready model.

The path: registry entry -> weights record or local file -> safe load (memory-mapped) ->
build without random init (`weights/lean.py`) -> rename and adapt the checkpoint with a
report (`weights/adapt.py`: prefixes, foreign layouts, `model.adapt_state_dict`, input
channels) -> load (strict unless `strict=False`) -> new head if `num_classes` differs ->
metadata (weights, preprocessing, categories, `load_report`) attached -> eval mode.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .models._base import ZooModel
from .registry import REGISTRY, Architecture, split_name
from .weights import hub
from .weights.adapt import LoadReport, plan_load, realize
from .weights.io import Checkpoint, read_checkpoint
from .weights.records import Preprocess, Weights

if TYPE_CHECKING:
    from .models.features import FeatureExtractor

log = logging.getLogger("visionzoo")
WeightsArg = str | os.PathLike | Weights | bool | None


def create_model(name: str, weights: WeightsArg = None, num_classes: int | None = None, *,
                 pretrained: bool = False, progress: bool = True, strict: bool = True, features_only: bool = False,
                 out_indices: Sequence[int | str] | None = None, **kwargs: Any) -> ZooModel | FeatureExtractor:
    """Build an architecture, optionally with weights.

    Args:
        name: `"arch"` or `"arch.TAG"` (the tag selects weights).
        weights: None (random init), `"DEFAULT"`, a tag, a `Weights` record, or the
            path of a local checkpoint (PyTorch or safetensors).
        num_classes: size of the classifier. With weights for another number of
            classes, the head is replaced by a new, correctly sized one.
        pretrained: shorthand for `weights="DEFAULT"`.
        progress: show a progress bar when downloading.
        strict: with False, load what fits and list the rest in `model.load_report`
            (logged) instead of raising `CheckpointError`.
        features_only: return a `FeatureExtractor` whose forward gives the list of stage
            feature maps (NCHW) instead of logits.
        out_indices: with `features_only`, which stages (positions in `feature_info`,
            negative from the deepest, or module names); default all.
        **kwargs: architecture arguments (`in_chans`, `dropout`, ...). With weights for
            3 input channels, `in_chans=1` sums the first convolution's filters and other
            values repeat them (rescaled).

    Returns the model in eval mode with `.pretrained_weights`, `.preprocess`,
    `.categories` and `.load_report` (what loading renamed, adapted and left out; None
    without weights) set; with `features_only`, a `FeatureExtractor` wrapping it.

    `name` (or `weights`) may also be a bundle folder written by `visionzoo finetune`
    or `save_bundle`: the model comes back with the bundle's classes and preprocessing.
    """
    if out_indices is not None and not features_only:
        raise InputError("out_indices selects feature maps; pass features_only=True with it")
    bundle, expect_arch = _bundle_arg(name, weights)
    if bundle is not None:
        from .bundle import load_bundle

        model = load_bundle(bundle, num_classes, expect_arch=expect_arch, **kwargs)
        if features_only:
            from .models.features import FeatureExtractor

            return FeatureExtractor(model, out_indices).eval()
        return model
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

    record, ckpt, source = _resolve_weights(arch, weights, progress)
    build_kwargs = dict(record.builder_kwargs) if record else {}
    build_kwargs.update(kwargs)
    if record is not None:
        head_classes = record.num_classes
    else:
        head_classes = 1000 if num_classes is None else num_classes

    categories = record.categories if record else None
    report = None
    if ckpt is None:
        model = arch.build(num_classes=head_classes, **build_kwargs)
    else:
        report = LoadReport(source=source, format=ckpt.format,
                            remapped=[f"unwrapped the '{k}' entry" for k in ckpt.wrapper])
        # a local file's own head size and input channels are the truth
        plan = plan_load(arch.build, ckpt.state_dict, kwargs={"num_classes": head_classes, **build_kwargs},
                         layout=record.layout if record else None, size_from_checkpoint=record is None,
                         report=report)
        model = realize(plan, strict=strict, what=arch.name)
        if record is None:
            default = arch.default_weights
            if default is not None and model.num_classes == default.num_classes:
                categories = default.categories  # the published head size: assume its classes
    model.arch = arch.name
    if num_classes is not None and num_classes != model.num_classes:
        old = model.num_classes
        model.reset_classifier(num_classes)
        categories = None
        if report is not None:
            report.adapted.append(f"replaced the {old}-class classifier ({model.classifier_name}) with a new "
                                  f"{num_classes}-class one")
            report.new = [f"{model.classifier_name}.{n}" for n, _ in model.get_classifier().named_parameters()]

    model.pretrained_weights = record
    model.weights_source = source
    model.preprocess = _fit_preprocess(model, record.preprocess if record else arch.default_preprocess)
    model.categories = categories
    model.load_report = report
    if report is not None:
        report.log()
    if features_only:
        from .models.features import FeatureExtractor

        return FeatureExtractor(model, out_indices).eval()
    return model.eval()


def _fit_preprocess(model: ZooModel, preprocess: Preprocess) -> Preprocess:
    """The recipe scaled to a model built for one fixed input size other than its crop
    (a ViT at another `image_size`), so that predict feeds it what it accepts."""
    size = model.image_size
    if size is None or size == preprocess.crop_size:
        return preprocess
    fitted = dataclasses.replace(preprocess, crop_size=size,
                                 resize_size=round(preprocess.resize_size * size / preprocess.crop_size))
    log.info("%s: preprocessing scaled to the model's image size: %s", model.arch, fitted.describe())
    return fitted


def _resolve_weights(arch: Architecture, weights: WeightsArg, progress: bool
                     ) -> tuple[Weights | None, Checkpoint | None, str | None]:
    """(record, checkpoint, description of the source) for the `weights` argument."""
    if weights is None:
        return None, None, None
    if isinstance(weights, Weights):
        if weights.arch != arch.name:
            raise InputError(f"weights {weights.name} are for {weights.arch}, not {arch.name}")
        record = weights
    elif isinstance(weights, os.PathLike) or (isinstance(weights, str) and _looks_like_path(weights)):
        path = Path(weights).expanduser()
        return None, read_checkpoint(path), str(path)
    elif isinstance(weights, str):
        record = REGISTRY.get_weights(arch.name, weights)
    else:
        raise InputError(f"weights must be None, 'DEFAULT', a tag, a Weights record or a file path; "
                         f"got {type(weights).__name__}")
    path = hub.weights_file(record, progress=progress)
    return record, read_checkpoint(path), str(path)


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
