"""Outputs a run owns (issue 13): one run per output (a lock naming its owner; waiting; stale locks of
dead processes taken over), temporary files of killed runs cleaned, the user's umask respected."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from visionzoo.errors import OutputBusyError
from visionzoo.fileutil import atomic_path, exclusive, leftovers, lock_path

from .hostile import SRC, hold


def test_a_second_run_is_refused_naming_the_first(tmp_path):
    target = tmp_path / "out.npy"
    holder = hold(target, 60)
    try:
        with pytest.raises(OutputBusyError) as e:
            with exclusive(target):
                pass
        message = str(e.value)
        assert f"pid {holder.pid}" in message and str(target) in message and "--wait" in message
        assert "-c" in message and "\n" not in message  # the command line of the running one
    finally:
        holder.kill()
        holder.wait()


def test_wait_blocks_until_the_first_run_ends(tmp_path):
    target = tmp_path / "run"
    holder = hold(target, 1.5)
    started = time.monotonic()
    with exclusive(target, wait=True):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 1.0  # the holder keeps it 1.5 s after saying so
    assert not lock_path(target).exists()  # removed when released


def test_a_dead_runs_lock_and_temporary_files_are_taken_over(tmp_path, caplog):
    target = tmp_path / "model.onnx"
    holder = hold(target, 60)
    (tmp_path / ".model.onnx.abc123.part").write_bytes(b"half a graph")  # what the killed run was writing
    (tmp_path / ".model.onnx.old-xyz").mkdir()
    (tmp_path / ".other.onnx.abc.part").write_bytes(b"not ours")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock_path(target).exists()  # the record stays; the kernel has released the lock
    with caplog.at_level(logging.WARNING, logger="visionzoo"), exclusive(target):
        assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
        assert leftovers(target) == []
    assert (tmp_path / ".other.onnx.abc.part").exists()


def test_threads_take_turns_and_a_thread_may_nest(tmp_path):
    target = tmp_path / "x"
    with exclusive(target):
        with exclusive(target):  # the same thread: a task calling another on the same output
            pass
        assert lock_path(target).exists()
        refused = []

        def other():
            try:
                with exclusive(target):
                    pass
            except OutputBusyError as e:
                refused.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert refused and "another thread" in refused[0]
    assert not lock_path(target).exists()


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_a_killed_exports_leftovers_are_removed_by_the_next(tmp_path):
    """A killed `export` used to leave `.NAME.*.part` files that no later run removed."""
    out = tmp_path / "lite0.onnx"
    cmd = [sys.executable, "-m", "visionzoo", "export", "efficientnet_lite0", "--out", str(out), "--no-verify"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not leftovers(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the export ended before it could be killed"
    proc.kill()
    proc.wait()
    assert leftovers(out) and lock_path(out).exists() and not out.exists()
    old = os.umask(0o022)
    try:
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.umask(old)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert leftovers(out) == [] and not lock_path(out).exists()


def test_bundle_folders_follow_the_umask(tmp_path):
    import visionzoo
    from visionzoo.bundle import save_bundle
    from visionzoo.data.preprocess import Preprocess

    model = visionzoo.create_model("mobilenet_v3_small", num_classes=2)
    old = os.umask(0o022)
    try:
        bundle = save_bundle(model, tmp_path / "bundle", classes=["a", "b"], preprocess=Preprocess(64, 56))
    finally:
        os.umask(old)
    assert bundle.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (bundle / "model.safetensors").stat().st_mode & 0o777 == 0o644
