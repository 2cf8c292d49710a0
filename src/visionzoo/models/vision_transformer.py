"""Vision Transformer (ViT) B/16, B/32, L/16, L/32 and H/14.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale" (2020); the SWAG weights are from Singh et al., "Revisiting Weakly Supervised
Pre-Training of Visual Perception Models" (2022).

State-dict names follow torchvision's `VisionTransformer` (`conv_proj`, `class_token`,
`encoder.pos_embedding`, `encoder.layers.encoder_layer_N`, `heads.head`). The model is
built for one square `image_size`; a checkpoint for another size is fitted by resampling
its position embeddings over the patch grid (`adapt_state_dict`).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from .base import FeatureInfo, ZooModel
from .layers import Mlp, MultiheadSelfAttention, resample_pos_embed

log = logging.getLogger("visionzoo")


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int


VARIANTS: dict[str, ViTConfig] = {
    "vit_b_16": ViTConfig(16, 12, 12, 768, 3072),
    "vit_b_32": ViTConfig(32, 12, 12, 768, 3072),
    "vit_l_16": ViTConfig(16, 24, 16, 1024, 4096),
    "vit_l_32": ViTConfig(32, 24, 16, 1024, 4096),
    "vit_h_14": ViTConfig(14, 32, 16, 1280, 5120),
}


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, attention_dropout: float,
                 fused_attention: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = MultiheadSelfAttention(dim, num_heads, attention_dropout, fused=fused_attention)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, cfg: ViTConfig, dropout: float, attention_dropout: float,
                 fused_attention: bool):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, cfg.hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(cfg.hidden_dim, cfg.num_heads, cfg.mlp_dim, dropout,
                                                attention_dropout, fused_attention))
            for i in range(cfg.num_layers)))
        self.ln = nn.LayerNorm(cfg.hidden_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(ZooModel):
    """ViT for square `image_size x image_size` inputs (a multiple of the patch size).

    `forward_features` returns the normalised tokens (B, 1 + patches, C), class token first;
    `forward_head(..., pre_logits=True)` the class token. `fused_attention=False` selects the
    explicit matmul-softmax attention (see `layers.set_fused_attention`).
    """

    classifier_name = "heads.head"
    first_conv = "conv_proj"

    def __init__(self, cfg: ViTConfig, num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
                 dropout: float = 0.0, attention_dropout: float = 0.0, fused_attention: bool = True):
        super().__init__()
        p = cfg.patch_size
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise InputError(f"image_size must be an integer, got {image_size!r}")
        if image_size < p or image_size % p:
            raise InputError(f"a ViT with {p}x{p} patches needs image_size to be a positive multiple of {p}, "
                             f"got {image_size}; use e.g. {max(1, round(image_size / p)) * p}")
        self.patch_size = p
        self.image_size = image_size
        self.grid_size = image_size // p
        self.hidden_dim = cfg.hidden_dim
        self.num_features = cfg.hidden_dim
        self.num_classes = num_classes

        self.conv_proj = nn.Conv2d(in_chans, cfg.hidden_dim, kernel_size=p, stride=p)
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_dim))
        self.encoder = Encoder(self.grid_size ** 2 + 1, cfg, dropout, attention_dropout, fused_attention)
        self.heads = nn.Sequential(OrderedDict(
            head=self._new_classifier(num_classes) if num_classes > 0 else nn.Identity()))
        self.feature_info = [FeatureInfo(f"encoder.layers.encoder_layer_{i}", cfg.hidden_dim, p)
                             for i in range(cfg.num_layers)]

        fan_in = in_chans * p * p
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(cast(torch.Tensor, self.conv_proj.bias))  # built with a bias

    def _new_classifier(self, num_classes: int) -> nn.Module:
        # ViT heads start at zero (the paper's fine-tuning recipe, and torchvision's init)
        head = nn.Linear(self.hidden_dim, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise InputError(f"this ViT was built for {self.image_size}x{self.image_size} inputs, got {h}x{w}; "
                             f"resize the input or build the model with image_size={h} "
                             f"(the position embeddings of its weights are then resampled)")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, patches, C), row-major patch order
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.heads(x)

    def format_stage_output(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + H*W, C) -> patch map (B, C, H, W); the class token is dropped."""
        b, _, c = output.shape
        return output[:, 1:].transpose(1, 2).reshape(b, c, self.grid_size, self.grid_size)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resample the checkpoint's position embeddings when it was trained at another image size."""
        key = "encoder.pos_embedding"
        pos = state_dict.get(key)
        own = self.encoder.pos_embedding
        if pos is None or pos.shape == own.shape or pos.ndim != 3 or pos.shape[-1] != own.shape[-1]:
            return state_dict  # nothing to do, or not ours to fix: the strict load reports it
        patches = pos.shape[1] - 1
        old = math.isqrt(patches)
        if old * old != patches:
            raise CheckpointError(f"the checkpoint's {key} holds {patches} patch positions, not a square grid; "
                                  f"it is not a torchvision ViT checkpoint")
        new = self.grid_size
        state_dict = dict(state_dict)
        state_dict[key] = resample_pos_embed(pos, (old, old), (new, new), num_prefix_tokens=1)
        log.info("%s: resampled the position embeddings from a %dx%d to a %dx%d patch grid "
                 "(image size %d -> %d, bicubic, class token kept)", self.arch or type(self).__name__,
                 old, old, new, new, old * self.patch_size, self.image_size)
        return state_dict


MODEL_CLASS = VisionTransformer
