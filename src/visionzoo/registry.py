"""The one registry of architectures and published weights.

An architecture is a row of a family's `VARIANTS` table (`visionzoo.models.<family>`), or
of its `COMPOSED` table: a head (segmentation, detection) that the factory puts on any
classifier of the zoo named by `backbone=`; weights are rows of `weights/data/catalog.json`.
Nothing is registered as an import side effect: the registry reads the family modules listed
in `FAMILIES` and the catalog the first time it is asked something.

Names are `arch` or `arch.TAG` (`resnet50`, `resnet50.IMAGENET1K_V1`); torchvision's
enum spelling (`ResNet50_Weights.IMAGENET1K_V1`) is accepted too.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .enums import Task, parse_enum
from .errors import UnknownModelError, UnknownWeightsError
from .weights.records import DEFAULT_PREPROCESS, Preprocess, Weights

if TYPE_CHECKING:
    from .models.base import VisionModel

# Model families built so far: modules of `visionzoo.models` with `VARIANTS` and `MODEL_CLASS` (and,
# for heads that go on any backbone, `COMPOSED` and `compose`).
FAMILIES = ("alexnet", "convnext", "densenet", "efficientnet", "googlenet", "inception", "maxvit", "mnasnet",
            "mobilenetv2", "mobilenetv3", "regnet", "resnet", "shufflenetv2", "squeezenet", "swin_transformer", "vgg",
            "vision_transformer", "segmentation", "raft", "video_resnet", "s3d", "mvit", "swin3d",
            "detection.retinanet", "detection.fcos", "detection.ssd", "detection.ssdlite", "detection.rcnn",
            "detection.composed")
CATALOG = Path(__file__).parent / "weights" / "data" / "catalog.json"
DEFAULT_MODEL = "efficientnet_lite0"  # the model every workflow uses unless told otherwise: offline, packaged


@dataclass(frozen=True)
class Architecture:
    """One buildable network: a family's model class plus one row of its variant table."""

    name: str
    family: str
    model_class: type[VisionModel]
    config: Any
    weights: tuple[Weights, ...]  # published weights, default first
    default_preprocess: Preprocess  # for use without weights (from the default weights if any)
    compose: Callable[..., Any] | None = None  # a head on any backbone: compose(config, backbone, **kwargs)

    @property
    def task(self) -> Task:
        return self.model_class.task

    @property
    def default_weights(self) -> Weights | None:
        return next((w for w in self.weights if w.is_default), None)

    @property
    def composed(self) -> bool:
        """A head that goes on a classifier of the zoo (`backbone=`), rather than a fixed network."""
        return self.compose is not None

    def build(self, **kwargs):
        """The network with fresh weights. A composed head needs `backbone=`, a built classifier
        (`create_model` resolves a backbone's name and its weights)."""
        if self.compose is not None:
            return self.compose(self.config, **kwargs)
        return self.model_class(self.config, **kwargs)


