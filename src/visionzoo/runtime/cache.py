"""The exported graphs the runtime backends use, exported once and kept next to the weights.

A model's ONNX export is cached under a key of everything that changes the graph: the
architecture, a digest of every weight and buffer (so a fine-tuned or edited model never
reuses another's graph), the input size, the exporter settings and the torch and
visionzoo versions. Bundles keep their exports in `<bundle>/exports/`; every other model
in `$TORCH_HOME/hub/checkpoints/visionzoo-exports/`, beside the published weights files.
Each file is written under a temporary name and renamed once verified (`export.py`), by one
process at a time: a concurrent process waits for it and uses its file, and a crash leaves no
partial graph (its temporary file is removed by the next export).
What `auto` measured for a model (`autotune.py`) is kept beside its export, under the same
stem; for an exported file, in the same folder under a digest of the file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..fileutil import exclusive, json_digest, sha256_file, weights_fingerprint
from ..models.base import VisionModel
from ..version import __version__
from .export import OPSET, ExportFormat, export_model
from .metadata import model_info

log = logging.getLogger("visionzoo")
CACHE_SUBDIR = "visionzoo-exports"
BUNDLE_SUBDIR = "exports"
_KEY_VERSION = 1


def export_dir(net: VisionModel) -> Path:
    """Where `net`'s exports are cached: its bundle's `exports/` when writable, else the hub cache."""
    bundle = net.card.bundle if net.card is not None else None
    if bundle is not None:
        folder = Path(bundle.path) / BUNDLE_SUBDIR
        if os.access(bundle.path, os.W_OK):
            return folder
    from ..weights.hub import cache_dir

    return cache_dir() / CACHE_SUBDIR


def export_key(net: VisionModel, input_size: int | None) -> str:
    key = {"version": _KEY_VERSION, "arch": net.arch, "class": type(net).__name__,
           "weights": weights_fingerprint(net), "input_size": input_size, "format": "onnx", "opset": OPSET,
           "torch": torch.__version__, "visionzoo": __version__,
           "preprocess": net.preprocess.to_dict() if net.preprocess else None,
           "classes": list(net.categories) if net.categories else None}
    return json_digest(key, 20)


def model_stem(net: VisionModel, input_size: int | None = None) -> str:
    """The name shared by a model's cached files: architecture, input size (`any` for a graph with a
    free height and width, as segmentation's) and `export_key`."""
    size = input_size or model_info(net).input_size
    return f"{net.arch}-{size or 'any'}-{export_key(net, size)}"


def measurement_path(net: VisionModel, kind: str, digest: str) -> Path:
    """Where `auto` keeps a measurement of `net` (`kind`: what was measured, `digest`: under what conditions)."""
    return export_dir(net) / f"{model_stem(net)}.{kind}-{digest}.json"


def measurements(net: VisionModel, kind: str) -> list[Path]:
    """Every cached measurement of `net` of one kind (under any conditions, from any machine)."""
    return sorted(export_dir(net).glob(f"{model_stem(net)}.{kind}-*.json"))


def file_measurement_path(path: Path, kind: str, digest: str) -> Path:
    """Where `auto` keeps a measurement of an exported file: the hub cache, under a digest of its bytes."""
    from ..weights.hub import cache_dir

    return cache_dir() / CACHE_SUBDIR / f"{path.stem}-{sha256_file(path)[:20]}.{kind}-{digest}.json"


def exported_onnx(net: VisionModel, input_size: int | None = None) -> Path:
    """The verified ONNX export of `net`, from the cache or exported (and cached) now."""
    size = input_size or model_info(net).input_size
    path = export_dir(net) / f"{model_stem(net, size)}.onnx"
    if path.is_file():
        log.info("%s: using the cached export %s", net.arch, path)
        return path
    with exclusive(path, wait=True):  # a concurrent process exporting the same graph: wait for its file
        if path.is_file():
            return path
        log.warning("%s: exporting to ONNX once (cached in %s)", net.arch, path.parent)
        export_model(net, ExportFormat.ONNX, path, input_size=size)
    return path
