"""NMS speed: visionzoo's pure-PyTorch `nms` and `batched_nms` against torchvision's compiled operators.

    python benchmarks/nms_speed.py [--repeats 20] [--threads 2] [--reference-python PATH] [--json]

Boxes: N random boxes (top-left corners uniform in a 1000 x 1000 image, sides uniform in 1-101 px),
uniform scores, float32, IoU threshold 0.5; `batched_nms` with 80 classes drawn uniformly. Each
operation is timed --repeats times after warm-up and the median is reported, next to torchvision's
time on this kind of machine (the anchors in tests/fixtures/tasks/README.md) and the ratio.

With --reference-python (an interpreter with torchvision, e.g. /work/tvenv/bin/python), the same
boxes are also timed with torchvision's compiled operators, in a subprocess right after ours, and
the ratio to that measurement is printed too (the fair one on a busy machine); the script also
checks that both kept the same boxes in the same order. Target: at most 2x torchvision's time.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from visionzoo.ops import batched_nms, nms  # noqa: E402

# torchvision 0.29's compiled operators, 2 threads, median of 20 (tests/fixtures/tasks/README.md)
ANCHORS_MS = {("nms", 1000): 3.2, ("nms", 10000): 208.0, ("batched_nms", 1000): 1.1, ("batched_nms", 10000): 12.4}
SIZES = (1000, 10000)
CLASSES = 80
IOU = 0.5

REFERENCE = r"""
import json, statistics, sys, time
import numpy as np, torch
from torchvision.ops import batched_nms, nms
folder, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
out = {}
for n in (1000, 10000):
    d = np.load(f"{folder}/boxes_{n}.npz")
    b, s, c = (torch.from_numpy(d[k]) for k in ("boxes", "scores", "idxs"))
    for name, fn in (("nms", lambda: nms(b, s, 0.5)), ("batched_nms", lambda: batched_nms(b, s, c, 0.5))):
        kept = fn(); fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
        out[f"{name}/{n}"] = {"ms": 1e3 * statistics.median(times), "kept": kept.tolist()}
print(json.dumps(out))
"""


def random_boxes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 1000
    wh = torch.rand(n, 2, generator=g) * 100 + 1
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-python", help="an interpreter with torchvision, to time its operators too")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = {n: random_boxes(n) for n in SIZES}
    ops = {"nms": lambda b, s, c: nms(b, s, IOU), "batched_nms": lambda b, s, c: batched_nms(b, s, c, IOU)}
    ours, kept = {}, {}
    for name, op in ops.items():
        for n, (b, s, c) in data.items():
            ours[name, n] = median_ms(lambda op=op, b=b, s=s, c=c: op(b, s, c), args.repeats)
            kept[name, n] = op(b, s, c).tolist()

    reference = {}
    if args.reference_python:
        with tempfile.TemporaryDirectory() as folder:
            for n, (b, s, c) in data.items():
                np.savez(f"{folder}/boxes_{n}.npz", boxes=b.numpy(), scores=s.numpy(), idxs=c.numpy())
            proc = subprocess.run([args.reference_python, "-c", REFERENCE, folder, str(args.threads),
                                   str(args.repeats)], capture_output=True, text=True, check=True)
        reference = json.loads(proc.stdout.strip().splitlines()[-1])

    rows = []
    for (name, n), ms in ours.items():
        row = {"op": name, "boxes": n, "ours_ms": round(ms, 3), "anchor_ms": ANCHORS_MS[name, n],
               "ratio_to_anchor": round(ms / ANCHORS_MS[name, n], 3)}
        if reference:
            ref = reference[f"{name}/{n}"]
            row.update(torchvision_ms=round(ref["ms"], 3), ratio_to_torchvision=round(ms / ref["ms"], 3),
                       same_kept=ref["kept"] == kept[name, n])
        rows.append(row)
    if args.json:
        print(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=1))
        return
    print(f"NMS, float32, IoU {IOU}, {args.threads} threads, median of {args.repeats}")
    header = f"{'operation':<12} {'boxes':>6} {'ours ms':>9} {'anchor ms':>10} {'ratio':>6}"
    if reference:
        header += f" {'torchvision ms':>15} {'ratio':>6} {'same boxes':>10}"
    print(header)
    for r in rows:
        line = (f"{r['op']:<12} {r['boxes']:>6} {r['ours_ms']:>9.2f} {r['anchor_ms']:>10.1f} "
                f"{r['ratio_to_anchor']:>6.2f}")
        if reference:
            line += f" {r['torchvision_ms']:>15.2f} {r['ratio_to_torchvision']:>6.2f} {str(r['same_kept']):>10}"
        print(line)


if __name__ == "__main__":
    main()
