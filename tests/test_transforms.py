"""Our preprocessing reproduces torchvision's evaluation preset on real PIL images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo.data.images import load_image
from visionzoo.data.transforms import center_crop, resized_size
from visionzoo.weights.records import Preprocess

from .parity import FIXTURES
from .photos import sample_image

REF = np.load(FIXTURES / "preprocess_reference.npz")
IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RECIPES = {
    "r256_c224_bilinear": Preprocess(256, 224, "bilinear", *IMNET),
    "r232_c224_bilinear": Preprocess(232, 224, "bilinear", *IMNET),
    "r342_c299_bilinear": Preprocess(342, 299, "bilinear", *IMNET),
    "r384_c384_bicubic": Preprocess(384, 384, "bicubic", *IMNET),
    "r292_c260_bicubic": Preprocess(292, 260, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
IMAGES = {"coffee": "coffee.png", "chelsea": "chelsea.png", "rocket": "rocket.jpg",
          "grace_hopper": "grace_hopper.jpg"}


def _image(name: str) -> Image.Image:
    if name == "small_gray":
        return Image.open(sample_image("camera.png")).crop((100, 50, 250, 140)).convert("RGB")
    return load_image(sample_image(IMAGES[name]))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("image", sorted(IMAGES) + ["small_gray"])
def test_matches_torchvision_preset(image, recipe):
    p = RECIPES[recipe]
    ours = p.transforms()(_image(image))
    raw = torch.from_numpy(REF[f"{image}/{recipe}"]).float() / 255
    expected = (raw - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(p.std).view(3, 1, 1)
    assert ours.shape == expected.shape == (3, p.crop_size, p.crop_size)
    assert ours.dtype == torch.float32
    # identical up to float rounding (same Pillow resampling, same crop box)
    assert torch.allclose(ours, expected, atol=1e-5), float((ours - expected).abs().max())


def test_resized_size_follows_torchvision_rounding():
    assert resized_size(640, 427, 256) == (383, 256)  # int(256 * 640 / 427) = 383
    assert resized_size(300, 451, 256) == (256, 384)
    assert resized_size(500, 500, 224) == (224, 224)


def test_center_crop_pads_small_images_and_rounds_like_torchvision():
    img = Image.new("RGB", (5, 3), (255, 0, 0))
    out = center_crop(img, 4)
    arr = np.asarray(out)
    assert out.size == (4, 4)
    # padded rows are black; the image rows are red
    assert arr[:, :, 0].sum() > 0 and (arr.sum(axis=(1, 2)) == 0).any()
    # odd margins: top = round((7 - 4) / 2) = 2 (banker's rounding of 1.5)
    tall = Image.fromarray(np.arange(7 * 4 * 3, dtype=np.uint8).reshape(7, 4, 3))
    assert np.array_equal(np.asarray(center_crop(tall, 4)), np.asarray(tall)[2:6])
