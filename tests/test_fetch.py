"""Fetching weights under faults: dropped connections, wrong content, server errors, stalls,
concurrent processes, a corrupt cache, offline mode and mirrors. All against a loopback server."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import visionzoo
from visionzoo.errors import WeightsUnavailableError
from visionzoo.weights import fetch
from visionzoo.weights.fetch import DownloadError, IntegrityError, ensure_file
from visionzoo.weights.hub import cache_dir

from .fault_server import FaultServer, record_for, squeezenet_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF", 0.01)


@pytest.fixture(scope="module")
def squeezenet_file(tmp_path_factory):
    return squeezenet_checkpoint(tmp_path_factory.mktemp("src"))


def _same(a, b) -> bool:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.glob("*.part")]


# -- faults ----------------------------------------------------------------------------------------
def test_connection_dropped_mid_file_leaves_nothing_and_the_next_call_completes(server, tmp_path, fast_retries):
    body = os.urandom(300_000)
    server.files["f.bin"] = body
    prefix = hashlib.sha256(body).hexdigest()[:8]
    server.plans["f.bin"] = ["drop", "drop"]
    dest = tmp_path / "cache" / "f.bin"
    with pytest.raises(DownloadError, match="connection") as e:
        ensure_file(f"{server.base}/f.bin", dest, prefix, progress=False, retries=1)
    assert "2 attempts" in str(e.value) and "\n" not in str(e.value)
    assert not dest.exists() and _leftovers(dest.parent) == []
    assert ensure_file(f"{server.base}/f.bin", dest, prefix, progress=False) == (dest, "downloaded")
    assert dest.read_bytes() == body and server.requests["f.bin"] == 3


def test_a_dropped_connection_is_retried(server, tmp_path, fast_retries, caplog):
    body = os.urandom(200_000)
    server.files["f.bin"] = body
    server.plans["f.bin"] = ["drop"]
    dest = tmp_path / "f.bin"
    with caplog.at_level(logging.WARNING, logger="visionzoo"):
        ensure_file(f"{server.base}/f.bin", dest, hashlib.sha256(body).hexdigest()[:8], progress=True)
    assert dest.read_bytes() == body and server.requests["f.bin"] == 2
    assert "retrying" in caplog.text


def test_wrong_content_names_both_hashes_and_does_not_poison_the_cache(server, tmp_path, fast_retries):
    body = os.urandom(100_000)
    server.files["f.bin"] = body
    server.plans["f.bin"] = ["wrong"]
    expected = hashlib.sha256(body).hexdigest()[:8]
    actual = hashlib.sha256(bytes(reversed(body))).hexdigest()[:8]
    dest = tmp_path / "f.bin"
    with pytest.raises(IntegrityError) as e:
        ensure_file(f"{server.base}/f.bin", dest, expected, progress=False)
    assert f"starts with {actual}, expected {expected}" in str(e.value)
    assert not dest.exists() and _leftovers(tmp_path) == [] and server.requests["f.bin"] == 1
    ensure_file(f"{server.base}/f.bin", dest, expected, progress=False)  # the server is fixed: fine
    assert dest.read_bytes() == body


def test_http_500_then_success_is_retried(server, tmp_path, fast_retries):
    body = os.urandom(50_000)
    server.files["f.bin"] = body
    server.plans["f.bin"] = ["500"]
    dest = tmp_path / "f.bin"
    ensure_file(f"{server.base}/f.bin", dest, hashlib.sha256(body).hexdigest()[:8], progress=False)
    assert dest.read_bytes() == body and server.requests["f.bin"] == 2


def test_http_404_is_not_retried(server, tmp_path, fast_retries):
    with pytest.raises(DownloadError, match="HTTP 404"):
        ensure_file(f"{server.base}/nothing.bin", tmp_path / "nothing.bin", "abcd", progress=False)
    assert server.requests["nothing.bin"] == 1


@pytest.mark.parametrize("action", ["stall", "stall_headers"])
def test_a_stalled_server_times_out_with_a_clear_message(server, tmp_path, fast_retries, monkeypatch, action):
    body = os.urandom(100_000)
    server.files["f.bin"] = body
    server.plans["f.bin"] = [action] * 2
    monkeypatch.setenv(fetch.ENV_TIMEOUT, "0.3")
    monkeypatch.setenv(fetch.ENV_RETRIES, "1")
    dest = tmp_path / "f.bin"
    start = time.monotonic()
    with pytest.raises(DownloadError) as e:
        ensure_file(f"{server.base}/f.bin", dest, "abcd", progress=False)
    assert time.monotonic() - start < 10
    assert "no data for 0.3 s" in str(e.value) or "no response within 0.3 s" in str(e.value)
    assert "2 attempts" in str(e.value)
    assert not dest.exists() and _leftovers(tmp_path) == []


_FETCH_SCRIPT = """
import dataclasses, pathlib, sys, time
import torch, visionzoo
url, file_name, prefix, ready, go = sys.argv[1:6]
record = dataclasses.replace(visionzoo.get_weights("squeezenet1_1"), url=url, file_name=file_name,
                             sha256_prefix=prefix)
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.01)
model = visionzoo.create_model("squeezenet1_1", weights=record, progress=False)
with torch.no_grad():
    print(repr(model(torch.ones(1, 3, 64, 64)).double().sum().item()))
