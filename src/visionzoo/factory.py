"""From a name, a file, a bundle or a model to a ready model: `create_model`, `load_bundle`, `resolve_model`.

The path: registry entry -> weights record or local file -> safe load (memory-mapped) ->
build without random init (`weights/lean.py`) -> rename and adapt the checkpoint with a
report (`weights/adapt.py`: prefixes, foreign layouts, `model.adapt_state_dict`, input
channels) -> load (strict unless `strict=False`) -> new head if `num_classes` differs ->
the model's card (task, weights, classes, preprocessing) and `load_report` -> eval mode.
A bundle folder (`bundle.py` reads its description) goes the same way with its own weights,
classes and preprocessing.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .bundle import BundleInfo, find_bundle, read_bundle, verify_bundle_weights
from .card import ModelCard
from .data.preprocess import Preprocess
from .enums import Task
from .errors import CheckpointError, InputError, VisionZooError
from .models.base import VisionModel, ZooModel
from .registry import REGISTRY, Architecture, split_name
from .weights import hub
from .weights.adapt import LoadReport, plan_load, realize
from .weights.io import Checkpoint, load_state_dict, read_checkpoint
from .weights.records import Weights

if TYPE_CHECKING:
    from .models.features import FeatureExtractor

log = logging.getLogger("visionzoo")
WeightsArg = str | os.PathLike | Weights | bool | None
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def create_model(name: str | os.PathLike, weights: WeightsArg = None, num_classes: int | None = None, *,
                 pretrained: bool = False, progress: bool = True, strict: bool = True, features_only: bool = False,
                 out_indices: Sequence[int | str] | None = None, **kwargs: Any) -> VisionModel | FeatureExtractor:
    """Build an architecture, optionally with weights.

    Args:
        name: `"arch"` or `"arch.TAG"` (the tag selects weights), or a bundle folder.
        weights: None (random init), `"DEFAULT"`, a tag, a `Weights` record, the path of a
            local checkpoint (PyTorch or safetensors), or a bundle folder.
        num_classes: size of the class output. With weights for another number of
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

    Returns the model in eval mode with its `card` (task, architecture, weights record,
    class names, preprocessing; also readable as `.pretrained_weights`, `.preprocess`,
    `.categories`) and `load_report` (what loading renamed, adapted and left out; None
    without weights); with `features_only`, a `FeatureExtractor` wrapping it.
    """
    if out_indices is not None and not features_only:
        raise InputError("out_indices selects feature maps; pass features_only=True with it")
    _check_num_classes(num_classes)
    _check_in_chans(kwargs.get("in_chans"))
    bundle, expect_arch = _bundle_arg(name, weights)
    if bundle is not None:
        model = load_bundle(bundle, num_classes, expect_arch=expect_arch, **kwargs)
    else:
        arch, weights = _architecture_and_weights(os.fspath(name), weights, pretrained)
        model = _build(arch, weights, num_classes, progress=progress, strict=strict, kwargs=kwargs)
    if features_only:
        from .models.features import FeatureExtractor

        return FeatureExtractor(model, out_indices).eval()
    return model.eval()


def resolve_model(model: str | os.PathLike | VisionModel) -> VisionModel:
    """A ready model from what a workflow is given: a model (returned as is), a name (`arch` with its
    default weights, `arch.TAG` with those), or a bundle folder."""
    if isinstance(model, VisionModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if find_bundle(text) is not None:
            return load_bundle(text)
        _, tag = split_name(text)
        # without features_only, create_model returns the model itself
        return cast(VisionModel, create_model(text, weights=None if tag else "DEFAULT"))
    raise InputError(f"model must be a name, a bundle folder or a visionzoo model, got {type(model).__name__}")


def load_bundle(path: str | os.PathLike, num_classes: int | None = None, *, expect_arch: str | None = None,
                verify: bool = True, **kwargs: Any) -> VisionModel:
    """Rebuild the model of the bundle at `path` (or of a finetune run folder), in eval mode, with the
    bundle's classes, preprocessing and description on its card.

    Args:
        num_classes: a different head size (a new, untrained classifier; class names dropped).
        expect_arch: refuse a bundle of another architecture (`create_model(name, weights=bundle)`).
        verify: check the weights file against the SHA-256 recorded in `bundle.json`.
        **kwargs: further architecture arguments.
    """
    info = read_bundle(path)
    if expect_arch is not None and expect_arch != info.architecture:
        raise InputError(f"bundle {info.path} holds a {info.architecture}, not a {expect_arch}; "
                         f"pass the bundle as the model name instead")
    if verify:
        verify_bundle_weights(info)
    arch = REGISTRY.get_architecture(info.architecture)
    _check_builder_kwargs(arch, info.builder_kwargs, info.path)
    build_kwargs = {**info.builder_kwargs, **kwargs}
    try:
        _check_in_chans(build_kwargs.get("in_chans"))
        if info.structure:
            model = _load_restructured(info, build_kwargs)
        else:
            # a detector's class layers have (anchors x classes) outputs: its head size is the bundle's, not
            # one read from the checkpoint
            sized = info.num_classes if arch.task is Task.DETECTION and num_classes is None else None
            model = _build(arch, info.weights_path, sized, kwargs=build_kwargs)
    except (TypeError, ValueError, AttributeError, RuntimeError, ArithmeticError, LookupError) as e:
        # a bundle is data: whatever it makes the builder trip over is the bundle's fault, in one line
        if isinstance(e, InputError):
            raise CheckpointError(f"bundle {info.path}: {e}; write the bundle again") from None
        if isinstance(e, VisionZooError):
            raise
        raise CheckpointError(f"bundle {info.path}: its architecture cannot be built from bundle.json "
                              f"({_one_line(e)}); write the bundle again") from None
    if model.num_classes != info.num_classes:
        raise CheckpointError(f"bundle {info.path}: the weights have {model.num_classes} outputs but "
                              f"bundle.json names {info.num_classes} classes; write the bundle again")
    smallest = max(arch.default_weights.min_size) if arch.default_weights is not None else 1
    size = (model.image_size if isinstance(model, ZooModel) else None) or info.preprocess.crop_size
    if size is None and isinstance(model, ZooModel):
        raise CheckpointError(f"bundle {info.path}: its preprocessing has no crop_size, but {arch.name} takes "
                              f"images of one size; write the bundle again")
    if size is not None and size < smallest:
        raise CheckpointError(f"bundle {info.path}: its crop of {info.preprocess.crop_size} pixels is smaller than "
                              f"{arch.name} takes ({smallest}); write the bundle again")
    if info.structure:
        _check_runs(model, info)
    model.card = ModelCard(task=model.task, architecture=info.architecture, preprocess=info.preprocess,
                           classes=info.classes, source=str(info.path), bundle=info,
                           builder_kwargs=_recordable(build_kwargs))
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


# -- the steps -------------------------------------------------------------------------------

def _check_num_classes(num_classes: object) -> None:
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 0):
        raise InputError(f"num_classes must be an integer >= 0, got {num_classes!r}")


def _check_in_chans(in_chans: object) -> None:
    if in_chans is not None and (isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1):
        raise InputError(f"in_chans must be an integer >= 1, got {in_chans!r}")


def _architecture_and_weights(name: str, weights: WeightsArg, pretrained: bool) -> tuple[Architecture, WeightsArg]:
    """The registry entry `name` names, and the weights argument with a name's tag and
    `pretrained` folded in."""
    arch_name, tag = split_name(name)
    arch = REGISTRY.get_architecture(arch_name)
    if tag is not None:
        if weights not in (None, True, "DEFAULT"):
            raise InputError(f"{name!r} already names weights; do not also pass weights={weights!r}")
        return arch, tag
    if weights is True or (pretrained and weights is None):
        return arch, "DEFAULT"
    return arch, None if weights is False else weights


def _build(arch: Architecture, weights: WeightsArg, num_classes: int | None, *, progress: bool = True,
           strict: bool = True, kwargs: Mapping[str, Any]) -> VisionModel:
    """The architecture with `weights` loaded (or randomly initialised), its card and load report set,
    and a new head when `num_classes` differs from the weights'."""
    record, ckpt, source = _resolve_weights(arch, weights, progress)
    build_kwargs = {**(record.builder_kwargs if record else {}), **kwargs}
    preprocess = record.preprocess if record else arch.default_preprocess
    build, recorded = arch.build, build_kwargs
    if arch.composed:
        build, build_kwargs, recorded, preprocess = _composition(arch, build_kwargs, with_checkpoint=ckpt is not None)
    classes = record.categories if record else None
    report = None
    if ckpt is None:
        head = _head_kwargs(record.num_classes if record and record.num_classes else num_classes)
        model = build(**head, **build_kwargs)
    else:
        model, report = _load_checkpoint(arch, build, record, ckpt, source, build_kwargs, num_classes, strict)
        default = arch.default_weights
        if record is None and default is not None and model.num_classes == default.num_classes:
            classes = default.categories  # a local file with the published head size: assume its classes
    model.card = ModelCard(task=arch.task, architecture=arch.name, preprocess=_fit_preprocess(arch.name, model,
                           preprocess), classes=classes, weights=record, source=source,
                           builder_kwargs=_recordable(recorded))
    model.load_report = report
    if num_classes is not None and num_classes != model.num_classes:
        _new_head(model, num_classes, report)
    if report is not None:
        report.log()
    return model


