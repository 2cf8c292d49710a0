"""End to end: segmenting a folder of camera-size JPEGs, idiomatic script vs `visionzoo segment`.

    python benchmarks/segment_camera.py [--images 100] [--megapixels 12] [--dir FOLDER] [--model NAME]

The folder holds --images JPEGs of about --megapixels (quality 90), made from real photos
(scikit-image's and matplotlib's samples, augmented and upscaled; kept in --dir to reuse).
The model is torchvision's LR-ASPP MobileNetV3-Large when its weights are at hand (cached or
downloadable), else the same head on EfficientNet-Lite0 with its ImageNet weights and a seeded
21-class head (the only weights that ship offline; its masks are not meaningful, but both sides
compute the same ones). Compared in one process, each timed from model creation to the last
file written:
  idiomatic   what a user writes: Pillow full decode, the weights' preprocessing (shorter side
              to 520, normalise), the model in eager PyTorch under `torch.no_grad()` one image at
              a time (sizes differ), the scores upsampled to the image's size
              (`F.interpolate`, bilinear), arg-max, the mask saved as a palette PNG;
  visionzoo   `visionzoo.segment(folder, out=...)`: decoding workers with the reduced-scale JPEG
              decode, the chosen backend, labels at the image's size without resizing the scores
              (`ops.resize_argmax`), PNGs (mask and a 1024-pixel overlay) encoded in threads.
It prints images/second, the ratio to the idiomatic script (target >= 3) and the share of
mask pixels equal to the script's (target >= 99.5%).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionzoo  # noqa: E402
from tests.photos import write_camera_jpegs  # noqa: E402
from visionzoo.errors import WeightsUnavailableError  # noqa: E402
from visionzoo.runtime.measure import describe_machine  # noqa: E402
from visionzoo.tasks.segment import PALETTE, Segmentation  # noqa: E402

PUBLISHED = "lraspp_mobilenet_v3_large"


def model_folder(work: Path, name: str | None) -> str:
    """The model both sides run: `name`, the published LR-ASPP, or (offline) LR-ASPP on Lite0 saved as a bundle."""
    if name:
        return name
    try:
        visionzoo.create_model(PUBLISHED, weights="DEFAULT")
        return PUBLISHED
    except WeightsUnavailableError as e:
        print(f"({PUBLISHED}: {str(e).splitlines()[0][:100]}; using LR-ASPP on EfficientNet-Lite0 instead)")
    torch.manual_seed(0)
    net = visionzoo.create_model("lraspp", backbone="efficientnet_lite0", pretrained_backbone=True, num_classes=21)
    classes = visionzoo.get_weights(PUBLISHED).categories
    bundle = work / "lraspp_lite0"
    visionzoo.save_bundle(net, bundle, classes=classes, preprocess=net.card.preprocess)
    return str(bundle)


def idiomatic(paths: list[Path], model: str, out: Path) -> None:
    net = visionzoo.create_model(model).eval()
    preprocess = net.card.preprocess.transforms()
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        img = Image.open(p).convert("RGB")
        with torch.no_grad():
            scores = net(preprocess(img)[None])["out"]
            scores = F.interpolate(scores, size=(img.height, img.width), mode="bilinear", align_corners=False)
            labels = scores[0].argmax(0).to(torch.uint8).numpy()
        mask = Image.fromarray(labels)
        mask.putpalette(PALETTE)
        mask.save(out / f"{p.stem}.png")


def ours(folder: Path, model: str, out: Path, backend: str) -> None:
    results = visionzoo.segment(folder, model=model, out=out, backend=backend)
    failed = [r for r in results if not isinstance(r, Segmentation)]
    assert not failed, failed[:3]


def agreement(reference: Path, other: Path, paths: list[Path]) -> float:
    same = total = 0
    for p in paths:
        a = np.asarray(Image.open(reference / f"{p.stem}.png"))
        b = np.asarray(Image.open(other / "masks" / f"{p.stem}.png"))
        same += int((a == b).sum())
        total += a.size
    return same / total


def timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--dir", type=Path, default=None, help="where the JPEGs are made (and reused)")
    parser.add_argument("--model", default=None, help=f"default: {PUBLISHED} (or LR-ASPP on Lite0 offline)")
    parser.add_argument("--backends", default="auto", help="comma-separated: auto, onnxruntime, openvino")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = args.dir or work / "photos"
        os.environ.setdefault("TORCH_HOME", str(work / "torch_home"))
        paths = sorted(folder.glob("photo_*.jpg"))[:args.images] if folder.is_dir() else []
        if len(paths) < args.images:
            print(f"making {args.images} JPEGs of {args.megapixels} MP in {folder} ...", flush=True)
            paths = write_camera_jpegs(folder, args.images, args.megapixels)
        if len(list(folder.glob("*.jpg"))) != len(paths):
            raise SystemExit(f"{folder} holds other JPEGs; give --dir a folder of its own")
        model = model_folder(work, args.model)
        with Image.open(paths[0]) as im:
            size = f"{im.width}x{im.height} ({im.width * im.height / 1e6:.1f} MP)"
        print(f"machine: {describe_machine()}")
        print(f"{len(paths)} JPEGs, {size}, model {Path(model).name}\n")
        base_s = timed(idiomatic, paths, model, work / "idiomatic")
        print(f"  {'idiomatic script':<28} {len(paths) / base_s:7.2f} img/s  ({base_s:.1f} s)", flush=True)
        ok = True
        for backend in args.backends.split(","):
            out = work / f"ours_{backend}"
            seconds = timed(ours, folder, model, out, backend)
            ratio = base_s / seconds
            same = agreement(work / "idiomatic", out, paths)
            passed = ratio >= 3 and same >= 0.995
            ok &= passed
            print(f"  {f'visionzoo segment ({backend})':<28} {len(paths) / seconds:7.2f} img/s  ({seconds:.1f} s)  "
                  f"{ratio:5.2f}x the script; {same:.3%} of mask pixels equal  "
                  f"({'ok' if passed else 'MISSED'}: target >= 3x and >= 99.5%)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