"""


def test_four_processes_fetching_at_once_download_once(server, tmp_path, squeezenet_file):
    body, digest, source = squeezenet_file
    record = record_for(server, body, digest, name="concurrent")
    server.delay = 0.01  # ~1 s for the body: the others arrive while it downloads
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH_SCRIPT, record.url, record.file_name,
                               record.sha256_prefix, str(tmp_path / f"ready{i}"), str(tmp_path / "go")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(4)]
    try:
        deadline = time.monotonic() + 240
        while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers failed to start"
            time.sleep(0.05)
        (tmp_path / "go").touch()
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    with torch.no_grad():
        expected = repr(source(torch.ones(1, 3, 64, 64)).double().sum().item())
    assert [out.strip() for out, _ in results] == [expected] * 4
    assert server.requests[record.file_name] == 1


def test_a_corrupt_cached_file_is_fetched_again(server, squeezenet_file, caplog):
    body, digest, source = squeezenet_file
    record = record_for(server, body, digest, name="corrupt")
    cached = cache_dir() / record.file_name
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(body[: len(body) // 2])  # e.g. an interrupted copy by hand
    with caplog.at_level(logging.WARNING, logger="visionzoo"):
        model = visionzoo.create_model("squeezenet1_1", weights=record, progress=False)
    assert "is corrupt" in caplog.text and server.requests[record.file_name] == 1
    assert cached.read_bytes() == body and _same(model, source)


def test_a_cached_file_is_hashed_once(server, squeezenet_file, monkeypatch):
    body, digest, _ = squeezenet_file
    record = record_for(server, body, digest, name="hashonce")
    cached = cache_dir() / record.file_name
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(body)  # as torchvision would have downloaded it: no sidecar yet
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(fetch.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    for _ in range(3):
        visionzoo.create_model("squeezenet1_1", weights=record, progress=False)
    assert len(hashed) == 1 and server.requests[record.file_name] == 0
    # a changed file (new mtime) is verified again, and a wrong one refused
    cached.write_bytes(body[::-1])
    visionzoo.create_model("squeezenet1_1", weights=record, progress=False)
    assert len(hashed) == 3 and server.requests[record.file_name] == 1  # check + new download


def test_offline_with_the_file_cached_uses_no_network(server, squeezenet_file, monkeypatch):
    body, digest, source = squeezenet_file
    record = record_for(server, body, digest, name="offline")
    visionzoo.create_model("squeezenet1_1", weights=record, progress=False)  # online: cached
    assert server.requests[record.file_name] == 1
    monkeypatch.setenv("VISIONZOO_OFFLINE", "1")
    model = visionzoo.create_model("squeezenet1_1", weights=record)
    assert _same(model, source) and server.requests[record.file_name] == 1


def test_offline_without_the_file_says_what_to_put_where(server, squeezenet_file, monkeypatch):
    body, digest, _ = squeezenet_file
    record = record_for(server, body, digest, name="missing")
    monkeypatch.setenv("VISIONZOO_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as e:
        visionzoo.create_model("squeezenet1_1", weights=record)
    msg = str(e.value)
    assert record.file_name in msg and str(cache_dir()) in msg and "offline" in msg and "\n" not in msg
    assert server.requests[record.file_name] == 0


def test_offline_with_a_corrupt_cached_file_refuses_it(server, squeezenet_file, monkeypatch):
    body, digest, _ = squeezenet_file
    record = record_for(server, body, digest, name="offcorrupt")
    (cache_dir() / record.file_name).parent.mkdir(parents=True, exist_ok=True)
    (cache_dir() / record.file_name).write_bytes(b"garbage" * 100)
    monkeypatch.setenv("VISIONZOO_OFFLINE", "1")
    with pytest.raises(IntegrityError, match="replace it with a good copy"):
        visionzoo.create_model("squeezenet1_1", weights=record)
    assert server.requests[record.file_name] == 0


def test_mirror_replaces_the_published_url(server, squeezenet_file, monkeypatch, tmp_path):
    body, digest, source = squeezenet_file
    record = record_for(server, body, digest, name="mirrored")
    record = dataclasses.replace(record, url="http://127.0.0.1:9/unreachable/" + record.file_name)
    monkeypatch.setenv("VISIONZOO_MIRROR", server.base + "/")
    model = visionzoo.create_model("squeezenet1_1", weights=record, progress=False)
    assert _same(model, source) and server.requests[record.file_name] == 1

    # a plain directory works as a mirror too (a network share)
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / record.file_name).write_bytes(body)
    (cache_dir() / record.file_name).unlink()
    monkeypatch.setenv("VISIONZOO_MIRROR", str(tmp_path / "share"))
    model = visionzoo.create_model("squeezenet1_1", weights=record, progress=False)
    assert _same(model, source) and server.requests[record.file_name] == 1
