"""Kill a fine-tuning run in the middle of its second epoch, for the resume tests of every task.

`kill_in_epoch_2` starts `visionzoo.finetune(data, run_dir, **run)` in a subprocess that freezes
after two optimiser steps of epoch 2 (epoch 1's checkpoint is on disk by then), SIGKILLs it, and
checks what a killed run must leave: epoch 1 in the history and no bundle. `resumes_like_straight`
then resumes it and checks that it ends where the same run without a kill does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import visionzoo

SRC = Path(visionzoo.__file__).resolve().parents[1]

_KILLABLE = textwrap.dedent("""
    # a fine-tuning run that freezes (for the test to SIGKILL it) after 2 steps of epoch 2
    import json, sys, time
    import torch
    import visionzoo
    import visionzoo.train.checkpoint as C

    torch.set_num_threads(1)
    marker, data, out, run = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    if "scale_range" in run:
        run["scale_range"] = tuple(run["scale_range"])
    real_save, real_step = C.save_checkpoint, torch.optim.AdamW.step
    steps = [0]

    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        steps[0] = 1  # epoch 1 is on disk: count the steps of epoch 2

    def step(self, *args, **kwargs):
        if steps[0]:
            steps[0] += 1
            if steps[0] == 3:
                open(marker, "w").write("in epoch 2")
                time.sleep(600)
        return real_step(self, *args, **kwargs)

    C.save_checkpoint = save
    torch.optim.AdamW.step = step
    visionzoo.finetune(data, out, **run, progress=False)
""")


def subprocess_env() -> dict[str, str]:
    """Subprocesses import this checkout's visionzoo, on one thread like the tests."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def kill_in_epoch_2(data: Path, run_dir: Path, run: dict[str, Any], work: Path, timeout: float = 300) -> None:
    """Run the fine-tuning in a subprocess, SIGKILL it in epoch 2, and check what it left behind."""
    script, marker = work / "killable.py", work / "marker"
    script.write_text(_KILLABLE)
    proc = subprocess.Popen([sys.executable, str(script), str(marker), str(data), str(run_dir), json.dumps(run)],
                            env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run never reached epoch 2"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert json.loads((run_dir / "history.json").read_text())[-1]["epoch"] == 1
    assert not (run_dir / "bundle").exists()


def resumes_like_straight(data: Path, work: Path, run: dict[str, Any], metrics: tuple[str, ...] = ()) -> None:
    """Kill `finetune(data, work / "run", **run)` in epoch 2, resume it, run the same straight through
    (`work / "straight"`), and check that both end alike: the same best epoch, each epoch's validation
    loss and `metrics` (absent in both, or equal), and the same weights."""
    kill_in_epoch_2(data, work / "run", run, work, timeout=600)
    resumed = visionzoo.finetune(data, work / "run", **run, resume=True, progress=False)
    straight = visionzoo.finetune(data, work / "straight", **run, progress=False)
    assert resumed.best_epoch == straight.best_epoch
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
        for name in metrics:
            assert (name in a) == (name in b) and a.get(name) == pytest.approx(b.get(name), abs=1e-9), name
    wa, wb = load_file(resumed.bundle / "model.safetensors"), load_file(straight.bundle / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)
