"""Images in: decoding, preprocessing, input discovery, datasets and batched loading."""
from .datasets import ImageDataset, open_dataset
from .images import DEFAULT_LIMITS, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, DecodeLimits, load_image
from .inputs import Failure, expand_inputs
from .loader import ImageBatch, image_batches
from .transforms import ClassificationTransform

__all__ = ["DEFAULT_LIMITS", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ClassificationTransform", "DecodeLimits",
           "Failure", "ImageBatch", "ImageDataset", "expand_inputs", "image_batches", "load_image", "open_dataset"]
