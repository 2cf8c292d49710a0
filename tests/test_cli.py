"""The `visionzoo` command: predictions, bad inputs, exit codes, listings."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest

from visionzoo import cli

from .cli_runner import run_cli as run
from .photos import sample_image


@pytest.fixture
def messy_folder(tmp_path):
    """A real photo, a text file renamed .jpg, and a truncated JPEG."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(sample_image("coffee.png"), folder / "sub" / "coffee.png")
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n" * 20)
    data = sample_image("rocket.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 2])
    (folder / "readme.txt").write_text("not an image, not an image extension: ignored")
    return folder


def test_predict_coffee_is_espresso_with_the_default_model(capsys):
    code, out, err = run(capsys, "predict", sample_image("coffee.png"), "--format", "json", "--topk", "3")
    assert code == 0, err
    result = json.loads(out)
    assert result[0]["predictions"][0]["label"] == "espresso"
    assert [p["rank"] for p in result[0]["predictions"]] == [1, 2, 3]


def test_real_entry_point_table_output():
    proc = subprocess.run([sys.executable, "-m", "visionzoo", "predict", str(sample_image("coffee.png")),
                           "--topk", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "espresso" in proc.stdout


def test_folder_with_bad_files_predicts_the_rest_and_exits_partial(capsys, messy_folder):
    code, out, err = run(capsys, "predict", messy_folder, "--format", "jsonl", "--topk", "1")
    assert code == cli.EXIT_PARTIAL == 3
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["coffee.png"]
    assert rows[0]["predictions"][0]["label"] == "espresso"
    assert "notes.jpg" in err and "not an image" in err
    assert "broken.jpg" in err and "truncated" in err
    assert "readme.txt" not in err
    assert "1 predicted, 2 failed" in err


def test_nothing_predictable_exits_with_its_own_code(capsys, messy_folder):
    code, out, err = run(capsys, "predict", messy_folder / "notes.jpg", messy_folder / "broken.jpg")
    assert code == cli.EXIT_NOTHING == 4
    code, _, err = run(capsys, "predict", messy_folder / "missing.jpg")
    assert code == cli.EXIT_NOTHING and "missing.jpg" in err and "no such file" in err


def test_csv_and_glob_inputs(capsys, messy_folder):
    code, out, _ = run(capsys, "predict", str(messy_folder / "**" / "*.png"), "--format", "csv", "-k", "2")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["rank"] for r in rows] == ["1", "2"] and rows[0]["label"] == "espresso"


def test_unknown_model_is_a_one_line_error(capsys):
    code, out, err = run(capsys, "predict", sample_image("coffee.png"), "--model", "resnet05")
    assert code == cli.EXIT_ERROR
    assert "unknown model 'resnet05'" in err and "resnet50" in err
    assert err.strip().count("\n") == 0
    code, _, err = run(capsys, "predict", sample_image("coffee.png"), "--model", "efficientnet_lite0.NOPE")
    assert code == cli.EXIT_ERROR and "IMAGENET1K_V1" in err


def test_bad_checkpoint_is_a_one_line_error(capsys, tmp_path):
    import torch

    import visionzoo

    path = tmp_path / "r18.pth"
    torch.save(visionzoo.create_model("resnet18").state_dict(), path)
    code, _, err = run(capsys, "predict", sample_image("coffee.png"), "--model", "efficientnet_lite0",
                       "--weights", path)
    assert code == cli.EXIT_ERROR and "does not fit efficientnet_lite0" in err


def test_usage_error_exit_code(capsys):
    code, _, _ = run(capsys, "predict", sample_image("coffee.png"), "--topk", "0")
    assert code == cli.EXIT_USAGE


def test_models_and_info(capsys):
    code, out, _ = run(capsys, "models", "efficientnet_lite*")
    assert code == 0
    lines = [line for line in out.splitlines() if "efficientnet_lite0" in line]
    assert lines and "IMAGENET1K_V1" in lines[0] and "yes" in lines[0]
    code, out, _ = run(capsys, "models", "--pretrained")
    assert "efficientnet_lite4" not in out and "resnet50" in out
    code, out, _ = run(capsys, "info", "resnet50")
    assert code == 0 and "IMAGENET1K_V2" in out and "80.858" in out and "resnet50-11ad3fa6.pth" in out
    code, _, err = run(capsys, "info", "nonet")
    assert code == cli.EXIT_ERROR
