"""Which parameters and modules belong to which stage, for any `ZooModel` (or any model that lists
its stages, such as a segmentation model's backbone stages).

A model's `feature_info` names the module that ends each stage, shallow to deep. One
forward pass with hooks records when every module starts and ends relative to those
boundaries, so the split follows the order the network actually runs in (not the order
its attributes were defined in, nor any family-specific naming). What runs after the
last stage (pooling, hidden fully connected layers, the classifier) is the head.

This drives `partial` (freeze the earlier stages, and put every module that runs
entirely inside them in eval mode, so BatchNorm statistics and dropout stay as
pre-trained) and `full` (a smaller learning rate for each earlier stage).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models.base import FeatureInfo, ZooModel


@dataclass(frozen=True)
class StageMap:
    params: tuple[tuple[str, ...], ...]  # parameter names of stage 0..S-1, then the head (index S)
    modules: tuple[tuple[str, ...], ...]  # modules that run entirely within stage k (head last)
    unused: tuple[str, ...]  # parameters of modules the forward pass never ran (left frozen)

    @property
    def num_stages(self) -> int:
        return len(self.params) - 1

    def param_stage(self) -> dict[str, int]:
        return {name: k for k, names in enumerate(self.params) for name in names}


def map_stages(model: nn.Module, image_size: int, stages: Sequence[FeatureInfo] | None = None,
               frames: int | None = None) -> StageMap:
    """Split `model`'s parameters and modules into its stages plus the head. The stages are `stages`
    (default: the model's `feature_info`), named within `model`; traced on an image of `image_size`,
    or on a clip of `frames` such frames for a video model."""
    if stages is None:
        if not isinstance(model, ZooModel):
            raise RuntimeError(f"map_stages: {type(model).__name__} is not a ZooModel; pass its stages")
        stages = model.feature_info
    infos = list(stages)
    boundary = {info.module: k for k, info in enumerate(infos)}
    n_stages = len(infos)
    done = 0  # stages finished so far, i.e. the stage now running
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    handles = []

    def on_start(name):
        def hook(module, args):
            start.setdefault(name, done)
        return hook

    def on_end(name):
        def hook(module, args, output):
            nonlocal done
            end.setdefault(name, done)
            if name in boundary:
                done = max(done, boundary[name] + 1)
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(on_start(name)))
        handles.append(module.register_forward_hook(on_end(name)))
    was_training = model.training
    try:
        in_chans = _input_channels(model)
        p = next(model.parameters())
        time = () if frames is None else (frames,)
        x = torch.zeros(1, in_chans, *time, image_size, image_size, device=p.device, dtype=p.dtype)
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    params: list[list[str]] = [[] for _ in range(n_stages + 1)]
    modules: list[list[str]] = [[] for _ in range(n_stages + 1)]
    unused: list[str] = []
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if name not in start:
            unused += own
            continue
        # parameters held by a module spanning several stages (a class token, position
        # embeddings) are used when it starts
        params[min(start[name], n_stages)] += own
        if start[name] == end.get(name):  # (a module left by an exception, as a feature extractor stops, never ends)
            modules[min(start[name], n_stages)].append(name)
    return StageMap(tuple(map(tuple, params)), tuple(map(tuple, modules)), tuple(unused))


def _input_channels(model: nn.Module) -> int:
    if not isinstance(model, ZooModel):
        return 3
    first = model.get_submodule(model.first_conv)
    for attr in ("in_channels", "in_features"):
        if hasattr(first, attr):
            return int(getattr(first, attr))
    return 3


def freeze(model: nn.Module, stages: StageMap, trainable: set[int]) -> list[str]:
    """requires_grad only for the parameters of the `trainable` stages (index S is the head).

    Returns the names of the modules to keep in eval mode while training: those that run
    entirely within frozen stages.
    """
    stage_of = stages.param_stage()
    for name, p in model.named_parameters():
        p.requires_grad_(stage_of.get(name, -1) in trainable)
    return [m for k, names in enumerate(stages.modules) if k not in trainable for m in names]


def set_train_mode(model: nn.Module, frozen_modules: list[str]) -> None:
    """`model.train()`, except frozen modules: their BatchNorm keeps its running statistics
    (and normalises with them), their dropout and stochastic depth stay off."""
    model.train()
    for name in frozen_modules:
        # the flag only, not `.eval()`: a frozen module's children are in the list themselves
        model.get_submodule(name).training = False


def param_groups(model: nn.Module, stages: StageMap, lr: float, lr_decay: float, weight_decay: float,
                 trainable: set[int]) -> list[dict]:
    """AdamW groups: stage k gets lr * lr_decay ** (S - k) (the head, k = S, gets lr);
    biases and normalisation weights (1-d tensors) get no weight decay."""
    stage_of = stages.param_stage()
    n = stages.num_stages
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        k = stage_of.get(name)
        if k is None or k not in trainable:
            continue
        decay = p.ndim > 1
        g = groups.setdefault((k, decay), {"params": [], "names": [], "stage": k,
                                           "lr": lr * lr_decay ** (n - k),
                                           "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[key] for key in sorted(groups)]
