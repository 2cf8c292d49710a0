"""Object detection: torchvision's COCO detectors and the parts they are built from.

Split like torchvision's detection package: `transform` (normalise, resize, batch, map boxes
back), `anchors`, `fpn`, `backbones` (zoo classifiers with a pyramid on top), `matching` and
`losses` for training, `base` (the shared forward pass and post-processing), and one module per
family: `retinanet`, `fcos`, `ssd`, `ssdlite`, and the two-stage `rcnn` (Faster, Mask and Keypoint
R-CNN) with its stages in `rpn` and `roi_heads`. `composed` puts these heads on any classifier of
the zoo.
"""
from .base import DetectionModel
from .transform import DetectionTransform, ImageBatch

__all__ = ["DetectionModel", "DetectionTransform", "ImageBatch"]
