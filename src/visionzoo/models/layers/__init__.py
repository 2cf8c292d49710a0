"""Small building blocks shared by several model families."""
from .attention import MultiheadSelfAttention, attention, relative_position_index, set_fused_attention
from .conv import Conv2dSame, ConvNormAct, make_divisible, same_padding_conv
from .drop import StochasticDepth, drop_path
from .inception import BasicConv2d, transform_input
from .mlp import Mlp
from .norm import FrozenBatchNorm2d, set_norm_eps
from .pos_embed import resample_pos_embed
from .squeeze_excite import SqueezeExcitation
from .video import check_clip

__all__ = ["BasicConv2d", "Conv2dSame", "ConvNormAct", "FrozenBatchNorm2d", "Mlp", "MultiheadSelfAttention",
           "SqueezeExcitation", "StochasticDepth", "attention", "check_clip", "drop_path", "make_divisible",
           "relative_position_index", "resample_pos_embed", "same_padding_conv", "set_fused_attention",
           "set_norm_eps", "transform_input"]
