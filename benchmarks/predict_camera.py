"""End to end: classifying a folder of camera-size JPEGs, against the decoding bound and the old default.

    python benchmarks/predict_camera.py [--images 300] [--megapixels 12] [--noise 5] [--dir FOLDER] [--rounds 2]
                                        [--idiomatic]

The folder holds --images JPEGs of about --megapixels (quality 90), made from real photos
(scikit-image's and matplotlib's samples, augmented and upscaled, with sensor-like noise of
standard deviation --noise levels so that they are the size of camera files, about 3.3 MB at
12 MP, and as slow to decode; kept in --dir to reuse).
Compared in one process, rounds interleaved (each contestant once per round, the median
kept), each timed from its start to the last answer:
  decode bound   no model: the same files decoded at the same reduced scale (the fast path)
                 by one process per core, and, separately, decoded and preprocessed: what the
                 machine can feed a model at best;
  default        `visionzoo.predict(folder)` with EfficientNet-Lite0 and no flags: `auto` backend
                 and precision (measured once before the timing), the core budget, the fast path;
  old default    the same with the flags that were the default before: `backend="torch",
                 precision="fp32"`;
  idiomatic      (--idiomatic) what a user writes: Pillow full decode, `weights.transforms()`,
                 batches of 32, PyTorch eager under `torch.no_grad()`.
The float32 exact path (`fast=False`, torch fp32: torchvision's preprocessing exactly) runs
once for the reference top-1. It prints images/second, the ratios the project claims (the
default >= 75% of the decode bound (decoding alone), faster than the old default) and the top-1 agreement
of the default with the exact path (>= 99.5%).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionzoo  # noqa: E402
from tests.photos import write_camera_jpegs  # noqa: E402
from visionzoo.data.images import load_image  # noqa: E402
from visionzoo.data.loader import available_cpus, prepare_image  # noqa: E402
from visionzoo.runtime.backends import open_runner  # noqa: E402
from visionzoo.runtime.measure import describe_machine  # noqa: E402

MODEL = "efficientnet_lite0"
BATCH = 32


def idiomatic(paths: list[Path]) -> list[int]:
    weights = visionzoo.get_weights(MODEL)
    model = visionzoo.create_model(MODEL, weights=weights).eval()
    preprocess = weights.transforms()
    top1 = []
    for start in range(0, len(paths), BATCH):
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start:start + BATCH]])
        with torch.no_grad():
            top1 += model(batch).argmax(1).tolist()
    return top1


def ours(folder: Path, paths: list[Path], **settings) -> list[int]:
    results = visionzoo.predict(folder, model=MODEL, batch_size=BATCH, topk=1, **settings)
    by_path = {r.path: r.top[0].index for r in results}
    return [by_path[str(p)] for p in paths]


_TRANSFORM, _RESIZE = None, None  # a decoding process's preprocessing and reduced-scale target


def _decode(path: Path) -> int:
    return load_image(path, reduce_to=_RESIZE).width


def _decode_preprocess(path: Path) -> int:
    x, _, _ = prepare_image(path, _TRANSFORM, reduce_to=_RESIZE)
    return 0 if x is None else 1


def _init_worker() -> None:
    global _TRANSFORM, _RESIZE
    torch.set_num_threads(1)
    preprocess = visionzoo.get_weights(MODEL).preprocess
    _TRANSFORM, _RESIZE = preprocess.transforms(), preprocess.resize_size


def decode_bound(paths: list[Path], preprocess: bool) -> list[int]:
    """Every file decoded at the fast path's reduced scale (and preprocessed), one process per core."""
    with mp.get_context("fork").Pool(available_cpus(), initializer=_init_worker) as pool:
        return pool.map(_decode_preprocess if preprocess else _decode, paths, chunksize=4)


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--noise", type=float, default=5.0, help="sensor-like noise (0: smooth, small files)")
    parser.add_argument("--dir", type=Path, default=None, help="where the JPEGs are made (and reused)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the median is kept)")
    parser.add_argument("--idiomatic", action="store_true", help="also time the idiomatic script (slow)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / "photos"
        os.environ.setdefault("TORCH_HOME", str(Path(tmp) / "torch_home"))
        paths = sorted(folder.glob("photo_*.jpg"))[:args.images] if folder.is_dir() else []
        if len(paths) < args.images:
            print(f"making {args.images} JPEGs of {args.megapixels} MP in {folder} ...", flush=True)
            paths = write_camera_jpegs(folder, args.images, args.megapixels, noise=args.noise)
        if folder.is_dir() and len(list(folder.glob("photo_*.jpg"))) > len(paths):
            folder = Path(tmp) / "subset"  # predict takes the folder: give it exactly these files
            folder.mkdir(exist_ok=True)
            for p in paths:
                (folder / p.name).symlink_to(p.resolve())
            paths = sorted(folder.glob("photo_*.jpg"))
        with Image.open(paths[0]) as im:
            size = (f"{im.width}x{im.height} ({im.width * im.height / 1e6:.1f} MP, "
                    f"{statistics.mean(p.stat().st_size for p in paths) / 1e6:.2f} MB on average)")
        print(f"machine: {describe_machine()}")
        runner = open_runner(MODEL, threads=1)  # auto measured now (once, cached), not in the timings
        print(f"{len(paths)} JPEGs, {size}, {MODEL}, batch {BATCH}, {available_cpus()} cores, {args.rounds} "
              f"interleaved rounds")
        if runner.choice is not None:
            print(runner.choice.summary())
        _, exact = timed(ours, folder, paths, backend="torch", precision="fp32", fast=False)
        contestants = {
            "decode bound": lambda: decode_bound(paths, preprocess=False),
            "decode + preprocess bound": lambda: decode_bound(paths, preprocess=True),
            "default": lambda: ours(folder, paths),
            "old default (torch fp32)": lambda: ours(folder, paths, backend="torch", precision="fp32"),
        }
        if args.idiomatic:
            contestants["idiomatic script"] = lambda: idiomatic(paths)
        seconds: dict[str, list[float]] = {k: [] for k in contestants}
        answers = {}
        for _ in range(args.rounds):
            for name, fn in contestants.items():
                s, answers[name] = timed(fn)
                seconds[name].append(s)
        speed = {k: len(paths) / statistics.median(v) for k, v in seconds.items()}
        print()
        for name, v in speed.items():
            print(f"  {name:<28} {v:7.2f} img/s  (rounds: {', '.join(f'{len(paths) / s:.2f}' for s in seconds[name])})")
        agree = sum(a == b for a, b in zip(answers["default"], exact, strict=True)) / len(paths)
        checks = [("default / decode bound", speed["default"] / speed["decode bound"], 0.75),
                  ("default / old default", speed["default"] / speed["old default (torch fp32)"], 1.0),
                  ("default top-1 agreement with the exact path", agree, 0.995)]
        print(f"  (default / decode + preprocess bound: {speed['default'] / speed['decode + preprocess bound']:.3f})")
        ok = True
        for label, value, target in checks:
            passed = value >= target
            ok &= passed
            print(f"  {label:<48} {value:6.3f}  (target >= {target}: {'ok' if passed else 'MISSED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
