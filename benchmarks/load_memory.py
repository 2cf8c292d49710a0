"""Peak memory of building a pre-trained model from a local safetensors file.

    python benchmarks/load_memory.py [MODEL] [--workdir DIR] [--json]

MODEL defaults to vit_l_16. The script saves MODEL's randomly initialised weights as
`<workdir>/<MODEL>-<writer>.safetensors` (once), then measures the peak resident memory (max RSS)
of fresh Python processes that each do one thing:

- baseline: import torch and visionzoo, nothing else;
- lean:     `visionzoo.create_model(MODEL, weights=<file>)` (meta-device build, parameters
            assigned from the memory-mapped file); then, as "lean, weights touched", the
            same after reading every parameter once (all of the file's pages resident);
- naive:    build the model (random init), read the file with safetensors.torch.load_file,
            `load_state_dict` (what the usual build-then-load code does).

The acceptance bound is lean <= 1.3 x the file size; the exit code is 1 if it is exceeded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND = 1.3

_PRELUDE = """
import resource, sys
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
import torch, visionzoo
"""
SCRIPTS = {
    "prepare": """
from visionzoo.registry import REGISTRY
from visionzoo.weights.io import save_state_dict
model = REGISTRY.get_architecture(sys.argv[1]).build()
if sys.argv[3] == "safetensors":  # the library's layout: tensors at unaligned offsets
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
else:
    save_state_dict(model.state_dict(), sys.argv[2])
print(0)
""",
    "baseline": "print(peak_mib())",
    "lean": """
model = visionzoo.create_model(sys.argv[1], weights=sys.argv[2])
assert model.load_report.lean, model.load_report
build = peak_mib()
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())  # reads every page, allocates nothing big
print(build, peak_mib())
""",
    "naive": """
from safetensors.torch import load_file
from visionzoo.registry import REGISTRY
model = REGISTRY.get_architecture(sys.argv[1]).build()
model.load_state_dict(load_file(sys.argv[2]))
print(peak_mib())
""",
}


def run(step: str, *args: str) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + SCRIPTS[step], *args], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{step} failed:\n{proc.stderr}")
    return [float(v) for v in proc.stdout.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="vit_l_16")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "visionzoo-bench"))
    parser.add_argument("--writer", choices=("visionzoo", "safetensors"), default="visionzoo",
                        help="who writes the file: visionzoo (64-byte aligned tensors, loaded zero-copy) or "
                             "the safetensors library (unaligned tensors, read into aligned memory)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    path = Path(args.workdir) / f"{args.model}-{args.writer}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        run("prepare", args.model, str(path), args.writer)
    file_mib = path.stat().st_size / 2**20
    (baseline,) = run("baseline")
    lean, touched = run("lean", args.model, str(path))
    (naive,) = run("naive", args.model, str(path))
    mib = {"file": file_mib, "baseline": baseline, "lean": lean, "lean_touched": touched, "naive": naive}
    figures = {"model": args.model, "writer": args.writer, "bound": BOUND,
               **{f"{k}_mib": round(v, 1) for k, v in mib.items()},
               **{f"{k}_ratio": round(mib[k] / file_mib, 2) for k in ("lean", "lean_touched", "naive")}}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{args.model}: safetensors file {file_mib:.0f} MiB written by {args.writer}; "
              f"peak RSS of a fresh process:")
        print(f"  import torch + visionzoo only  {baseline:8.0f} MiB")
        rows = (("lean build (create_model)", lean), ("lean, weights touched", touched),
                ("naive build then load", naive))
        for label, value in rows:
            print(f"  {label:<30} {value:8.0f} MiB = {value / file_mib:5.2f} x file "
                  f"({value - baseline:+.0f} MiB over the baseline)")
        verdict = "PASS" if lean <= BOUND * file_mib else "FAIL"
        print(f"  bound: lean build <= {BOUND} x file = {BOUND * file_mib:.0f} MiB: {verdict}")
    return 0 if lean <= BOUND * file_mib else 1


if __name__ == "__main__":
    sys.exit(main())