def _head_kwargs(num_classes: int | None) -> dict[str, int]:
    """Without weights: the requested head size, else the family's own default."""
    return {} if num_classes is None else {"num_classes": num_classes}


def _load_checkpoint(arch: Architecture, build: Callable[..., VisionModel], record: Weights | None,
                     ckpt: Checkpoint, source: str | None, build_kwargs: Mapping[str, Any], num_classes: int | None,
                     strict: bool) -> tuple[VisionModel, LoadReport]:
    """Build the architecture for `ckpt` without a random init and load it (a published record's head
    size is the record's; a local file's own head size and input channels are the truth)."""
    report = LoadReport(source=source, format=ckpt.format,
                        remapped=[f"unwrapped the '{k}' entry" for k in ckpt.wrapper])
    head = _head_kwargs(record.num_classes if record and record.num_classes else num_classes)
    plan = plan_load(build, ckpt.state_dict, kwargs={**head, **build_kwargs},
                     layout=record.layout if record else None, size_from_checkpoint=record is None, report=report)
    return realize(plan, strict=strict, what=arch.name), report


def _composition(arch: Architecture, kwargs: dict[str, Any], *, with_checkpoint: bool
                 ) -> tuple[Callable[..., VisionModel], dict[str, Any], dict[str, Any], Preprocess]:
    """For a head on any backbone (`create_model("lraspp", backbone="efficientnet_lite0",
    pretrained_backbone=True)`): the builder that puts the head on the named classifier, its other
    arguments, the arguments that rebuild it (the backbone by name), and the head's preprocessing with the
    backbone weights' normalisation. A checkpoint of the whole network makes the backbone's own
    pre-trained weights moot: the backbone is then built without them."""
    kwargs = dict(kwargs)
    backbone = kwargs.pop("backbone", None)
    pretrained = bool(kwargs.pop("pretrained_backbone", False))
    if backbone is None:
        raise InputError(f"{arch.name} is a {arch.task.value} head for any classifier of the zoo: name one, e.g. "
                         f"backbone='efficientnet_lite0' (with pretrained_backbone=True for its weights)")
    if isinstance(backbone, ZooModel):  # a classifier the caller built: used as is (taken over)
        given = backbone
        name = given.require_card().architecture
        pp = given.require_card().preprocess
        return (lambda **kw: arch.build(backbone=given, **kw)), kwargs, {"backbone": name, **kwargs}, \
            _head_preprocess(arch, pp)
    if not isinstance(backbone, str):
        raise InputError(f"backbone must be a classifier's name or a visionzoo classifier, got "
                         f"{type(backbone).__name__}")
    backbone_arch = REGISTRY.get_architecture(backbone)
    if backbone_arch.task is not Task.CLASSIFICATION or backbone_arch.composed:
        raise InputError(f"backbone {backbone!r} is a {backbone_arch.task.value} model; give an image classifier "
                         f"of the zoo (`visionzoo models --task classification`)")
    weights = "DEFAULT" if pretrained and not with_checkpoint else None
    if weights is not None and not backbone_arch.weights:
        raise InputError(f"{backbone} has no published weights for pretrained_backbone=True")
    record = REGISTRY.get_weights(backbone) if backbone_arch.weights else None
    pp = record.preprocess if record else backbone_arch.default_preprocess

    def build(**kw: Any) -> VisionModel:
        net = create_model(backbone, weights=weights)
        if not isinstance(net, ZooModel):
            raise InputError(f"backbone {backbone!r} is not a classifier")
        return arch.build(backbone=net, **kw)

    return build, kwargs, {"backbone": backbone, **kwargs}, _head_preprocess(arch, pp)


