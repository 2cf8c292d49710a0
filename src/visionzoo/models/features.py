"""Multi-scale feature maps from any zoo model: `create_model(name, features_only=True)`.

Generic over families: the stages are the model's `feature_info` entries, each stage's
output is captured with a forward hook on its module and turned into an NCHW map by
the model's `format_stage_output` (token-based families reshape there). Execution stops
right after the deepest requested stage, so asking for early stages costs only the
layers up to them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from .base import FeatureInfo, VisionModel, ZooModel


class _StagesCaptured(Exception):
    """Raised from a hook to stop the forward pass once every requested stage was seen."""


class FeatureExtractor(nn.Module):
    """Wraps a `ZooModel`; `forward(x)` returns the feature maps of `out_indices` (NCHW).

    Attributes:
        model: the wrapped model (its head is kept, so `extractor.model(x)` still classifies).
        out_indices: positions in `model.feature_info` of the returned stages, in output order.
        feature_info: the `FeatureInfo` (module, channels, reduction) of each returned map.
    """

    def __init__(self, model: VisionModel, out_indices: Sequence[int | str] | None = None):
        super().__init__()
        if not isinstance(model, ZooModel):
            raise InputError(f"features_only needs a visionzoo model, got {type(model).__name__}")
        self.model = model
        self.out_indices = resolve_out_indices(model, out_indices)
        self.feature_info: list[FeatureInfo] = [model.feature_info[i] for i in self.out_indices]

    @property
    def card(self):
        """The wrapped model's description (task, weights, classes, preprocessing)."""
        return self.model.card

    @property
    def preprocess(self):
        return self.model.preprocess

    @property
    def channels(self) -> list[int]:
        return [info.num_chs for info in self.feature_info]

    @property
    def reductions(self) -> list[int]:
        return [info.reduction for info in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return capture_stages(self.model, self.out_indices, x)

    def extra_repr(self) -> str:
        return f"out_indices={self.out_indices}, channels={self.channels}, reductions={self.reductions}"


def capture_stages(model: ZooModel, out_indices: Sequence[int], x: torch.Tensor) -> list[torch.Tensor]:
    """The NCHW outputs of the stages `out_indices` (positions in `model.feature_info`, already
    resolved) of `model` on `x`, in that order; the forward pass stops after the deepest one.

    Models that own their stages under torchvision's names (detection backbones) call this on the
    model itself, so no wrapper changes the parameter names.
    """
    captured: dict[int, torch.Tensor] = {}
    wanted = set(out_indices)
    # torch.export follows the module calls; an exception unwinding them would confuse it, so an
    # exported extractor runs the whole of forward_features
    stop_early = not torch.compiler.is_exporting()

    def hook_for(index: int):
        def hook(module, inputs, output):
            if index not in captured:  # a module called twice: its first call is the stage
                captured[index] = model.format_stage_output(index, output)
                if stop_early and wanted.issubset(captured):
                    raise _StagesCaptured
        return hook

    handles = [model.get_submodule(model.feature_info[i].module).register_forward_hook(hook_for(i))
               for i in sorted(wanted)]
    try:
        model.forward_features(x)
    except _StagesCaptured:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(wanted.difference(captured))
    if missing:
        names = ", ".join(model.feature_info[i].module for i in missing)
        raise RuntimeError(f"{model.arch or type(model).__name__}: forward_features never ran the "
                           f"stage module(s) {names}; its feature_info does not match its forward")
    return [captured[i] for i in out_indices]


def resolve_out_indices(model: ZooModel, out_indices: Sequence[int | str] | int | str | None) -> tuple[int, ...]:
    """Stage positions from indices (negative count from the deepest) or `feature_info` module names."""
    n = len(model.feature_info)
    if out_indices is None:
        return tuple(range(n))
    items: Sequence[int | str] = (out_indices,) if isinstance(out_indices, (int, str)) else out_indices
    resolved = [resolve_stage(model, item) for item in items]
    if len(set(resolved)) != len(resolved):
        raise InputError(f"out_indices {tuple(items)} name a stage twice")
    if not resolved:
        raise InputError("out_indices is empty; name at least one stage")
    return tuple(resolved)


def resolve_stage(model: ZooModel, stage: int | str) -> int:
    """One stage position from an index (negative from the deepest) or a module name."""
    infos = model.feature_info
    n = len(infos)
    described = ", ".join(f"{i}={info.module} ({info.num_chs} ch, /{info.reduction})" for i, info in enumerate(infos))
    if isinstance(stage, str):
        text = stage.strip()
        if text.lstrip("-").isdigit():
            stage = int(text)
        else:
            for i, info in enumerate(infos):
                if info.module == text:
                    return i
            raise InputError(f"{model.arch or type(model).__name__} has no stage {text!r}; stages: {described}")
    if isinstance(stage, bool) or not isinstance(stage, int) or not -n <= stage < n:
        raise InputError(f"stage {stage!r} is out of range for {model.arch or type(model).__name__}, "
                         f"which has {n} stages: {described}")
    return stage % n
