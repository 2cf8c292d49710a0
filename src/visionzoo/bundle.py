"""The model bundle: a self-describing directory that every task accepts.

    runs/digits/bundle/
        model.safetensors   the whole network's weights, classifier included
        bundle.json         architecture, builder arguments, class names, the evaluation
                            preprocessing used in training, the training configuration,
                            metrics, per-epoch history, visionzoo version, weights SHA-256,
                            and for a structurally pruned network its channel counts
                            (`structure`, see `models/structure.py`)
        exports/            graphs exported for the runtime backends (a cache, see deploy/)

This module is the format: find, read (`BundleInfo`), verify and write a bundle. Loading one
is the factory's (`create_model("runs/digits/bundle")` or the run folder above it rebuilds
the network with the bundle's classes and preprocessing on its card), so predict, embed and
evaluate take a bundle wherever they take a model name. A bundle is written to a temporary
folder and renamed into place: a crash leaves the previous bundle or none, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from .data.preprocess import Preprocess
from .errors import CheckpointError, InputError
from .fileutil import apply_umask, sha256_file
from .models.base import VisionModel
from .version import __version__
from .weights.io import save_state_dict

BUNDLE_JSON = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "visionzoo.bundle"
FORMAT_VERSION = 2  # 2: `structure` (pruned channel counts); bundles without one are still written as 1
RUN_SUBDIR = "bundle"  # where `finetune` puts the bundle inside its output folder


@dataclass(frozen=True)
class BundleInfo:
    """What `bundle.json` says (everything except the weights)."""

    path: Path  # the bundle folder
    architecture: str  # registry name, e.g. "efficientnet_lite0"
    classes: tuple[str, ...]  # classes[i] is the name of output i
    preprocess: Preprocess  # evaluation preprocessing (the one used for validation in training)
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)  # architecture arguments
    base_weights: str | None = None  # what training started from ("arch.TAG" or a file)
    training: Mapping[str, Any] = field(default_factory=dict)  # the training configuration
    metrics: Mapping[str, Any] = field(default_factory=dict)  # final validation metrics
    history: tuple[Mapping[str, Any], ...] = ()  # one record per epoch
    visionzoo_version: str = ""
    created: str = ""
    weights_sha256: str | None = None
    structure: Mapping[str, Any] = field(default_factory=dict)  # channel counts that differ from the registry's

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE


def find_bundle(path: str | os.PathLike) -> Path | None:
    """The bundle folder at `path`: the folder itself or its `bundle/` (a finetune run folder)."""
    try:
        p = Path(path).expanduser()
        for candidate in (p, p / RUN_SUBDIR):
            if (candidate / BUNDLE_JSON).is_file():
                return candidate
    except (OSError, ValueError):  # a name that is not a usable path
        return None
    return None


def is_bundle(path: str | os.PathLike) -> bool:
    return find_bundle(path) is not None


def save_bundle(model: torch.nn.Module, out: str | os.PathLike, *, classes: Sequence[str],
                preprocess: Preprocess, architecture: str | None = None,
                builder_kwargs: Mapping[str, Any] | None = None, base_weights: str | None = None,
                training: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
                history: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write `model` as a bundle folder at `out` (replacing a bundle already there) and return it.

    `architecture` defaults to the model card's; `builder_kwargs` to the card's (the arguments its
    weights imply and those it was built with). The folder is assembled under a temporary name and renamed.
    """
    # any torch module may be saved when its architecture is named; a zoo model describes itself
    card = model.card if isinstance(model, VisionModel) else None
    arch = architecture or (card.architecture if card is not None else None)
    if not arch:
        raise InputError("save_bundle needs the architecture name: pass architecture= or a model "
                         "built with visionzoo.create_model")
    classes = [str(c) for c in classes]
    num_classes = model.num_classes if isinstance(model, VisionModel) else None
    if num_classes is not None and num_classes != len(classes):
        raise InputError(f"the model has {num_classes} outputs but {len(classes)} class names were given; "
                         f"pass one name per output")
    if builder_kwargs is None:
        builder_kwargs = dict(card.builder_kwargs) if card is not None else {}
    structure = _structure(model, arch, builder_kwargs, len(classes))
    final = Path(out).expanduser()
    if final.exists() and not (final / BUNDLE_JSON).is_file():
        if not final.is_dir() or any(final.iterdir()):
            raise InputError(f"{final} exists and is not a bundle; choose another output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    try:
        apply_umask(tmp)  # mkdtemp makes it private (0700); a bundle folder is like any other folder
        weights = save_state_dict(model.state_dict(), tmp / WEIGHTS_FILE,
                                  metadata={"format": "pt", "architecture": arch})
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION if structure else 1, "visionzoo_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "architecture": arch, "builder_kwargs": _jsonable(dict(builder_kwargs)),
            "num_classes": len(classes), "classes": classes, "preprocess": preprocess.to_dict(),
            "base_weights": base_weights, "weights_file": WEIGHTS_FILE, "weights_sha256": sha256_file(weights),
            "training": _jsonable(dict(training or {})), "metrics": _jsonable(dict(metrics or {})),
            "history": _jsonable([dict(h) for h in history]),
        }
        if structure:
            meta["structure"] = structure
        (tmp / BUNDLE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _structure(model: torch.nn.Module, arch: str, builder_kwargs: Mapping[str, Any], num_classes: int) -> dict:
    """The channel counts in which `model` differs from the registry's `arch` (a pruned model), or {}."""
    from .models.structure import structure_changes
    from .registry import REGISTRY

    try:
        architecture = REGISTRY.get_architecture(arch)
    except LookupError:
        return {}
    if architecture.composed:  # a head on a backbone: pruning (the only source of structure) is for classifiers
        return {}
    # built on the meta device: shapes and attributes only, no memory, no initialisation
    with torch.device("meta"):
        reference = architecture.build(num_classes=num_classes, **dict(builder_kwargs))
    return structure_changes(model, reference)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and deleted after.

    Directories cannot be replaced atomically, so there is a moment with no bundle at
    `final` (the old one then sits next to it as `.NAME.old-*`), never a partial one.
    """
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "b")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def read_bundle(path: str | os.PathLike) -> BundleInfo:
    """Read `bundle.json` (not the weights) of the bundle at `path` (or of a run folder).

    Every field is checked against the format (`_SCHEMA`): a file that breaks it is one
    `CheckpointError` naming the field, never a traceback or a model built from nonsense.
    """
    folder = find_bundle(path)
    if folder is None:
        raise InputError(f"{path} is not a bundle (no {BUNDLE_JSON}); give a folder written by "
                         f"`visionzoo finetune` or save_bundle")
    source = folder / BUNDLE_JSON
    try:
        if source.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{source} is {source.stat().st_size:,} bytes, more than a bundle description "
                                  f"can be ({MAX_JSON_BYTES:,}); write the bundle again")
        meta = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{source} cannot be read ({str(e).splitlines()[0][:200]}); write the bundle "
                              f"again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a visionzoo bundle description")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{source}: field 'format_version' must be an integer, got {_shown(version)}; write "
                              f"the bundle again")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer visionzoo (bundle format {version}); upgrade "
                              f"visionzoo to read it")
    for name, (check, required) in _SCHEMA.items():
        if name not in meta:
            if required:
                raise CheckpointError(f"{source} lacks the field '{name}'; write the bundle again")
            continue
        problem = check(meta[name])
        if problem:
            raise CheckpointError(f"{source}: field '{name}' {problem}, got {_shown(meta[name])}; write the bundle "
                                  f"again")
    if "num_classes" in meta and meta["num_classes"] != len(meta["classes"]):
        raise CheckpointError(f"{source}: field 'num_classes' is {meta['num_classes']} but 'classes' names "
                              f"{len(meta['classes'])}; write the bundle again")
    try:
        preprocess = Preprocess.from_dict(meta["preprocess"])
    except InputError as e:
        raise CheckpointError(f"{source}: field 'preprocess': {e}; write the bundle again") from None
    return BundleInfo(
        path=folder, architecture=meta["architecture"], classes=tuple(meta["classes"]), preprocess=preprocess,
        builder_kwargs=meta.get("builder_kwargs") or {}, base_weights=meta.get("base_weights"),
        training=meta.get("training") or {}, metrics=meta.get("metrics") or {},
        history=tuple(meta.get("history") or ()), visionzoo_version=meta.get("visionzoo_version", ""),
        created=meta.get("created", ""), weights_sha256=meta.get("weights_sha256"),
        structure=meta.get("structure") or {})


# -- the schema of bundle.json: field -> (check returning what is wrong or None, required) ---------------

MAX_JSON_BYTES = 64 << 20  # a description with a million class names fits in a few MB
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 1 << 20  # channel counts of a (pruned) layer
MAX_BUILDER_INT = 4096  # integer builder arguments: image sizes, input channels


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _is_int(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _name(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"


def _optional_text(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) else "must be a string or null"


def _object(v: Any) -> str | None:
    return None if isinstance(v, dict) else "must be an object"


def _classes(v: Any) -> str | None:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_CLASSES or not all(isinstance(c, str) for c in v):
        return f"must be a list of 1 to {MAX_CLASSES:,} class names (strings)"
    return None


def _count(v: Any) -> str | None:
    return None if _is_int(v, 1, MAX_CLASSES) else f"must be an integer from 1 to {MAX_CLASSES:,}"


def _history(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(h, dict) for h in v) else "must be a list of objects"


def _sha256(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
        return None
    return "must be 64 lowercase hexadecimal digits or null"


def _weights_file(v: Any) -> str | None:
    return None if v == WEIGHTS_FILE else f"must be {WEIGHTS_FILE!r}"


def _builder_kwargs(v: Any) -> str | None:
    """Plain values only; whether the architecture takes them is checked when it is built."""
    if not isinstance(v, dict):
        return "must be an object of argument names and values"
    for key, value in v.items():
        ok = (isinstance(value, (bool, str)) or value is None or _is_int(value, 0, MAX_BUILDER_INT)
              or (isinstance(value, float) and math.isfinite(value)))
        if not ok:
            return (f"must hold booleans, strings, finite numbers or integers from 0 to {MAX_BUILDER_INT} "
                    f"(argument {key!r})")
    return None


def _structure_field(v: Any) -> str | None:
    from .models.structure import CHANNEL_ATTRS

    if not isinstance(v, dict):
        return "must be an object"
    modules = v.get("modules", {})
    if not isinstance(modules, dict):
        return "must hold 'modules' as an object of layer names"
    for layer, attrs in modules.items():
        if not isinstance(attrs, dict):
            return f"must give the layer {layer!r} an object of channel counts"
        for attr, value in attrs.items():
            values = value if isinstance(value, list) else [value]
            if attr not in CHANNEL_ATTRS or not values or not all(_is_int(x, 1, MAX_CHANNELS) for x in values):
                return (f"must give layer {layer!r} channel attributes ({', '.join(CHANNEL_ATTRS)}) of integers "
                        f"from 1 to {MAX_CHANNELS:,}; {attr!r} is not")
    if "num_features" in v and not _is_int(v["num_features"], 1, MAX_CHANNELS):
        return f"must hold 'num_features' as an integer from 1 to {MAX_CHANNELS:,}"
    chs = v.get("feature_chs", [])
    if not isinstance(chs, list) or not all(_is_int(c, 1, MAX_CHANNELS) for c in chs):
        return f"must hold 'feature_chs' as a list of integers from 1 to {MAX_CHANNELS:,}"
    return None


_SCHEMA: dict[str, tuple[Callable[[Any], str | None], bool]] = {
    "architecture": (_name, True),
    "classes": (_classes, True),
    "preprocess": (_object, True),
    "num_classes": (_count, False),
    "builder_kwargs": (_builder_kwargs, False),
    "base_weights": (_optional_text, False),
    "weights_file": (_weights_file, False),
    "weights_sha256": (_sha256, False),
    "training": (_object, False),
    "metrics": (_object, False),
    "history": (_history, False),
    "visionzoo_version": (_text, False),
    "created": (_text, False),
    "structure": (_structure_field, False),
}


def verify_bundle_weights(info: BundleInfo) -> None:
    """Check that the bundle's weights file is there and matches the SHA-256 its `bundle.json` records."""
    if not info.weights_path.is_file():
        raise CheckpointError(f"bundle {info.path} has no {WEIGHTS_FILE}; write the bundle again")
    if info.weights_sha256 and sha256_file(info.weights_path) != info.weights_sha256:
        raise CheckpointError(f"{info.weights_path} does not match the SHA-256 in {BUNDLE_JSON} (changed or "
                              f"corrupted); write the bundle again with visionzoo.save_bundle")


def _jsonable(value: Any) -> Any:
    """Plain JSON types: enums by value, paths and tuples converted, floats kept."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    with contextlib.suppress(TypeError, ValueError):
        return float(value)
    return str(value)
