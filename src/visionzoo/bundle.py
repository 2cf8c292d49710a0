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
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from .data.preprocess import Preprocess
from .errors import CheckpointError, InputError
from .fileutil import sha256_file
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
    """Read `bundle.json` (not the weights) of the bundle at `path` (or of a run folder)."""
    folder = find_bundle(path)
    if folder is None:
        raise InputError(f"{path} is not a bundle (no {BUNDLE_JSON}); give a folder written by "
                         f"`visionzoo finetune` or save_bundle")
    try:
        meta = json.loads((folder / BUNDLE_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / BUNDLE_JSON} cannot be read ({e}); write the bundle again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / BUNDLE_JSON} is not a visionzoo bundle description")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer visionzoo (bundle format "
                              f"{meta['format_version']}); upgrade visionzoo to read it")
    try:
        return BundleInfo(
            path=folder, architecture=meta["architecture"], classes=tuple(meta["classes"]),
            preprocess=Preprocess.from_dict(meta["preprocess"]), builder_kwargs=meta.get("builder_kwargs") or {},
            base_weights=meta.get("base_weights"), training=meta.get("training") or {},
            metrics=meta.get("metrics") or {}, history=tuple(meta.get("history") or ()),
            visionzoo_version=meta.get("visionzoo_version", ""), created=meta.get("created", ""),
            weights_sha256=meta.get("weights_sha256"), structure=meta.get("structure") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / BUNDLE_JSON} lacks or garbles a field ({e}); write the bundle again") \
            from None


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
