"""timm's state-dict names for the networks timm and torchvision share.

timm (pytorch-image-models) publishes many checkpoints of networks identical to
torchvision's, under its own module names. Each converter renames one such layout to
ours; `remap.py` registers them with their detectors. Keys a converter does not know
keep their name, so they show up as unexpected instead of being dropped silently.

- ResNet (`resnet*`): timm uses torchvision's names already, so these load natively.
- EfficientNet (`efficientnet_b*`, `tf_efficientnet_lite*`): `conv_stem`/`bn1`,
  `blocks.S.I.{conv_pw,conv_dw,se,conv_pwl}`, `conv_head`/`bn2`, `classifier`.
- ViT (`vit_*_patch*`): `patch_embed.proj`, `cls_token`, `pos_embed`,
  `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`. timm's
  fused `qkv` is torchvision's `in_proj` (both stack q, k, v in that order).
- ConvNeXt (`convnext_*`): `stem`, `stages.S.downsample`, `stages.S.blocks.I.{conv_dw,
  norm,mlp.fc1,mlp.fc2,gamma}`, `head.{norm,fc}`; the layer scale `gamma` is `(C,)` in timm
  and `(C, 1, 1)` in torchvision.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """`key` with the first matching prefix of `table` replaced, or None."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


# -- EfficientNet ------------------------------------------------------------------------------
def detect_efficientnet(sd: Mapping[str, torch.Tensor]) -> bool:
    return "conv_stem.weight" in sd and "blocks.0.0.conv_dw.weight" in sd


def _efficientnet_block_table(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, str]:
    """timm module name -> index in our `block` Sequential, for one block.

    The order is the block's: an inverted residual is expand (`conv_pw`/`bn1`),
    depthwise (`conv_dw`/`bn2`), squeeze-excitation, project (`conv_pwl`/`bn3`); the
    depthwise-separable first block is depthwise (`conv_dw`/`bn1`), SE, pointwise
    (`conv_pw`/`bn2`). Absent parts (no SE in Lite) shift the following indices.
    """
    def has(name: str) -> bool:
        return f"{prefix}{name}.weight" in sd

    if has("conv_pwl"):
        parts = [("conv_pw", "bn1"), ("conv_dw", "bn2"), "se", ("conv_pwl", "bn3")]
    else:
        parts = [("conv_dw", "bn1"), "se", ("conv_pw", "bn2")]
    table: dict[str, str] = {}
    index = 0
    for part in parts:
        if part == "se":
            if not has("se.conv_reduce"):
                continue
            table.update({"se.conv_reduce.": f"{index}.fc1.", "se.conv_expand.": f"{index}.fc2."})
        else:
            conv, bn = part
            if not has(conv):
                continue
            table.update({f"{conv}.": f"{index}.0.", f"{bn}.": f"{index}.1."})
        index += 1
    return table


def from_efficientnet(sd: Mapping[str, torch.Tensor], target_keys: Sequence[str]) -> StateDict:
    stages = [int(k.split(".")[1]) for k in target_keys if k.startswith("features.")]
    head = max(stages) if stages else 8
    top = {"conv_stem.": "features.0.0.", "bn1.": "features.0.1.", "conv_head.": f"features.{head}.0.",
           "bn2.": f"features.{head}.1.", "classifier.": "classifier.1."}
    tables: dict[str, dict[str, str]] = {}
    out: StateDict = {}
    for key, value in sd.items():
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.+)$", key)
        if m is None:
            out[_rename(key, top) or key] = value
            continue
        prefix = f"blocks.{m.group(1)}.{m.group(2)}."
        table = tables.setdefault(prefix, _efficientnet_block_table(sd, prefix))
        leaf = _rename(m.group(3), table)
        # timm stage S is our features.S+1 (features.0 is the stem)
        out[f"features.{int(m.group(1)) + 1}.{m.group(2)}.block.{leaf}" if leaf else key] = value
    return out


# -- Vision Transformer --------------------------------------------------------------------------
_VIT_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed.proj.": "conv_proj.",
            "norm.": "encoder.ln.", "head.": "heads.head."}
_VIT_BLOCK = {"norm1.": "ln_1.", "attn.qkv.weight": "self_attention.in_proj_weight",
              "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj.": "self_attention.out_proj.",
              "norm2.": "ln_2.", "mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.3."}


def detect_vit(sd: Mapping[str, torch.Tensor]) -> bool:
    return "cls_token" in sd and "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd


def from_vit(sd: Mapping[str, torch.Tensor], target_keys: Sequence[str]) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if m is None:
            new = _rename(key, _VIT_TOP)
        else:
            leaf = _rename(m.group(2), _VIT_BLOCK)
            new = f"encoder.layers.encoder_layer_{m.group(1)}.{leaf}" if leaf else None
        out[new or key] = value
    return out


# -- ConvNeXt ----------------------------------------------------------------------------------
_CONVNEXT_BLOCK = {"conv_dw.": "block.0.", "norm.": "block.2.", "mlp.fc1.": "block.3.", "mlp.fc2.": "block.5.",
                   "gamma": "layer_scale"}


def detect_convnext(sd: Mapping[str, torch.Tensor]) -> bool:
    return "stem.0.weight" in sd and "stages.0.blocks.0.conv_dw.weight" in sd


def from_convnext(sd: Mapping[str, torch.Tensor], target_keys: Sequence[str]) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        new = _rename(key, {"stem.": "features.0.", "head.norm.": "classifier.0.", "head.fc.": "classifier.2."})
        if (m := re.match(r"stages\.(\d+)\.downsample\.(.+)$", key)) is not None:
            new = f"features.{2 * int(m.group(1))}.{m.group(2)}"  # stage S's downsampling: features.2S
        elif (m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key)) is not None:
            leaf = _rename(m.group(3), _CONVNEXT_BLOCK)
            if leaf is not None:
                new = f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}.{leaf}"  # stage S's blocks: features.2S+1
                if leaf == "layer_scale" and value.ndim == 1:
                    value = value.reshape(-1, 1, 1)
        out[new or key] = value
    return out
