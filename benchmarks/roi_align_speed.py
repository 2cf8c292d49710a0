"""MultiScaleRoIAlign speed: ours (plain PyTorch) against torchvision's compiled operator.

The setting of the speed anchors in tests/fixtures/tasks/README.md: 1,000 boxes pooled from the
FPN levels P2-P5 (256 channels, float32) of one 800x1216 image, 7x7 and 14x14 bins with sampling
ratio 2, 2 threads, median of repeated runs. The boxes are fixed-seed proposals: centres uniform
over the image, sides log-uniform from 8 to 800 px, clipped to the image, so every level gets
some. Prints our median, torchvision's anchor from the README and the ratio. With
`--reference-python` (an interpreter that has torchvision) torchvision's `MultiScaleRoIAlign`
runs on the same inputs in a subprocess, its calls alternating with ours so that a busy machine
slows both alike; both medians are printed side by side with the largest difference of the
pooled values, and the target is judged against that measurement.

    python benchmarks/roi_align_speed.py [--boxes 1000] [--repeats 20] [--threads 2]
        [--reference-python /work/tvenv/bin/python]
"""
from __future__ import annotations

import argparse
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


class Runner:
    """One pooler per setting on fixed inputs; `run(size)` times one call. Torch and numpy only:
    this class also runs under the reference interpreter."""

    def __init__(self, pooler_class: type, inputs: dict[str, np.ndarray]):
        self.features = {name: torch.from_numpy(inputs[name]) for name in LEVELS}
        self.boxes = [torch.from_numpy(inputs["boxes"])]
        self.poolers = {size: pooler_class(list(LEVELS), size, ratio) for size, ratio in SETTINGS}
        self.outputs: dict[str, np.ndarray] = {}

    def run(self, size: int) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.poolers[size](self.features, self.boxes, [IMAGE])
            elapsed = time.perf_counter() - start
        self.outputs[f"out_{size}"] = out.contiguous().numpy()
        return elapsed


def _serve_reference(workdir: Path, threads: int) -> None:
    """Run by the reference interpreter: one timed call of torchvision's pooler per line of stdin
    (the output size), answered with its seconds; the outputs are saved at the end."""
    from torchvision.ops import MultiScaleRoIAlign as TorchvisionPooler

    torch.set_num_threads(threads)
    runner = Runner(TorchvisionPooler, dict(np.load(workdir / "inputs.npz")))
    print(torch.__version__, flush=True)
    for line in sys.stdin:
        print(runner.run(int(line)), flush=True)
    np.savez(workdir / "reference.npz", **runner.outputs)


class _Reference:
    """The reference interpreter serving `_serve_reference`."""

    def __init__(self, python: str, inputs: dict[str, np.ndarray], workdir: Path, threads: int):
        self.workdir = workdir
        np.savez(workdir / "inputs.npz", **inputs)
        self.proc = subprocess.Popen([python, __file__, "--as-reference", str(workdir), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.torch_version = self.proc.stdout.readline().strip()
        if not self.torch_version:
            sys.exit(f"{python} did not start the reference (is torchvision installed there?)")

    def run(self, size: int) -> float:
        self.proc.stdin.write(f"{size}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> dict[str, np.ndarray]:
        self.proc.stdin.close()
        self.proc.wait()
        return dict(np.load(self.workdir / "reference.npz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-python", help="an interpreter with torchvision, timed side by side")
    parser.add_argument("--as-reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_reference:
        _serve_reference(args.as_reference, args.threads)
        return

    from visionzoo.ops import MultiScaleRoIAlign

    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.boxes)
    runners = {"ours": Runner(MultiScaleRoIAlign, inputs)}
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.reference_python:
            runners["torchvision"] = _Reference(args.reference_python, inputs, Path(tmp), args.threads)
        for i in range(args.warmup + args.repeats):
            for size, _ in SETTINGS:
                for name in (list(runners) if i % 2 == 0 else list(runners)[::-1]):  # neither always first
                    elapsed = runners[name].run(size)
                    if i >= args.warmup:
                        times.setdefault((name, size), []).append(elapsed)
        reference_outputs = runners["torchvision"].close() if args.reference_python else {}

    h, w = IMAGE
    header = (f"MultiScaleRoIAlign, {args.boxes} boxes, {h}x{w} image, P2-P5 x {CHANNELS} ch, float32, "
              f"{args.threads} threads, median of {args.repeats}; torch {torch.__version__}")
    if args.reference_python:
        header += f", reference torch {runners['torchvision'].torch_version}"
    print(header)
    ratios = []
    for size, ratio in SETTINGS:
        ms = 1e3 * statistics.median(times[("ours", size)])
        line = (f"  {size}x{size}, sampling {ratio}: ours {ms:7.1f} ms | anchor {ANCHORS_MS[size]:5.0f} ms "
                f"(x{ms / ANCHORS_MS[size]:.2f})")
        if args.reference_python:
            ref_ms = 1e3 * statistics.median(times[("torchvision", size)])
            diff = float(np.abs(runners["ours"].outputs[f"out_{size}"] - reference_outputs[f"out_{size}"]).max())
            line += f" | torchvision here {ref_ms:7.1f} ms (x{ms / ref_ms:.2f}), max |diff| {diff:.1e}"
            ratios.append(ms / ref_ms)
        else:
            ratios.append(ms / ANCHORS_MS[size])
        print(line)
    judged = "measured here" if args.reference_python else "the anchors"
    print(f"target: at most x{TARGET_RATIO:g} torchvision's time ({judged}): "
          f"{'met' if max(ratios) <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
