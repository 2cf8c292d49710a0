"""The benchmark scripts run and show what they claim (on a mid-size model, to stay quick)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_memory_benchmark_lean_build_adds_almost_nothing(tmp_path):
    """benchmarks/load_memory.py on a mid-size model: building from the file costs a small
    fraction of the file over the interpreter's baseline; the naive way costs twice the file."""
    script = BENCHMARKS / "load_memory.py"
    proc = subprocess.run([sys.executable, str(script), "resnet50", "--workdir", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr  # 1: the interpreter alone exceeds 1.3x a small file
    f = json.loads(proc.stdout)
    assert f["lean_mib"] - f["baseline_mib"] < 0.25 * f["file_mib"]
    assert f["lean_touched_mib"] - f["baseline_mib"] < 1.25 * f["file_mib"]
    assert f["naive_mib"] - f["baseline_mib"] > 1.5 * f["file_mib"]


@pytest.mark.slow
def test_hostile_inputs_benchmark_meets_issue_13s_acceptance():
    """benchmarks/hostile_inputs.py on a small folder (the README's figures are for 1,000 images):
    every good image predicted, every hostile file reported by name, exit code 3, peak memory
    within 20% of the good-only run, each run under a 2 GB cap."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "hostile_inputs.py"), "--images", "30", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["passed"], json.dumps(result, indent=2)
    assert result["runs"]["mixed"]["predicted"] == 30 and result["hostile_files"] >= 10
