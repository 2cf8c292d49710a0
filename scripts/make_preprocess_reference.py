"""Write tests/fixtures/preprocess_reference.npz: torchvision's evaluation preset applied to
real photos, the reference our preprocessing must reproduce.

Needs torchvision, which is not a dependency; run it in a separate environment:
    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        pillow scikit-image matplotlib
    /tmp/tv/bin/python scripts/make_preprocess_reference.py
"""
from pathlib import Path

import matplotlib
import numpy as np
import PIL
import skimage
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "preprocess_reference.npz"
SK = Path(skimage.__file__).parent / "data"
IMAGES = {
    "coffee": SK / "coffee.png", "chelsea": SK / "chelsea.png", "rocket": SK / "rocket.jpg",
    "grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
}
# (resize, crop, interpolation, mean, std): torchvision's ResNet-50 V1/V2, Inception v3,
# ViT SWAG, and the EfficientNet-Lite2 recipe
IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RECIPES = {
    "r256_c224_bilinear": (256, 224, "bilinear", *IMNET),
    "r232_c224_bilinear": (232, 224, "bilinear", *IMNET),
    "r342_c299_bilinear": (342, 299, "bilinear", *IMNET),
    "r384_c384_bicubic": (384, 384, "bicubic", *IMNET),
    "r292_c260_bicubic": (292, 260, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def main():
    arrays = {}
    images = {k: Image.open(p).convert("RGB") for k, p in IMAGES.items()}
    # a small grayscale crop: smaller than the crop size, so the preset pads it
    images["small_gray"] = Image.open(SK / "camera.png").crop((100, 50, 250, 140)).convert("RGB")
    for iname, img in images.items():
        for rname, (resize, crop, interp, mean, std) in RECIPES.items():
            mode = InterpolationMode(interp)
            preset = ImageClassification(crop_size=crop, resize_size=resize, interpolation=mode, mean=mean, std=std)
            ref = preset(img)
            raw = F.pil_to_tensor(F.center_crop(F.resize(img, [resize], mode, antialias=True), [crop]))
            again = F.normalize(raw.float() / 255, mean, std)
            assert torch.equal(ref, again), (iname, rname)
            arrays[f"{iname}/{rname}"] = raw.numpy()
    np.savez_compressed(OUT, **arrays, _versions=np.array([torchvision.__version__, PIL.__version__]))
    print(f"wrote {len(arrays)} references to {OUT} (torchvision {torchvision.__version__}, Pillow {PIL.__version__})")


if __name__ == "__main__":
    main()
