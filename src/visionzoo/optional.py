"""Optional packages, imported on first use with an error that names the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# module -> (what it is for the user, the visionzoo extra that installs it)
_EXTRAS = {
    "onnx": ("ONNX export", "onnx"),
    "onnxruntime": ("the ONNX Runtime backend", "onnx"),
    "onnxruntime.quantization": ("int8 quantization (ONNX Runtime's quantizer)", "onnx"),
    "onnxscript": ("ONNX export with torch's dynamo exporter", "onnx"),
    "openvino": ("the OpenVINO backend", "openvino"),
    "torch_pruning": ("structured pruning (torch-pruning)", "prune"),
    "pyarrow": ("reading and writing .parquet files", "parquet"),
    "pyarrow.parquet": ("reading and writing .parquet files", "parquet"),
    "matplotlib": ("plots", "plots"),
    "av": ("decoding video files", "video"),
    "pycocotools": ("COCO mAP of detectors", "detection"),
    "pycocotools.coco": ("COCO mAP of detectors", "detection"),
    "pycocotools.cocoeval": ("COCO mAP of detectors", "detection"),
    "pycocotools.mask": ("instance masks in COCO's run-length encoding", "detection"),
    "ray": ("running on a Ray cluster (--engine ray)", "ray"),
    "ray.data": ("running on a Ray cluster (--engine ray)", "ray"),
    "starlette": ("the HTTP server", "serve"),
    "uvicorn": ("the HTTP server", "serve"),
    "prometheus_client": ("the server's metrics", "serve"),
    "python_multipart": ("the server's form uploads (python-multipart)", "serve"),
}


def require(module: str) -> ModuleType:
    """Import `module` or raise `MissingDependencyError` with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        what, extra = _EXTRAS.get(module, (module, None))
        fix = f"pip install \"visionzoo[{extra}]\"" if extra else f"pip install {module}"
        raise MissingDependencyError(f"{what} needs the {module.split('.')[0]} package, which is not installed; "
                                     f"run `{fix}`") from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
