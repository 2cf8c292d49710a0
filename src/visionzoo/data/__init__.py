"""Images in: decoding, preprocessing and input discovery."""
from .images import IMAGE_EXTENSIONS, load_image
from .inputs import Failure, expand_inputs
from .transforms import ClassificationTransform

__all__ = ["IMAGE_EXTENSIONS", "ClassificationTransform", "Failure", "expand_inputs", "load_image"]
