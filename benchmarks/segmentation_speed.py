"""Per-image latency of the segmentation models against torchvision's eager models.

    python benchmarks/segmentation_speed.py [--models fcn_resnet50,lraspp_mobilenet_v3_large]
        [--repeats 10] [--threads 2] [--reference-python /work/tvenv/bin/python]

One 1 x 3 x 520 x 693 float32 image (a 500 x 375 VOC photo after torchvision's evaluation
resize to a 520-pixel shorter side), eval mode, `torch.no_grad()`, 2 compute threads;
milliseconds per image, the median of the repeats. Each model is built as its published
weights are (auxiliary head on where they have one) with random values: speed does not
depend on them. Printed beside ours:
torchvision's anchor figures (tests/fixtures/tasks/README.md: torchvision 0.29, torch
2.14.1, an AVX-512 EPYC with 2 threads) and, with --reference-python (an interpreter with
torchvision), torchvision's eager model timed on the same input in a worker process, its
runs alternating with ours so that a machine that speeds up or slows down affects both
alike. CPU time (the process's, all threads) is shown too: on a machine shared with other
work it moves less than the wall clock. Run the script with the reference interpreter itself
(it needs only torch and numpy) to compare on the same torch version. Exit status 1 when
ours is slower than torchvision's by more than --tolerance.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from visionzoo.deploy.measure import describe_machine  # noqa: E402

from visionzoo.data.loader import available_cpus  # noqa: E402
from visionzoo.models import segmentation  # noqa: E402

MODELS = ("fcn_resnet50", "lraspp_mobilenet_v3_large")
ANCHORS_MS = {"fcn_resnet50": 2297.0, "lraspp_mobilenet_v3_large": 104.0}
SHAPE = (1, 3, 520, 693)

# Runs in the reference interpreter: builds torchvision's model as its DEFAULT weights build
# it (aux head on for FCN/DeepLabV3), then answers each "run" line on stdin with the seconds
# one forward took.
WORKER = r"""
import json, sys, time, torch, torchvision
name, threads, shape = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
kwargs = {} if name.startswith("lraspp") else {"aux_loss": True}
net = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs).eval()
x = torch.randn(*shape)
print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__}), flush=True)
with torch.no_grad():
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start, cpu = time.perf_counter(), time.process_time()
        net(x)
        print(time.perf_counter() - start, time.process_time() - cpu, flush=True)
"""


class Reference:
    """torchvision's eager model in a worker process; `run()` times one forward there."""

    def __init__(self, python: str, name: str, threads: int):
        self.proc = subprocess.Popen([python, "-c", WORKER, name, str(threads), json.dumps(SHAPE)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.versions = json.loads(self._line())

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference worker exited (status {self.proc.wait()}); is torchvision installed?")
        return line

    def run(self) -> tuple[float, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        wall, cpu = self._line().split()
        return float(wall), float(cpu)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def time_ours(net: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one forward."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        net(x)
    return time.perf_counter() - start, time.process_time() - cpu


def measure(name: str, x: torch.Tensor, repeats: int, warmup: int, reference_python: str | None,
            threads: int) -> tuple[dict[str, list[tuple[float, float]]], dict[str, str]]:
    torch.manual_seed(0)
    net = segmentation.MODEL_CLASS(segmentation.VARIANTS[name]).eval()
    contestants = {"visionzoo": lambda: time_ours(net, x)}
    reference = None
    if reference_python:
        reference = Reference(reference_python, name, threads)
        contestants["torchvision eager"] = reference.run
    try:
        for _ in range(warmup):
            for fn in contestants.values():
                fn()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in contestants}
        for i in range(repeats):
            order = list(contestants) if i % 2 == 0 else list(reversed(contestants))  # neither always first
            for k in order:
                times[k].append(contestants[k]())
    finally:
        if reference is not None:
            reference.close()
    return times, (reference.versions if reference else {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-python", default=None,
                        help="an interpreter with torchvision, to time its eager models side by side")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="allowed excess of our time over torchvision's (timing noise), as a fraction")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))
    print(f"machine: {describe_machine(args.threads)}")
    if args.threads > available_cpus():
        print(f"warning: {args.threads} threads on {available_cpus()} available CPUs")
    print(f"{'x'.join(map(str, SHAPE))} float32, eval, no_grad; ms per image, median of {args.repeats} "
          f"alternating runs\n")
    ok, figures = True, {}
    for name in args.models.split(","):
        times, versions = measure(name, x, args.repeats, args.warmup, args.reference_python, args.threads)
        ms = {k: 1000 * statistics.median(wall for wall, _ in v) for k, v in times.items()}
        cpu_ms = {k: 1000 * statistics.median(cpu for _, cpu in v) for k, v in times.items()}
        figures[name] = {"ms": ms, "cpu_ms": cpu_ms, "anchor_ms": ANCHORS_MS.get(name),
                         "reference_versions": versions}
        print(name)
        print(f"  {'visionzoo':<34} {ms['visionzoo']:9,.0f} ms   (CPU {cpu_ms['visionzoo']:,.0f} ms; "
              f"torch {torch.__version__})")
        if "torchvision eager" in ms:
            print(f"  {'torchvision eager, same machine':<34} {ms['torchvision eager']:9,.0f} ms   "
                  f"(CPU {cpu_ms['torchvision eager']:,.0f} ms; torch {versions['torch']}, "
                  f"torchvision {versions['torchvision']})")
        if name in ANCHORS_MS:
            print(f"  {'torchvision anchor (README)':<34} {ANCHORS_MS[name]:9,.0f} ms   (AVX-512 EPYC, 2 threads)")
            print(f"  {'visionzoo / anchor':<34} {ms['visionzoo'] / ANCHORS_MS[name]:9.2f}x  time "
                  f"(another machine: indicative only)")
        if "torchvision eager" in ms:
            ratio = ms["visionzoo"] / ms["torchvision eager"]
            passed = ratio <= 1 + args.tolerance
            ok &= passed
            print(f"  {'visionzoo / torchvision eager':<34} {ratio:9.2f}x  time, "
                  f"{cpu_ms['visionzoo'] / cpu_ms['torchvision eager']:.2f}x CPU "
                  f"(target <= 1.0, noise allowance {args.tolerance:.0%}: {'ok' if passed else 'MISSED'})")
        print(flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(args.threads), "shape": SHAPE,
                                         "models": figures}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
