"""End to end: classifying a folder of camera-size JPEGs, idiomatic script vs `visionzoo predict`.

    python benchmarks/predict_camera.py [--images 300] [--megapixels 12] [--dir FOLDER]

The folder holds --images JPEGs of about --megapixels (quality 90), made from real photos
(scikit-image's and matplotlib's samples, augmented and upscaled; kept in --dir to reuse).
Compared in one process, each timed from model creation to the last answer:
  idiomatic   what a user writes: Pillow full decode, the weights' preprocessing
              (`weights.transforms()`), batches of 32, PyTorch eager under `torch.no_grad()`;
  visionzoo   `visionzoo.predict(folder)` with EfficientNet-Lite0: decoding workers, the
              reduced-scale JPEG decode, and the chosen backend (default and each runtime).
It prints images/second, the ratio to the idiomatic script (target >= 3), and how many
images get a different top-1 than the idiomatic script (target: none).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionzoo  # noqa: E402
from tests.photos import write_camera_jpegs  # noqa: E402
from visionzoo.runtime.backends import installed_backends  # noqa: E402
from visionzoo.runtime.measure import describe_machine  # noqa: E402

MODEL = "efficientnet_lite0"


def idiomatic(paths: list[Path], batch_size: int = 32) -> list[int]:
    weights = visionzoo.get_weights(MODEL)
    model = visionzoo.create_model(MODEL, weights=weights).eval()
    preprocess = weights.transforms()
    top1 = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
        with torch.no_grad():
            top1 += model(batch).argmax(1).tolist()
    return top1


def ours(folder: Path, paths: list[Path], backend: str) -> list[int]:
    results = visionzoo.predict(folder, model=MODEL, batch_size=32, topk=1, backend=backend)
    by_path = {r.path: r.top[0].index for r in results}
    return [by_path[str(p)] for p in paths]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--dir", type=Path, default=None, help="where the JPEGs are made (and reused)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / "photos"
        os.environ.setdefault("TORCH_HOME", str(Path(tmp) / "torch_home"))
        paths = sorted(folder.glob("photo_*.jpg"))[:args.images] if folder.is_dir() else []
        if len(paths) < args.images:
            print(f"making {args.images} JPEGs of {args.megapixels} MP in {folder} ...", flush=True)
            paths = write_camera_jpegs(folder, args.images, args.megapixels)
        with Image.open(paths[0]) as im:
            size = f"{im.width}x{im.height}"
        print(f"machine: {describe_machine()}")
        print(f"{len(paths)} JPEGs, {size} ({im.width * im.height / 1e6:.1f} MP), {MODEL}, batch 32\n")
        base_s, reference = timed(idiomatic, paths)
        print(f"  {'idiomatic script':<28} {len(paths) / base_s:7.2f} img/s  ({base_s:.1f} s)", flush=True)
        ok = True
        for backend in ["auto"] + [b.value for b in installed_backends()][1:]:
            seconds, top1 = timed(ours, folder, paths, backend)
            ratio = base_s / seconds
            differ = sum(a != b for a, b in zip(reference, top1, strict=True))
            passed = ratio >= 3 and differ == 0
            ok &= passed
            print(f"  {f'visionzoo predict ({backend})':<28} {len(paths) / seconds:7.2f} img/s  ({seconds:.1f} s)  "
                  f"{ratio:5.2f}x the script; top-1 differs on {differ}/{len(paths)} images  "
                  f"({'ok' if passed else 'MISSED'}: target >= 3x and 0)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
