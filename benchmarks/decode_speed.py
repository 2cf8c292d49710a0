"""Decode + preprocess throughput on 12-megapixel JPEGs: a naive Pillow pipeline vs visionzoo's.

    python benchmarks/decode_speed.py [--megapixels 12] [--rounds 3] [--workers N]

The inputs are real photos (scikit-image's and matplotlib's samples) upscaled to about
12 MP and saved as JPEG (quality 90), as a phone would. Compared, one process each:
  naive  full decode, convert to RGB, resize the shorter side, centre crop, normalise
         (what torchvision's preset does with Pillow);
  exact  visionzoo's exact path (fast=False): the same work through our code;
  fast   visionzoo's fast path: reduced-scale JPEG decoding (draft mode), then the exact resize;
and the fast path through the full pipeline with DataLoader workers (`image_batches`).
Then the default model classifies every image through the exact and the fast path and
the top-1 classes are compared.
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionzoo  # noqa: E402
from tests.photos import sample_image  # noqa: E402
from visionzoo.data.images import load_image  # noqa: E402
from visionzoo.data.loader import available_cpus, image_batches  # noqa: E402

PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "grace_hopper.jpg"]


def make_inputs(folder: Path, megapixels: float) -> list[Path]:
    paths = []
    for name in PHOTOS:
        img = Image.open(sample_image(name)).convert("RGB")
        scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
        big = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        path = folder / (Path(name).stem + ".jpg")
        big.save(path, quality=90)
        paths.append(path)
    return paths


def naive(path: Path, p) -> torch.Tensor:
    """Full decode, resize, crop, normalise: Pillow and numpy only."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(p.resize_size * long / short)
    size = (p.resize_size, new_long) if w <= h else (new_long, p.resize_size)
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[p.interpolation]
    img = img.resize(size, resample)
    left, top = int(round((img.width - p.crop_size) / 2)), int(round((img.height - p.crop_size) / 2))
    img = img.crop((left, top, left + p.crop_size, top + p.crop_size))
    x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    x = (x - np.array(p.mean, np.float32)[:, None, None]) / np.array(p.std, np.float32)[:, None, None]
    return torch.from_numpy(x)


def throughput(fn, paths: list[Path], rounds: int) -> float:
    fn(paths[0])  # warm-up (imports, first allocations)
    start = time.perf_counter()
    for _ in range(rounds):
        for path in paths:
            fn(path)
    return rounds * len(paths) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: spare cores)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # decoding is the subject; keep the comparison single-core

    model = visionzoo.create_model(visionzoo.DEFAULT_MODEL, pretrained=True)
    p = model.preprocess
    transform = p.transforms()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_inputs(Path(tmp), args.megapixels)
        sizes = ", ".join(f"{Image.open(q).width}x{Image.open(q).height}" for q in paths)
        print(f"{len(paths)} JPEGs of ~{args.megapixels:g} MP ({sizes}); recipe: {p.describe()}")
        print(f"machine: {available_cpus()} CPU cores available, torch threads 1, Pillow {Image.__version__}")

        rates = {
            "naive Pillow (full decode)": throughput(lambda q: naive(q, p), paths, args.rounds),
            "visionzoo exact (fast=False)": throughput(lambda q: transform(load_image(q)), paths, args.rounds),
            "visionzoo fast (draft decode)": throughput(
                lambda q: transform(load_image(q, reduce_to=p.resize_size)), paths, args.rounds),
        }
        workers = args.workers
        many = paths * max(args.rounds, 4)
        list(image_batches(paths[:2], p, batch_size=2, num_workers=0))  # warm-up
        start = time.perf_counter()
        n = sum(len(b.indices) for b in image_batches(many, p, batch_size=8, num_workers=workers))
        rates[f"visionzoo fast, DataLoader ({'auto' if workers is None else workers} workers)"] = (
            n / (time.perf_counter() - start))
        base = rates["naive Pillow (full decode)"]
        print(f"\n{'pipeline':<46} {'images/s':>9} {'vs naive':>9}")
        for name, rate in rates.items():
            print(f"{name:<46} {rate:9.2f} {rate / base:8.2f}x")

        exact = torch.stack([transform(load_image(q)) for q in paths])
        fast = torch.stack([transform(load_image(q, reduce_to=p.resize_size)) for q in paths])
        naive_x = torch.stack([naive(q, p) for q in paths])
        with torch.inference_mode():
            top_exact = model(exact).argmax(1).tolist()
            top_fast = model(fast).argmax(1).tolist()
        print(f"\nnaive vs exact preprocessing: max |diff| {float((naive_x - exact).abs().max()):.2e}")
        print(f"fast vs exact preprocessing:  mean |diff| {float((fast - exact).abs().mean()):.4f} "
              f"(normalised units)")
        agree = 0
        for q, a, b in zip(paths, top_exact, top_fast, strict=True):
            agree += a == b
            print(f"  {q.name:<22} exact: {model.categories[a]:<20} fast: {model.categories[b]:<20}"
                  f"{'same' if a == b else 'DIFFERENT'}")
        print(f"top-1 agreement: {agree}/{len(paths)}")
        speedup = rates["visionzoo fast (draft decode)"] / base
        ok = agree == len(paths) and speedup >= 3
        print(f"\nsingle-process speed-up of the fast path over naive: {speedup:.2f}x "
              f"({'meets' if ok else 'MISSES'} the >= 3x, same top-1 target)")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
