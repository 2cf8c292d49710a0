"""The deployment commands: export, quantize, prune, benchmark, and the backend options of predict/embed."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from visionzoo import cli

from .cli_runner import run_cli as run

IMAGES = Path(__file__).parent.parent / "examples" / "images"
COFFEE, CHELSEA = IMAGES / "coffee.png", IMAGES / "chelsea.png"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """--threads sets torch's process-wide thread count; the in-process CLI must not leak it to other tests."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0_onnx(tmp_path_factory) -> Path:
    """efficientnet_lite0 exported once through the CLI (the first test checks that command)."""
    return tmp_path_factory.mktemp("export") / "lite0.onnx"


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory) -> Path:
    """16 augmented copies (crops, flips, rotations, colour changes, JPEG) of the two example photos."""
    folder = tmp_path_factory.mktemp("calibration")
    rng = random.Random(0)
    for i in range(16):
        img = Image.open([COFFEE, CHELSEA][i % 2]).convert("RGB")
        w, h = img.size
        s = rng.uniform(0.6, 1.0)
        left, top = rng.randint(0, int(w * (1 - s))), rng.randint(0, int(h * (1 - s)))
        img = img.crop((left, top, left + int(w * s), top + int(h * s)))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img = img.rotate(rng.uniform(-15, 15), expand=False)
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
        img.save(folder / f"aug{i:02d}.{'jpg' if i % 3 else 'png'}")
    return folder


def _top1(out: str) -> dict[str, tuple[str, float]]:
    return {Path(r["path"]).name: (r["predictions"][0]["label"], r["predictions"][0]["probability"])
            for r in json.loads(out)}


# -- export ----------------------------------------------------------------------------------------

def test_export_onnx(capsys, lite0_onnx):
    code, out, err = run(capsys, "export", "efficientnet_lite0", "--format", "onnx", "--out", lite0_onnx)
    assert code == 0, err
    assert lite0_onnx.is_file() and lite0_onnx.stat().st_size > 10 * 2**20
    assert "verified" in out and "onnx" in out and "224" in out
    from visionzoo.runtime.export import read_onnx_info

    info = read_onnx_info(lite0_onnx)
    assert info.arch == "efficientnet_lite0" and info.num_classes == 1000 and info.classes[967] == "espresso"


@pytest.mark.slow  # 22 s on a loaded machine
def test_export_torchscript_unverified(capsys, tmp_path):
    target = tmp_path / "lite0.ts"
    code, out, err = run(capsys, "export", "efficientnet_lite0", "-f", "torchscript", "-o", target, "--no-verify")
    assert code == 0, err
    assert target.is_file() and "not verified" in out


def test_export_errors(capsys, tmp_path):
    code, out, err = run(capsys, "export", "efficientnet_lite0", "--format", "tflite", "--out", tmp_path / "x")
    assert code == cli.EXIT_USAGE and "tflite" in err and "onnx" in err
    assert not (tmp_path / "x").exists()
    code, out, err = run(capsys, "export", "no_such_net", "--out", tmp_path / "x.onnx")
    assert code == cli.EXIT_ERROR and "unknown model" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "export", "efficientnet_lite0", "--out", tmp_path / "x.onnx", "--input-size", "4")
    assert code == cli.EXIT_USAGE
    assert not (tmp_path / "x.onnx").exists()


# -- predict and embed on the runtimes -------------------------------------------------------------

def test_predict_on_onnxruntime_matches_torch(capsys):
    common = ("predict", IMAGES, "--format", "json", "--topk", "3", "--workers", "0", "--threads", "1")
    code, out, err = run(capsys, *common, "--backend", "torch")
    assert code == 0, err
    torch_top = _top1(out)
    code, out, err = run(capsys, *common, "--backend", "onnxruntime")
    assert code == 0, err
    ort_top = _top1(out)
    assert set(torch_top) == {"coffee.png", "chelsea.png"}
    assert torch_top["coffee.png"][0] == "espresso"
    for name, (label, p) in torch_top.items():
        assert ort_top[name][0] == label
        assert ort_top[name][1] == pytest.approx(p, abs=1e-4)