def split_name(name: str) -> tuple[str, str | None]:
    """`"resnet50.IMAGENET1K_V1"` -> `("resnet50", "IMAGENET1K_V1")`; accepts torchvision's
    `ResNet50_Weights.IMAGENET1K_V1` spelling."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    arch, _, tag = name.strip().partition(".")
    arch = arch.lower()
    if arch.endswith("_weights"):
        arch = arch[: -len("_weights")]
    return arch, (tag or None)


class Registry:
    def __init__(self, families: tuple[str, ...] = FAMILIES, catalog: Path = CATALOG):
        self._families = families
        self._catalog_path = catalog

    # -- loading (once, on first use) ------------------------------------------------------
    @cached_property
    def _catalog(self) -> dict[str, Any]:
        return json.loads(self._catalog_path.read_text())

    @cached_property
    def _all_weights(self) -> dict[str, tuple[Weights, ...]]:
        """Every weights row of the catalog by architecture, built or not."""
        data = self._catalog
        categories = {
            key: tuple(json.loads((self._catalog_path.parent / file).read_text()))
            for key, file in data["categories"].items()
        }
        by_arch: dict[str, list[Weights]] = {}
        for row in data["weights"]:
            w = Weights(
                arch=row["arch"], tag=row["tag"], file_name=row["file"],
                sha256_prefix=row.get("sha256_prefix"), num_params=row["num_params"],
                preprocess=Preprocess.from_dict(row["preprocess"]), url=row.get("url"),
                package=row.get("package"), package_file=row.get("package_file"),
                is_default=bool(row.get("default")),
                categories=categories[row["categories"]] if row.get("categories") else None,
                dataset=row.get("dataset"), metrics=MappingProxyType(dict(row.get("metrics") or {})),
                gflops=row.get("gflops"),
                keypoint_names=tuple(row["keypoint_names"]) if row.get("keypoint_names") else None,
                file_size_mb=row.get("file_size_mb"), min_size=tuple(row.get("min_size", (1, 1))),
                recipe=row.get("recipe"), license=row.get("license"), layout=row.get("layout", "native"),
                builder_kwargs=MappingProxyType(dict(row.get("builder_kwargs", {}))),
            )
            by_arch.setdefault(w.arch, []).append(w)
        return {a: tuple(sorted(ws, key=lambda w: not w.is_default)) for a, ws in by_arch.items()}

    @cached_property
    def _archs(self) -> dict[str, Architecture]:
        archs: dict[str, Architecture] = {}
        arch_defaults = self._catalog.get("architectures", {})
        for family in self._families:
            module = importlib.import_module(f"visionzoo.models.{family}")
            for name, config in module.VARIANTS.items():
                weights = self._all_weights.get(name, ())
                default = next((w for w in weights if w.is_default), None)
                if default is not None:
                    preprocess = default.preprocess
                elif name in arch_defaults:
                    preprocess = Preprocess.from_dict(arch_defaults[name]["preprocess"])
                else:
                    preprocess = DEFAULT_PREPROCESS
                archs[name] = Architecture(name, family, module.MODEL_CLASS, config, weights, preprocess)
            for name, config in getattr(module, "COMPOSED", {}).items():
                archs[name] = Architecture(name, family, module.COMPOSED_CLASS, config, (), module.COMPOSED_PREPROCESS,
                                           compose=module.compose)
        return dict(sorted(archs.items()))

    # -- queries ---------------------------------------------------------------------------
    def list_models(self, pattern: str | None = None, pretrained: bool = False,
                    task: Task | str | None = None) -> list[str]:
        """Names of the buildable architectures, optionally filtered by a glob pattern
        (`"resnet*"`), to those with published weights, and to one task."""
        wanted = None if task is None else parse_enum(Task, task, "task")
        names = [n for n, a in self._archs.items()
                 if (not pretrained or a.weights) and (wanted is None or a.task is wanted)]
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern.lower())]
        return names

    def list_weights(self, arch: str) -> list[str]:
        """Full names (`arch.TAG`) of the weights published for `arch`, default first."""
        return [w.name for w in self.get_architecture(arch).weights]

    def get_architecture(self, name: str) -> Architecture:
        arch, _ = split_name(name)
        try:
            return self._archs[arch]
        except KeyError:
            raise UnknownModelError(self._unknown_message(arch)) from None

    def get_weights(self, name: str | Weights, tag: str | None = None) -> Weights:
        """The weights record for `arch` (its default), `arch.TAG` or (`arch`, `TAG`).

        `DEFAULT` is accepted as a tag. Raises if the architecture has no weights.
        """
        if isinstance(name, Weights):
            return name
        arch_name, parsed_tag = split_name(name)
        tag = tag or parsed_tag
        arch = self.get_architecture(arch_name)
        if not arch.weights:
            raise UnknownWeightsError(
                f"{arch.name} has no published weights; build it with weights=None or pass a local file")
        if tag is None or tag.upper() == "DEFAULT":
            return arch.default_weights or arch.weights[0]
        for w in arch.weights:
            if w.tag.upper() == tag.upper():
                return w
        tags = ", ".join(w.tag for w in arch.weights)
        raise UnknownWeightsError(f"{arch.name} has no weights tagged {tag!r}; published tags: {tags}")

    def _unknown_message(self, arch: str) -> str:
        if arch in self._all_weights:
            return (f"architecture {arch!r} is in the torchvision catalog but not built in this "
                    f"version of visionzoo yet; see `visionzoo models` for the available ones")
        close = difflib.get_close_matches(arch, list(self._archs), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return f"unknown model {arch!r}; {hint}run `visionzoo models` to list them"


REGISTRY = Registry()