def _head_preprocess(arch: Architecture, backbone: Preprocess) -> Preprocess:
    """A composed head's recipe with its backbone weights' normalisation (and interpolation); a detector's
    recipe is kept as it is (it only scales to [0, 1]: the detector normalises with the backbone's values)."""
    if arch.default_preprocess.kind == "ObjectDetection":
        return arch.default_preprocess
    return dataclasses.replace(arch.default_preprocess, mean=backbone.mean, std=backbone.std,
                               interpolation=backbone.interpolation)


def _recordable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The builder arguments a bundle can record: those with JSON values (not modules or callables)."""
    def plain(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, Mapping):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return v is None or isinstance(v, (str, int, float, bool))
    return {k: v for k, v in kwargs.items() if plain(v)}


def _new_head(model: VisionModel, num_classes: int, report: LoadReport | None) -> None:
    old = model.num_classes
    model.reset_classifier(num_classes)
    if report is not None:
        layers = model.class_layers
        report.adapted.append(f"replaced the {old}-class classifier ({', '.join(layers)}) with a new "
                              f"{num_classes}-class one")
        report.new = [f"{layer}.{n}" for layer in layers for n, _ in model.get_submodule(layer).named_parameters()]


def _fit_preprocess(arch: str, model: VisionModel, preprocess: Preprocess) -> Preprocess:
    """The recipe scaled to a model built for one fixed input size other than its crop
    (a ViT at another `image_size`), so that predict feeds it what it accepts."""
    size = model.image_size if isinstance(model, ZooModel) else None
    if size is None or preprocess.crop_size is None or size == preprocess.crop_size:
        return preprocess
    fitted = dataclasses.replace(preprocess, crop_size=size,
                                 resize_size=round((preprocess.resize_size or size) * size / preprocess.crop_size))
    log.info("%s: preprocessing scaled to the model's image size: %s", arch, fitted.describe())
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


def _bundle_arg(name: str | os.PathLike, weights: WeightsArg) -> tuple[str | os.PathLike | None, str | None]:
    """(bundle folder, architecture it must hold) for `create_model(bundle)` or
    `create_model(arch, weights=bundle)`; (None, None) when no bundle is named."""
    if isinstance(name, (str, os.PathLike)) and weights in (None, True, "DEFAULT") and find_bundle(name):
        return name, None
    if isinstance(weights, (str, os.PathLike)) and weights != "DEFAULT" and find_bundle(weights):
        return weights, split_name(os.fspath(name))[0]
    return None, None


def _check_builder_kwargs(arch: Architecture, kwargs: Mapping[str, Any], source: Path) -> None:
    """Refuse `builder_kwargs` (from a bundle) that the architecture's builder does not take, or whose
    type differs from the default's, with one line naming the argument. A head on any classifier
    (`arch.composed`) is built by its `compose` function; its `backbone` (the classifier's name) is
    checked where the head is put on it (`_composition`)."""
    if arch.compose is not None:
        params = inspect.signature(arch.compose).parameters
        kwargs = {k: v for k, v in kwargs.items() if k != "backbone"}
    else:
        params = inspect.signature(arch.model_class).parameters  # the constructor's, without self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY or
             (p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty)]
    for key, value in kwargs.items():
        if key not in names or key == "num_classes":
            raise CheckpointError(f"{source}: builder_kwargs names {key!r}, which {arch.name} does not take "
                                  f"(it takes {', '.join(n for n in names if n != 'num_classes')}); write the "
                                  f"bundle again")
        default = params[key].default
        expected = (bool if isinstance(default, bool) else int if isinstance(default, int)
                    else (int, float) if isinstance(default, float) else str if isinstance(default, str) else None)
        if expected is not None and (not isinstance(value, expected) or (expected is not bool
                                                                         and isinstance(value, bool))):
            raise CheckpointError(f"{source}: builder_kwargs {key!r} must be like its default {default!r}, got "
                                  f"{value!r}; write the bundle again")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or Path(value).suffix in CHECKPOINT_SUFFIXES or Path(value).exists()


def _load_restructured(info: BundleInfo, kwargs: Mapping[str, Any]) -> VisionModel:
    """A pruned bundle: the registry architecture given the recorded channel counts, then its weights
    loaded strictly (all from data: JSON and safetensors, nothing unpickled)."""
    from .models.structure import apply_structure

    state_dict = load_state_dict(info.weights_path)
    model = _build(REGISTRY.get_architecture(info.architecture), None, info.num_classes,
                   kwargs={**info.builder_kwargs, **kwargs})
    apply_structure(model, info.structure, state_dict)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shapes that do not match even after the structure was applied
        raise CheckpointError(f"bundle {info.path}: the weights do not fit the recorded structure "
                              f"({str(e).splitlines()[-1].strip()}); write the bundle again") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"bundle {info.path}: the weights do not fit the recorded structure (missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); write the "
                              f"bundle again")
    return model


def _check_runs(model: VisionModel, info: BundleInfo) -> None:
    """One forward pass of a pruned network on an input of the bundle's size: recorded channel counts
    can fit the weights and still contradict each other (groups, a layer's input); such a bundle is
    refused now, in one line, rather than in the middle of a run."""
    import torch

    if not isinstance(model, ZooModel):  # bundles hold classifiers; nothing else records a structure
        return
    size = model.image_size or info.preprocess.crop
    try:
        channels = cast(int, model.get_submodule(model.first_conv).in_channels)  # what the network says it takes
        with torch.inference_mode():
            model.eval()(torch.zeros(1, channels, size, size))
    except (RuntimeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"bundle {info.path}: its network does not run on {size}x{size} inputs "
                              f"({_one_line(e)}); write the bundle again") from None


__all__ = ["create_model", "load_bundle", "resolve_model"]
