"""MultiScaleRoIAlign speed: ours (plain PyTorch) against torchvision's compiled operator.

The setting of the speed anchors in tests/fixtures/tasks/README.md: 1,000 boxes pooled from the
FPN levels P2-P5 (256 channels, float32) of one 800x1216 image, 7x7 and 14x14 bins with sampling
ratio 2, 2 threads, median of repeated runs. The boxes are fixed-seed proposals: centres uniform
over the image, sides log-uniform from 8 to 800 px, clipped to the image, so every level gets
some. Prints our median, torchvision's anchor from the README and the ratio; with
`--reference-python` (an interpreter that has torchvision) also times torchvision's
`MultiScaleRoIAlign` on the same inputs in a subprocess and prints both side by side with the
largest difference of the pooled values.

    python benchmarks/roi_align_speed.py [--boxes 1000] [--repeats 20] [--threads 2]
        [--reference-python /work/tvenv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

IMAGE = (800, 1216)
LEVELS = {"0": 4, "1": 8, "2": 16, "3": 32}  # P2-P5: name -> stride
CHANNELS = 256
SETTINGS = ((7, 2), (14, 2))  # (output size, sampling ratio)
ANCHORS_MS = {7: 257.0, 14: 721.0}  # torchvision 0.29, README of tests/fixtures/tasks
TARGET_RATIO = 2.0


def make_inputs(num_boxes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = IMAGE
    inputs = {name: rng.standard_normal((1, CHANNELS, h // s, w // s), dtype=np.float32)
              for name, s in LEVELS.items()}
    centre = rng.uniform((0, 0), (w, h), (num_boxes, 2))
    sides = np.exp(rng.uniform(np.log(8), np.log(800), (num_boxes, 2)))
    boxes = np.concatenate([centre - sides / 2, centre + sides / 2], 1).clip(0, (w, h, w, h))
    inputs["boxes"] = boxes.astype(np.float32)
    return inputs


def time_pooler(pooler_class: type, inputs: dict[str, np.ndarray], repeats: int, warmup: int = 2
                ) -> dict[str, object]:
    """Median milliseconds and the pooled values of `pooler_class` at each setting (this function
    also runs under the reference interpreter: torch and numpy only)."""
    features = {name: torch.from_numpy(inputs[name]) for name in LEVELS}
    boxes = [torch.from_numpy(inputs["boxes"])]
    result: dict[str, object] = {}
    with torch.inference_mode():
        for size, ratio in SETTINGS:
            pooler = pooler_class(list(LEVELS), size, ratio)
            for _ in range(warmup):
                out = pooler(features, boxes, [IMAGE])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = pooler(features, boxes, [IMAGE])
                times.append(time.perf_counter() - start)
            result[f"ms_{size}"] = 1e3 * statistics.median(times)
            result[f"out_{size}"] = out.contiguous().numpy()
    return result


def _as_reference(workdir: Path, repeats: int, threads: int) -> None:
    """Run by the reference interpreter: time torchvision's pooler, save its outputs."""
    from torchvision.ops import MultiScaleRoIAlign as TorchvisionPooler

    torch.set_num_threads(threads)
    found = time_pooler(TorchvisionPooler, dict(np.load(workdir / "inputs.npz")), repeats)
    np.savez(workdir / "reference.npz", **{k: v for k, v in found.items() if k.startswith("out_")})
    print(json.dumps({"torch": torch.__version__, **{k: v for k, v in found.items() if k.startswith("ms_")}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-python", help="an interpreter with torchvision, timed side by side")
    parser.add_argument("--as-reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_reference:
        _as_reference(args.as_reference, args.repeats, args.threads)
        return

    from visionzoo.ops import MultiScaleRoIAlign

    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.boxes)
    ours = time_pooler(MultiScaleRoIAlign, inputs, args.repeats)
    reference: dict[str, object] = {}
    if args.reference_python:
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "inputs.npz", **inputs)
            proc = subprocess.run([args.reference_python, __file__, "--as-reference", tmp, "--repeats",
                                   str(args.repeats), "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"the reference run failed:\n{proc.stderr}")
            reference = json.loads(proc.stdout.strip().splitlines()[-1])
            reference.update(np.load(Path(tmp) / "reference.npz"))

    h, w = IMAGE
    print(f"MultiScaleRoIAlign, {args.boxes} boxes, {h}x{w} image, P2-P5 x {CHANNELS} ch, float32, "
          f"{args.threads} threads, median of {args.repeats}; torch {torch.__version__}")
    worst = 0.0
    for size, ratio in SETTINGS:
        ms = ours[f"ms_{size}"]
        line = (f"  {size}x{size}, sampling {ratio}: ours {ms:7.1f} ms | anchor {ANCHORS_MS[size]:5.0f} ms "
                f"(x{ms / ANCHORS_MS[size]:.2f})")
        worst = max(worst, ms / ANCHORS_MS[size])
        if reference:
            ref_ms = reference[f"ms_{size}"]
            diff = float(np.abs(ours[f"out_{size}"] - reference[f"out_{size}"]).max())
            line += f" | torchvision here {ref_ms:7.1f} ms (x{ms / ref_ms:.2f}), max |diff| {diff:.1e}"
            worst = max(worst, ms / ref_ms)
        print(line)
    print(f"target: at most x{TARGET_RATIO:g} torchvision's time: {'met' if worst <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
