"""End to end: segmenting a folder of camera-size JPEGs, idiomatic script vs `visionzoo segment`.

    python benchmarks/segment_camera.py [--images 100] [--megapixels 12] [--dir FOLDER] [--model NAME]

The model and the photos, in this order of preference:
  - `--model` (a name, bundle or .onnx file) on camera JPEGs of about --megapixels (quality 90)
    made from real photos (scikit-image's and matplotlib's samples, augmented and upscaled);
  - torchvision's LR-ASPP MobileNetV3-Large (21 VOC classes, 520-pixel recipe) on those JPEGs,
    when its weights are cached or can be downloaded;
  - offline, where the only weights at hand are EfficientNet-Lite0's: LR-ASPP on EfficientNet-Lite0
    fine-tuned here on the generated shapes (`tests/shapes.py`, the acceptance test's recipe, a few
    minutes; kept in --dir), on camera-size JPEGs of shapes painted onto the same photos. (A head
    left random would do: both sides compute the same masks, but a random head draws class
    boundaries everywhere, where no model of a real task does, and the comparison of masks says
    nothing then.)
Everything made is kept in --dir to reuse. Compared in one process, each timed from model
creation to the last file written:
  idiomatic   what a user writes: Pillow full decode, the weights' preprocessing (shorter side
              to the recipe's size, normalise), the model in eager PyTorch under `torch.no_grad()`
              one image at a time (sizes differ), the scores upsampled to the image's size
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
from tests.shapes import RECIPE, write_shapes  # noqa: E402
from visionzoo.errors import WeightsUnavailableError  # noqa: E402
from visionzoo.runtime.measure import describe_machine  # noqa: E402
from visionzoo.tasks.segment import PALETTE, Segmentation  # noqa: E402

PUBLISHED = "lraspp_mobilenet_v3_large"


def prepare(folder: Path, args) -> tuple[str, Path, list[Path]]:
    """(model, folder of JPEGs, the JPEGs): see the module docstring."""
    model = args.model
    if model is None:
        try:
            visionzoo.create_model(PUBLISHED, weights="DEFAULT")
            model = PUBLISHED
        except WeightsUnavailableError as e:
            print(f"({PUBLISHED}: {str(e).splitlines()[0][:90]}...; offline: LR-ASPP on EfficientNet-Lite0 "
                  f"fine-tuned on the shapes)", flush=True)
    if model is not None:
        photos = folder / "photos"
        paths = sorted(photos.glob("photo_*.jpg"))[:args.images] if photos.is_dir() else []
        if len(paths) < args.images:
            print(f"making {args.images} JPEGs of {args.megapixels} MP in {photos} ...", flush=True)
            paths = write_camera_jpegs(photos, args.images, args.megapixels)
        return model, photos, paths
    bundle = folder / "shapes_model" / "bundle"
    if not bundle.is_dir():
        print(f"fine-tuning LR-ASPP on EfficientNet-Lite0 on the shapes (kept in {bundle}) ...", flush=True)
        train = write_shapes(folder / "shapes_train", 160, seed=0, size=(128, 128))
        visionzoo.finetune(train, folder / "shapes_model", progress=False, **RECIPE)
    photos = folder / "shapes_camera" / "images"
    paths = sorted(photos.glob("*.jpg"))[:args.images] if photos.is_dir() else []
    if len(paths) < args.images:
        side = round((args.megapixels * 1e6 / 12) ** 0.5)  # 4:3
        print(f"making {args.images} JPEGs of shapes on photos, {4 * side}x{3 * side}, in {photos} ...", flush=True)
        write_shapes(photos.parent, args.images, seed=2, size=(4 * side, 3 * side))
        paths = sorted(photos.glob("*.jpg"))
    return str(bundle), photos, paths


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
        os.environ.setdefault("TORCH_HOME", str(work / "torch_home"))
        model, folder, paths = prepare(args.dir or work, args)
        if len(list(folder.glob("*.jpg"))) != len(paths):
            raise SystemExit(f"{folder} holds other JPEGs than the {len(paths)} asked for; give --dir a folder of "
                             f"its own or the same --images")
        with Image.open(paths[0]) as im:
            size = f"{im.width}x{im.height} ({im.width * im.height / 1e6:.1f} MP)"
        print(f"machine: {describe_machine()}")
        print(f"{len(paths)} JPEGs, {size}, model {model}\n")
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
