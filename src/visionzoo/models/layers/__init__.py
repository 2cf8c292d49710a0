"""Small building blocks shared by several model families."""
from .conv import Conv2dSame, ConvNormAct, make_divisible, same_padding_conv
from .drop import StochasticDepth, drop_path
from .inception import BasicConv2d, transform_input
from .squeeze_excite import SqueezeExcitation

__all__ = ["BasicConv2d", "Conv2dSame", "ConvNormAct", "SqueezeExcitation", "StochasticDepth", "drop_path",
           "make_divisible", "same_padding_conv", "transform_input"]
