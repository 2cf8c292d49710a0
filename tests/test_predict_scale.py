"""Predict at scale: every mode and format through the CLI, fast vs exact path, list inputs,
the embed command, and flat memory over thousands of images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visionzoo
from visionzoo import cli
from visionzoo.tasks.predict import Prediction

from .cli_runner import run_cli as run
from .imagezoo import BAD, FAITHFUL, LOWERED_LIMIT, good_names, make_image_zoo
from .photos import sample_image

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    make_image_zoo(folder)
    return folder


@pytest.fixture(scope="module")
def model():
    return visionzoo.create_model("efficientnet_lite0", pretrained=True)


def test_every_mode_and_format_is_predicted_and_every_bad_file_reported(capsys, zoo):
    code, out, err = run(capsys, "predict", zoo, "--format", "jsonl", "--topk", "1",
                         "--max-pixels", LOWERED_LIMIT, "--workers", "1", "--batch-size", "8")
    assert code == cli.EXIT_PARTIAL, err
    top1 = {Path(r["path"]).name: r["predictions"][0]["label"] for r in map(json.loads, out.splitlines())}
    assert sorted(top1) == good_names(zoo)
    for name, words in BAD.items():
        line = next((line for line in err.splitlines() if name in line), "")
        assert words in line, (name, err)
    good, bad = len(good_names(zoo)), len(BAD)
    assert f"{good} predicted, {bad} failed: " in err
    assert "1 refused as a possible decompression bomb" in err and "2 truncated or corrupt image" in err
    # the sideways phone photo and every faithful copy are seen as the upright photo is
    assert top1["exif_rotated.jpg"] == top1["rgb.png"]
    assert {name: top1[name] for name in FAITHFUL} == {name: top1["rgb.png"] for name in FAITHFUL}
    assert top1["rgb.png"] == "espresso"


def test_the_bomb_passes_under_the_default_limit(capsys, zoo):
    code, out, err = run(capsys, "predict", zoo / "bomb.png", "--format", "jsonl")
    assert code == 0, err


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """Real photos upscaled to 6 MP and saved as JPEGs: the fast path decodes them at 1/2 or 1/4."""
    folder = tmp_path_factory.mktemp("large")
    for name in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "grace_hopper.jpg"):
        img = Image.open(sample_image(name)).convert("RGB")
        scale = (6e6 / (img.width * img.height)) ** 0.5
        img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC).save(
            folder / (Path(name).stem + ".jpg"), quality=90)
    return folder


def test_fast_path_agrees_with_the_exact_path_on_every_test_image(model, zoo, large):
    inputs = [zoo / name for name in good_names(zoo)] + sorted(large.iterdir())
    inputs += [sample_image(n) for n in ("chelsea.png", "coffee.png", "rocket.jpg", "grace_hopper.jpg")]
    fast = visionzoo.predict(inputs, model, topk=1, num_workers=0)
    exact = visionzoo.predict(inputs, model, topk=1, num_workers=0, fast=False)
    assert all(isinstance(r, Prediction) for r in fast + exact)
    assert [r.top[0].index for r in fast] == [r.top[0].index for r in exact]
    # small images take no shortcut at all: identical probabilities
    small = len(good_names(zoo))
    assert [r.top[0].probability for r in fast[:small]] == [r.top[0].probability for r in exact[:small]]


def test_near_ties_of_the_fast_path_are_decoded_again_at_full_size(model, large, monkeypatch):
    from visionzoo.tasks import predict as predict_module

    inputs = sorted(large.iterdir())
    exact = [r.top[0].probability for r in visionzoo.predict(inputs, model, topk=1, num_workers=0, fast=False)]
    monkeypatch.setattr(predict_module, "NEAR_TIE", 0.0)  # never re-decode: the pure fast path
    fast = [r.top[0].probability for r in visionzoo.predict(inputs, model, topk=1, num_workers=0)]
    assert fast != pytest.approx(exact, abs=1e-6)  # the large JPEGs really took the reduced decode
    monkeypatch.setattr(predict_module, "NEAR_TIE", 1.0)  # every reduced image counts as a near-tie
    rechecked = [r.top[0].probability for r in visionzoo.predict(inputs, model, topk=1, num_workers=0)]
    assert rechecked == pytest.approx(exact, abs=1e-5)


def test_exact_flag_and_workers_in_the_cli(capsys, model, large):
    path = large / "coffee.jpg"
    exact = visionzoo.predict(path, model, topk=1, fast=False, num_workers=0)[0]
    code, out, _ = run(capsys, "predict", path, "--exact", "--format", "jsonl", "--topk", "1", "--workers", "0")
    assert code == 0
    row = json.loads(out)["predictions"][0]
    assert (row["index"], row["probability"]) == (exact.top[0].index, exact.top[0].probability)


def test_list_file_and_csv_inputs(capsys, tmp_path):
    for name in ("chelsea.png", "coffee.png"):
        (tmp_path / name).write_bytes(sample_image(name).read_bytes())
    (tmp_path / "list.txt").write_text("chelsea.png\n# skipped\nmissing.jpg\n")
    (tmp_path / "data.csv").write_text("path,label\ncoffee.png,drink\n")
    code, out, err = run(capsys, "predict", f"@{tmp_path / 'list.txt'}", tmp_path / "data.csv",
                         "--format", "csv", "--topk", "1")
    assert code == cli.EXIT_PARTIAL and "missing.jpg" in err
    rows = out.splitlines()[1:]
    assert [Path(r.split(",")[0]).name for r in rows] == ["chelsea.png", "coffee.png"]
    assert "espresso" in rows[1]


def test_embed_command(capsys, tmp_path):
    out = tmp_path / "emb.parquet"
    code, _, err = run(capsys, "embed", sample_image("coffee.png"), tmp_path / "none.jpg", "--out", out,
                       "--normalize", "--layer", "features.5")
    assert code == cli.EXIT_PARTIAL and "none.jpg" in err and "wrote 1 embeddings of dimension 112" in err
    import pyarrow.parquet as pq

    vec = np.asarray(pq.read_table(out).column("embedding").to_pylist()[0])
    assert vec.shape == (112,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    code, _, err = run(capsys, "embed", sample_image("coffee.png"), "--out", tmp_path / "emb.txt")
    assert code == cli.EXIT_ERROR and "name the file .npy or .parquet" in err
    code, _, err = run(capsys, "embed", tmp_path / "none.jpg", "--out", tmp_path / "e.npy")
    assert code == cli.EXIT_NOTHING
    code, _, err = run(capsys, "embed", sample_image("coffee.png"), "--out", tmp_path / "e.npy", "--layer", "9")
    assert code == cli.EXIT_ERROR and "out of range" in err


# Runs `visionzoo predict FOLDER --format jsonl` in-process and records, when the 500th and the
# 2,000th result lines are written, the peak RSS (VmHWM) of the process and of its decoding worker.
# (Not getrusage's ru_maxrss: Linux carries it over from the parent across fork and exec, so a
# child of a large pytest process would report the parent's peak.)
_MEMORY_PROBE = """
import json, os, sys
from visionzoo import cli

