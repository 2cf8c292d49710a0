"""Predict over a folder of good images plus every hostile file of issue 13: what it costs.

    python benchmarks/hostile_inputs.py [--images 1000] [--workers N] [--json]

Writes N good images (96x96 JPEG and PNG crops of real photos, a few under names holding a
newline, U+2028 or bytes that are not UTF-8), then runs `visionzoo predict --format jsonl`
twice, each in a fresh process under a 2 GB address-space cap: on the good images alone,
and on the same folder plus the hostile files (tiny PNGs announcing 100000x1, 20000x1,
13000x13000 16-bit, 65535x65535 and 2^31 animation frames; two symbolic links looping back to
the folder; a truncated, an empty and a non-image file). It prints, per run, the images
predicted, the failures, the exit code, the wall time and the peak memory (the largest
resident set of the command and its decoding workers), and checks issue 13's acceptance:
every good image predicted, every hostile file reported by name, exit code 3, peak memory
within 20% of the good-only run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hostile import MEMORY_LIMIT, png, write_issue_files  # noqa: E402
from tests.photos import sample_image  # noqa: E402

PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "grace_hopper.jpg"]
ODD_NAMES = ["new\nline.jpg", "sep\u2028arator.jpg", os.fsdecode(b"latin1-\xe9t\xe9.jpg")]
# one run of the command line in a fresh process: the peak resident set of it and its workers
_MEASURE = """
import resource, subprocess, sys, time
limit = int(sys.argv[1])
cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
started = time.perf_counter()
run = subprocess.run(sys.argv[2:], preexec_fn=cap, capture_output=True)
wall = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
sys.stdout.buffer.write(b"%d %f %d\\n" % (run.returncode, wall, peak) + run.stdout + b"\\0" + run.stderr)
"""


def write_good(folder: Path, count: int) -> list[str]:
    """`count` distinct small images (JPEG and PNG crops of the sample photos); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(sample_image(n)).convert("RGB") for n in PHOTOS]
    paths = []
    for i in range(count):
        img = photos[i % len(photos)]
        x, y = (i * 37) % (img.width - 96), (i * 23) % (img.height - 96)
        name = ODD_NAMES[i] if i < len(ODD_NAMES) else f"img{i:05d}.{'png' if i % 5 == 0 else 'jpg'}"
        img.crop((x, y, x + 96, y + 96)).save(folder / name, "PNG" if name.endswith(".png") else "JPEG", quality=90)
        paths.append(str(folder / name))
    return paths


def write_hostile(folder: Path) -> dict[str, str]:
    """The hostile files of issue 13 inside `folder`; returns {path: words its failure line holds}."""
    expected = write_issue_files(folder / "hostile")
    expected[str(folder / "hostile" / "frames2.png")] = "frame limit"
    (folder / "hostile" / "frames2.png").write_bytes(png(2, 2, extra=((b"acTL", (10**6).to_bytes(4, "big") +
                                                                        bytes(4)),)))
    truncated = min(folder.glob("img*.jpg")).read_bytes()
    (folder / "hostile" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (folder / "hostile" / "empty.jpg").write_bytes(b"")
    (folder / "hostile" / "notes.png").write_text("not a picture\n")
    (folder / "hostile" / "loop").symlink_to("..")
    (folder / "hostile" / "deeper").mkdir()
    (folder / "hostile" / "deeper" / "loop").symlink_to("../..")  # two loops used to make the walk endless
    expected.update({str(folder / "hostile" / "truncated.jpg"): "truncated",
                     str(folder / "hostile" / "empty.jpg"): "empty",
                     str(folder / "hostile" / "notes.png"): "not an image",
                     str(folder / "hostile" / "loop"): "symbolic link loop",
                     str(folder / "hostile" / "deeper" / "loop"): "symbolic link loop"})
    return expected


def predict(folder: Path, workers: int | None) -> dict:
    """`visionzoo predict FOLDER --format jsonl` in a fresh, capped process: its results and cost."""
    cmd = [sys.executable, "-m", "visionzoo", "predict", str(folder), "--format", "jsonl", "--topk", "1"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(MEMORY_LIMIT), *cmd], capture_output=True, env=env,
                         check=True).stdout
    head, _, rest = out.partition(b"\n")
    stdout, _, stderr = rest.partition(b"\0")
    code, wall, peak = head.split()
    return {"exit_code": int(code), "wall_s": float(wall), "peak_mib": int(peak) / 2**20,
            "predicted": [json.loads(line)["path"] for line in stdout.decode().splitlines()],
            "stderr": stderr.decode(errors="surrogateescape")}


def measure(count: int, workers: int | None, workdir: Path) -> dict:
    folder = workdir / "photos"
    good = write_good(folder, count)
    clean = predict(folder, workers)
    expected = write_hostile(folder)
    mixed = predict(folder, workers)
    skipped = [line for line in mixed["stderr"].splitlines() if line.startswith("skipped ")]
    unreported = [p for p, words in expected.items()
                  if not any(line.startswith(f"skipped {p}: ") and words in line for line in skipped)]
    checks = {
        "good-only run: every good image predicted, exit 0": clean["exit_code"] == 0 and
        sorted(clean["predicted"]) == sorted(good),
        "mixed run: every good image predicted": sorted(mixed["predicted"]) == sorted(good),
        "mixed run: every hostile file reported by name, once": not unreported and len(skipped) == len(expected),
        "mixed run: exit code 3": mixed["exit_code"] == 3,
        "mixed run: peak memory within 20% of the good-only run": mixed["peak_mib"] <= 1.2 * clean["peak_mib"],
        "no traceback": "Traceback" not in clean["stderr"] + mixed["stderr"],
    }
    return {"good_images": count, "hostile_files": len(expected), "memory_cap_mib": MEMORY_LIMIT / 2**20,
            "runs": {name: {k: v for k, v in run.items() if k not in ("predicted", "stderr")} |
                     {"predicted": len(run["predicted"])} for name, run in (("good only", clean), ("mixed", mixed))},
            "unreported": unreported, "checks": checks, "passed": all(checks.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="--workers for predict (default: its own)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.images < 10:
        parser.error("--images must be at least 10 (the odd names and a JPEG to truncate come from them)")
    workdir = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        result = measure(args.images, args.workers, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['good_images']} good images + {result['hostile_files']} hostile files, each run under a "
              f"{result['memory_cap_mib']:.0f} MiB address-space cap")
        print(f"{'run':<10} {'predicted':>9} {'exit':>4} {'wall s':>7} {'peak MiB':>9}")
        for name, run in result["runs"].items():
            print(f"{name:<10} {run['predicted']:>9} {run['exit_code']:>4} {run['wall_s']:>7.1f} "
                  f"{run['peak_mib']:>9.0f}")
        for check, ok in result["checks"].items():
            print(f"{'ok  ' if ok else 'FAIL'} {check}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
