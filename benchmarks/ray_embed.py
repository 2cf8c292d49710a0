"""`--engine ray` throughput against the local `embed`, at the same thread count: the engine's overhead.

    python benchmarks/ray_embed.py [--images 800] [--threads 1] [--model efficientnet_lite0] [--json]

Both embed the same generated folder (camera-like JPEGs, 640 x 480) with the same model, batch
size and compute threads. Local: `visionzoo.embed` with one decoding worker process and the
model in this process. Ray: a local Ray instance with `threads + 1` CPUs, the same shape (one
model actor with `threads` threads, decoding tasks on the other CPU), writing Parquet. Each engine
first runs once on a few images (imports, worker processes, the model's first call), then the
whole folder is timed, model loading included; starting the Ray instance is timed apart, as the
fixed cost it is. Prints images per second of each and the ratio (the target: >= 0.8).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import visionzoo  # noqa: E402


def make_images(folder: Path, n: int) -> Path:
    """Smooth random 640 x 480 JPEGs (quality 90): decoding costs what a photo's does."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ray-embed-"))
    try:
        folder = make_images(work / "images", args.images)
        warm = sorted(folder.iterdir())[:2 * args.batch_size]
        settings = {"threads": args.threads, "batch_size": args.batch_size}

        visionzoo.embed(warm, args.model, num_workers=1, **settings)
        start = time.perf_counter()
        local = visionzoo.embed(folder, args.model, num_workers=1, **settings)
        local_s = time.perf_counter() - start

        import ray

        from visionzoo.tasks.ray_engine import run_on_ray

        start = time.perf_counter()
        src = str(Path(__file__).resolve().parents[1] / "src")
        ray.init(num_cpus=args.threads + 1, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [
                     src, os.environ.get("PYTHONPATH")]))}})
        init_s = time.perf_counter() - start
        run_on_ray(warm, args.model, out=work / "warm.parquet", embed=True, workers=1, **settings)
        start = time.perf_counter()
        run = run_on_ray([folder], args.model, out=work / "emb.parquet", embed=True, workers=1, **settings)
        ray_s = time.perf_counter() - start
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    assert len(local.paths) == run.added == args.images
    figures = {"images": args.images, "threads": args.threads, "model": args.model,
               "local_images_per_s": args.images / local_s, "ray_images_per_s": args.images / ray_s,
               "ratio": local_s / ray_s, "ray_init_s": init_s, "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{args.images} images, {args.model}, {args.threads} thread(s), batch {args.batch_size}")
    print(f"local embed      {figures['local_images_per_s']:7.1f} images/s  ({local_s:.1f} s)")
    print(f"--engine ray     {figures['ray_images_per_s']:7.1f} images/s  ({ray_s:.1f} s; starting Ray: "
          f"{init_s:.1f} s more)")
    print(f"ratio (ray / local): {figures['ratio']:.2f}x")


if __name__ == "__main__":
    main()