def peak_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return max([0] + [int(line.split()[1]) for line in f if line.startswith("VmHWM")])

def worker_peak_kb():
    peak, me = 0, str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    peak = max(peak, peak_kb(pid))
        except (OSError, IndexError):
            pass
    return peak

class Counting:
    def __init__(self, out):
        self.out, self.lines, self.marks = out, 0, {}
    def write(self, text):
        for _ in range(text.count("\\n")):
            self.lines += 1
            if self.lines in (500, 2000):
                self.marks[self.lines] = (peak_kb("self"), worker_peak_kb())
        return self.out.write(text)
    def __getattr__(self, name):
        return getattr(self.out, name)

sys.stdout = counting = Counting(sys.stdout)
sys.argv = ["visionzoo", "predict", sys.argv[1], "--format", "jsonl", "--topk", "3", "--workers", "1"]
try:
    cli.main()
except SystemExit:
    pass
print(json.dumps(counting.marks), file=sys.stderr)
"""


@pytest.mark.slow
def test_predict_memory_stays_flat_with_the_number_of_images(tmp_path):
    photo = Image.open(sample_image("astronaut.png")).convert("RGB")
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(2000):
        x, y = (i * 7) % 448, (i * 13) % 448
        photo.crop((x, y, x + 64, y + 64)).save(folder / f"{i:05d}.jpg", quality=85)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "out.jsonl", "w") as out:
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(folder)], stdout=out,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert sum(1 for _ in open(tmp_path / "out.jsonl")) == 2000
    marks = {int(k): (main / 1024, worker / 1024) for k, (main, worker) in
             json.loads(proc.stderr.splitlines()[-1]).items()}
    (main_500, worker_500), (main_2000, worker_2000) = marks[500], marks[2000]
    print(f"peak RSS after 500 -> 2000 images: main {main_500:.0f} -> {main_2000:.0f} MB, "
          f"decoding worker {worker_500:.0f} -> {worker_2000:.0f} MB")
    assert worker_500 > 0, "the decoding worker was not found"
    # 4x the images, the same peak: the tolerance (about 70 MB for the main process) covers one-off
    # allocator and cache growth and still catches anything kept per image of 50 KB or more (a
    # decoded or preprocessed image); test_iter_predict_keeps_nothing_per_image catches smaller leaks
    assert main_2000 - main_500 < 40 + 0.03 * main_500, marks
    assert worker_2000 - worker_500 < 40 + 0.03 * worker_500, marks


def test_iter_predict_keeps_nothing_per_image(tmp_path):
    """Python-level memory after 2,000 streamed results equals that after 500: no result, path or
    batch is kept (a tiny model and 32-pixel inputs make this fast enough to run at every commit)."""
    import tracemalloc

    from visionzoo.tasks.predict import iter_predict
    from visionzoo.weights.records import Preprocess

    folder = tmp_path / "tiny"
    folder.mkdir()
    photo = Image.open(sample_image("astronaut.png")).convert("RGB").resize((64, 64))
    for i in range(2000):
        photo.rotate(i % 360).crop((8, 8, 40, 40)).save(folder / f"{i:05d}.png", compress_level=1)
    torch_threads = __import__("torch").get_num_threads()
    __import__("torch").set_num_threads(1)
    tiny = visionzoo.create_model("squeezenet1_1", num_classes=10)
    tiny.card = tiny.card.replace(preprocess=Preprocess(32, 32))
    tracemalloc.start()
    try:
        for n, result in enumerate(iter_predict([folder], tiny, topk=3, batch_size=50, num_workers=1), start=1):
            assert isinstance(result, Prediction)
            if n == 500:
                at_500 = tracemalloc.get_traced_memory()[0]
        at_2000 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        __import__("torch").set_num_threads(torch_threads)
    assert n == 2000
    print(f"traced Python memory after 500 / 2000 results: {at_500 / 1024:.0f} / {at_2000 / 1024:.0f} KiB")
    # keeping even the 1,500 extra results (about 1 KB each with their labels) would add > 1 MB
    assert at_2000 - at_500 < 300_000


def test_decode_benchmark_runs_and_agrees_on_top1():
    """benchmarks/decode_speed.py on smaller photos (its timings are not checked here; run the script
    on an idle machine for those)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_speed.py"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), "--megapixels", "3", "--rounds", "1", "--workers", "0"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr  # 1: the speed-up target missed on this machine
    assert "top-1 agreement: 6/6" in proc.stdout, proc.stdout