def test_predict_exported_file_and_bad_files(capsys, lite0_onnx, tmp_path):
    if not lite0_onnx.is_file():
        pytest.skip("needs test_export_onnx's file")
    code, out, err = run(capsys, "predict", COFFEE, "--model", lite0_onnx, "--backend", "openvino", "--format",
                         "json", "--workers", "0", "--threads", "1")
    assert code == 0, err
    assert _top1(out)["coffee.png"][0] == "espresso"
    code, out, err = run(capsys, "predict", COFFEE, "--model", tmp_path / "missing.onnx")
    assert code == cli.EXIT_ERROR and "no such model file" in err
    code, out, err = run(capsys, "predict", COFFEE, "--model", lite0_onnx, "--backend", "torch")
    assert code == cli.EXIT_ERROR and "onnxruntime or openvino" in err
    code, out, err = run(capsys, "predict", COFFEE, "--model", lite0_onnx, "--backend", "onnxruntime",
                         "--precision", "bf16")
    assert code == cli.EXIT_ERROR and "bf16" in err
    code, out, err = run(capsys, "predict", COFFEE, "--backend", "tensorrt")
    assert code == cli.EXIT_USAGE


def test_embed_on_onnxruntime_matches_torch(capsys, tmp_path):
    vectors = {}
    for backend in ("torch", "onnxruntime"):
        target = tmp_path / f"{backend}.npy"
        code, out, err = run(capsys, "embed", IMAGES, "--out", target, "--backend", backend, "--workers", "0",
                             "--threads", "1")
        assert code == 0, err
        vectors[backend] = np.load(target)
    assert vectors["torch"].shape == (2, 1280)
    np.testing.assert_allclose(vectors["onnxruntime"], vectors["torch"], atol=1e-3, rtol=1e-3)


# -- benchmark ---------------------------------------------------------------------------------------

@pytest.mark.slow  # 24-49 s on a loaded machine
def test_benchmark_table_and_json(capsys, tmp_path):
    data = tmp_path / "data"
    for cls, src in (("espresso", COFFEE), ("tabby", CHELSEA)):
        (data / cls).mkdir(parents=True)
        Image.open(src).save(data / cls / src.name)
    report = tmp_path / "bench.json"
    code, out, err = run(capsys, "benchmark", "efficientnet_lite0", "--batch", "2", "--backends",
                         "torch,onnxruntime", "--repeats", "2", "--warmup", "1", "--threads", "1", "--data", data,
                         "--json", report)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("efficientnet_lite0")]
    assert [(r[1], r[2], r[3]) for r in rows] == [("torch", "fp32", "2"), ("onnxruntime", "fp32", "2")]
    assert "img/s" in out and "p95 ms" in out and "machine:" in out
    result = json.loads(report.read_text())
    assert [(r["backend"], r["batch"]) for r in result["rows"]] == [("torch", 2), ("onnxruntime", 2)]
    for r in result["rows"]:
        assert r["throughput"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] and r["repeats"] == 2
        assert 15 < r["size_mib"] < 25  # 4.7M float32 parameters
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
    # top-1 of the two photos: espresso right; the cat is "tiger cat" to this model, not "tabby"
    assert [r["accuracy"] for r in result["rows"]] == [0.5, 0.5]
    assert result["data_images"] == 2
    assert result["machine"]["cpu"] and result["machine"]["threads"] == 1
    assert "torch" in result["machine"]["libraries"]


def test_benchmark_skips_what_cannot_run(capsys, tmp_path):
    report = tmp_path / "b.json"
    code, out, err = run(capsys, "benchmark", "efficientnet_lite0", "--batch", "1", "--backends", "onnxruntime",
                         "--precision", "fp32,bf16", "--repeats", "1", "--warmup", "0", "--threads", "1",
                         "--json", report)
    assert code == 0, err
    assert "skipped onnxruntime bf16" in out
    result = json.loads(report.read_text())
    assert [(r["backend"], r["precision"]) for r in result["rows"]] == [("onnxruntime", "fp32")]
    assert result["skipped"][0]["backend"] == "onnxruntime" and "bf16" in result["skipped"][0]["reason"]


def test_benchmark_errors(capsys):
    code, out, err = run(capsys, "benchmark", "efficientnet_lite0", "--precision", "int8")
    assert code == cli.EXIT_ERROR and "visionzoo quantize" in err and ".onnx" in err
    code, out, err = run(capsys, "benchmark", "efficientnet_lite0", "--batch", "0")
    assert code == cli.EXIT_ERROR and "batch" in err
    code, out, err = run(capsys, "benchmark", "efficientnet_lite0", "--backends", "torch,tensorrt")
    assert code == cli.EXIT_ERROR and "tensorrt" in err


# -- quantize ------------------------------------------------------------------------------------------

@pytest.mark.slow  # calibration and two runtimes: 79 s on a loaded machine
def test_quantize_then_predict_with_the_int8_file(capsys, tmp_path, calibration_dir):
    target = tmp_path / "lite0.int8.onnx"
    code, out, err = run(capsys, "quantize", "efficientnet_lite0", "--calibration", calibration_dir, "--out",
                         target, "--num-images", "16", "--backend", "onnxruntime", "--workers", "0")
    assert code == 0, err
    assert target.is_file() and "int8 static" in out and "calibrated on 16 images" in out
    from visionzoo.runtime.export import read_onnx_info

    info = read_onnx_info(target)
    assert info.precision == "int8" and info.quantization["calibration_images"] == 16
    assert target.stat().st_size < 0.5 * 17 * 2**20  # int8 weights: well under half the float32 file
    code, out, err = run(capsys, "predict", COFFEE, "--model", target, "--backend", "onnxruntime", "--format",
                         "json", "--workers", "0", "--threads", "1")
    assert code == 0, err
    assert _top1(out)["coffee.png"][0] == "espresso"
    code, out, err = run(capsys, "benchmark", target, "--batch", "1", "--repeats", "1", "--warmup", "0",
                         "--threads", "1", "--backends", "onnxruntime", "--json", "-")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["backend"], r["precision"]) for r in rows] == [("onnxruntime", "int8")]


def test_quantize_errors(capsys, tmp_path, calibration_dir):
    code, out, err = run(capsys, "quantize", "efficientnet_lite0", "--calibration", calibration_dir, "--out",
                         tmp_path / "q.bin")
    assert code == cli.EXIT_ERROR and "name it .onnx" in err
    code, out, err = run(capsys, "quantize", "efficientnet_lite0", "--mode", "static", "--out", tmp_path / "q.onnx")
    assert code == cli.EXIT_ERROR and "--calibration" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, "quantize", "efficientnet_lite0", "--calibration", empty, "--out",
                         tmp_path / "q.onnx")
    assert code == cli.EXIT_ERROR and "no images" in err
    assert not (tmp_path / "q.onnx").exists()


# -- prune ---------------------------------------------------------------------------------------------

def test_prune_refuses_what_is_not_a_bundle(capsys, tmp_path):
    code, out, err = run(capsys, "prune", tmp_path, "--out", tmp_path / "pruned", "--ratio", "0.3")
    assert code == cli.EXIT_ERROR and "not a bundle" in err and "Traceback" not in err
    code, out, err = run(capsys, "prune", "efficientnet_lite0", "--out", tmp_path / "pruned")
    assert code == cli.EXIT_ERROR and "not a bundle" in err


@pytest.mark.slow  # 82 s on a loaded machine
def test_prune_a_small_bundle_without_finetuning(capsys, tmp_path):
    from visionzoo import create_model, save_bundle
    from visionzoo.weights.records import Preprocess

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    net = create_model("resnet18", weights=None, num_classes=2)
    bundle = save_bundle(net, tmp_path / "bundle", classes=["a", "b"], preprocess=Preprocess(36, 32),
                         training={"data": {"train": str(data)}, "seed": 0, "val_fraction": 0.5})
    code, out, err = run(capsys, "prune", bundle, "--out", tmp_path / "pruned", "--ratio", "0.5",
                         "--finetune-epochs", "0", "--workers", "0", "--quiet")
    assert code == 0, err
    assert "parameters" in out and "GMACs per image" in out and "validation accuracy" in out
    report = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert report["after"]["params"] < 0.5 * report["before"]["params"]
    code, out, err = run(capsys, "prune", bundle, "--out", tmp_path / "pruned", "--finetune-epochs", "0")
    assert code == cli.EXIT_ERROR and "already holds a pruning run" in err
