"""The HTTP server: endpoints, the same answers as `predict`, batching, backpressure, metrics, shutdown."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

import visionzoo
from visionzoo.errors import InputError
from visionzoo.runtime.backends import Runner, open_runner
from visionzoo.tasks.serve import ServeSettings, start_server
from visionzoo.tasks.serve.batching import bucket_sizes, padded_size

from .photos import photos

IMAGES = Path(__file__).parent.parent / "examples" / "images"
COFFEE = IMAGES / "coffee.png"


@pytest.fixture(scope="module")
def runner():
    return open_runner("efficientnet_lite0", "torch", precision="fp32")


@pytest.fixture(scope="module")
def server(runner):
    with start_server(runner, settings=ServeSettings(max_batch=8, max_delay_ms=20)) as srv:
        yield srv


def call(url: str, method: str = "GET", data: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; error statuses too."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def multipart(data: bytes, name: str = "photo.jpg") -> tuple[bytes, str]:
    boundary = "visionzooboundary1234"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_health_ready_info_openapi(server):
    assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0")
    status, body, headers = call(server.url + "/health")
    assert (status, body) == (200, {"status": "ok"})
    assert headers["content-type"] == "application/json"
    deadline = time.time() + 60
    while call(server.url + "/ready")[0] != 200 and time.time() < deadline:
        time.sleep(0.2)
    assert call(server.url + "/ready")[1]["status"] == "ready"
    status, info, _ = call(server.url + "/info")
    assert status == 200
    assert (info["arch"], info["task"], info["backend"], info["precision"]) == (
        "efficientnet_lite0", "classification", "torch", "fp32")
    assert info["num_classes"] == 1000 and info["classes"][967] == "espresso"
    assert info["preprocess"]["crop_size"] == 224 and info["accuracy"]["acc1"] > 70
    assert info["settings"]["max_batch"] == 8 and info["explain"] is True
    status, spec, _ = call(server.url + "/openapi.json")
    assert status == 200 and {"/predict", "/explain", "/metrics"} <= set(spec["paths"])


def test_served_top_k_is_predicts_on_the_sample_photos(server, tmp_path):
    files = photos()
    assert len(files) >= 5
    expected = visionzoo.predict(files, server.service.runner, topk=5, num_workers=0)
    for path, want in zip(files, expected, strict=True):
        data = path.read_bytes()
        form, content_type = multipart(data, path.name)
        for body, headers in ((data, {}), (form, {"Content-Type": content_type})):
            status, got, _ = call(server.url + "/predict", "POST", body, headers)
            assert status == 200, (path, got)
            assert [p["index"] for p in got["predictions"]] == [t.index for t in want.top], path
            for p, t in zip(got["predictions"], want.top, strict=True):
                assert p["probability"] == pytest.approx(t.probability, abs=1e-5)


def test_fast_path_jpeg_and_topk_query(server, tmp_path):
    # a JPEG large enough for predict's reduced-scale decoding: the server takes the same path
    img = Image.open(IMAGES / "chelsea.png").convert("RGB").resize((1804, 1200))
    path = tmp_path / "chelsea.jpg"
    img.save(path, quality=90)
    expected = visionzoo.predict([path], server.service.runner, topk=3, num_workers=0)[0]
    status, body, _ = call(server.url + "/predict?topk=3", "POST", path.read_bytes())
    assert status == 200, body
    assert [p["index"] for p in body["predictions"]] == [t.index for t in expected.top]
    assert body["predictions"][0]["probability"] == pytest.approx(expected.top[0].probability, abs=1e-5)


def test_near_ties_are_decided_on_the_full_size_decode(server, tmp_path, monkeypatch):
    from visionzoo.tasks import predict as predict_module

    img = Image.open(COFFEE).convert("RGB").resize((1800, 1200))  # a clear answer: no near-tie by default
    path = tmp_path / "coffee.jpg"
    img.save(path, quality=90)
    exact = visionzoo.predict([path], server.service.runner, topk=1, num_workers=0, fast=False)[0].top[0]
    fast = call(server.url + "/predict?topk=1", "POST", path.read_bytes())[1]["predictions"][0]
    assert fast["probability"] != pytest.approx(exact.probability, abs=1e-6)  # the reduced decode differs
    monkeypatch.setattr(predict_module, "NEAR_TIE", 1.0)  # every image counts as a near-tie
    redone = call(server.url + "/predict?topk=1", "POST", path.read_bytes())[1]["predictions"][0]
    assert (redone["index"], redone["probability"]) == (exact.index, pytest.approx(exact.probability, abs=1e-5))


def test_every_error_is_json_with_its_status(server):
    empty_form, form_type = multipart(b"")
    cases = [
        ("POST", "/predict", b"this is not an image at all" * 10, {}, 400, "not an image"),
        ("POST", "/predict", COFFEE.read_bytes()[:5000], {}, 400, "truncated"),
        ("POST", "/predict", b"", {}, 400, "empty"),
        ("POST", "/predict?topk=zero", COFFEE.read_bytes(), {}, 400, "topk"),
        ("POST", "/predict?topk=1000", COFFEE.read_bytes(), {}, 400, "topk"),
        ("POST", "/predict", empty_form, {"Content-Type": form_type}, 400, "empty"),
        ("POST", "/predict", b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"}, 400, "no file"),
        ("GET", "/nope", None, {}, 404, "/predict"),
        ("POST", "/nope", b"xyz", {}, 404, "/predict"),
        ("GET", "/predict", None, {}, 405, "POST"),
        ("OPTIONS", "/predict", None, {}, 405, "POST"),
        ("DELETE", "/health", None, {}, 405, "GET"),
        ("PUT", "/predict", b"abc", {}, 405, "POST"),
        ("GET", "/web/missing.js", None, {}, 404, "no such endpoint"),
    ]
    for method, path, data, headers, code, words in cases:
        status, body, got_headers = call(server.url + path, method, data, headers)
        assert status == code, (method, path, body)
        assert set(body) == {"error"} and "\n" not in body["error"] and words in body["error"], (method, path, body)
        assert got_headers["content-type"] == "application/json"
    status, body, headers = call(server.url + "/predict", "HEAD")
    assert status == 405 and headers["allow"] == "POST"
    assert call(server.url + "/health")[0] == 200  # still serving after all that


def test_body_limits_while_reading(runner):
    with start_server(runner, settings=ServeSettings(max_bytes=1000, max_queue=4)) as small:
        status, body, _ = call(small.url + "/predict", "POST", COFFEE.read_bytes())
        assert status == 413 and "1,000 bytes" in body["error"]
        host, port = small.url.removeprefix("http://").split(":")
        # a chunked body has no declared length: it is refused as soon as it passes the limit
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/predict")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for _ in range(5):
            conn.send(b"190\r\n" + b"x" * 400 + b"\r\n")
        response = conn.getresponse()
        assert response.status == 413 and response.getheader("connection") == "close"
        assert "error" in json.loads(response.read())
        conn.close()
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/predict")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
        conn.close()
        assert call(small.url + "/predict", "POST", b"\x89PNG" + b"\0" * 100)[0] == 400  # under the limit: decoded


class SlowRunner(Runner):
    """The real runner, slowed down: requests pile up while a batch runs."""

    def __init__(self, inner: Runner, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.info, self.source, self.backend, self.precision = inner.info, inner.source, inner.backend, inner.precision
        self.batches: list[int] = []

    def __call__(self, images: torch.Tensor):
        time.sleep(self.seconds)
        self.batches.append(len(images))
        return self.inner(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)[0]


def _concurrently(fn, n: int) -> list:
    results: list = [None] * n

    def one(i: int) -> None:
        results[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_requests_are_batched_and_counted(runner):
    slow = SlowRunner(runner, 0.3)
    data = COFFEE.read_bytes()
    with start_server(slow, settings=ServeSettings(max_batch=8, max_delay_ms=50, explain=False)) as srv:
        deadline = time.time() + 60
        while not srv.service.ready and time.time() < deadline:
            time.sleep(0.1)
        warm_up = len(slow.batches)  # one image and a full batch
        assert slow.batches == [1, 8]
        results = _concurrently(lambda i: call(srv.url + "/predict?topk=1", "POST", data), 12)
        assert all(status == 200 and body["predictions"][0]["label"] == "espresso" for status, body, _ in results)
        served = slow.batches[warm_up:]
        assert sum(served) == 12 and max(served) > 1 and max(served) <= 8, served
        text = urllib.request.urlopen(srv.url + "/metrics", timeout=30).read().decode()
    assert 'visionzoo_requests_total{code="200",endpoint="/predict"} 12.0' in text
    assert f"visionzoo_batch_size_count {len(served)}.0" in text
    for name in ("visionzoo_request_seconds_bucket", "visionzoo_queue_depth", "visionzoo_batch_queue",
                 "visionzoo_inference_seconds_sum", "visionzoo_decodes_in_progress"):
        assert name in text


def test_full_queue_answers_503_at_once_and_recovers(runner):
    slow = SlowRunner(runner, 1.0)
    data = COFFEE.read_bytes()
    with start_server(slow, settings=ServeSettings(max_batch=1, max_queue=2, explain=False)) as srv:

        def one(i: int):
            started = time.perf_counter()
            status, body, headers = call(srv.url + "/predict?topk=1", "POST", data)
            return status, body, headers, time.perf_counter() - started

        results = _concurrently(one, 6)
        accepted = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        assert len(accepted) + len(refused) == 6 and 2 <= len(accepted) <= 4 and refused, [r[0] for r in results]
        for _, body, headers, seconds in refused:
            assert headers["retry-after"] == "1" and "capacity" in body["error"] and seconds < 0.9
        assert call(srv.url + "/predict?topk=1", "POST", data)[0] == 200  # room again
        text = urllib.request.urlopen(srv.url + "/metrics", timeout=30).read().decode()
        assert f'visionzoo_errors_total{{code="503"}} {len(refused)}.0' in text


def test_graceful_shutdown_finishes_in_flight_requests(runner):
    slow = SlowRunner(runner, 1.5)
    srv = start_server(slow, settings=ServeSettings(max_batch=4, explain=False))
    results: list = []
    worker = threading.Thread(target=lambda: results.append(call(srv.url + "/predict?topk=1", "POST",
                                                                 COFFEE.read_bytes())))
    worker.start()
    time.sleep(0.7)  # the request is in the model now
    srv.stop()
    worker.join(60)
    assert results and results[0][0] == 200 and results[0][1]["predictions"][0]["label"] == "espresso"
    assert not srv.thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url + "/health", timeout=5)


def test_explain_endpoint_returns_a_heat_map_png(server):
    req = urllib.request.Request(server.url + "/explain?target=espresso", data=COFFEE.read_bytes(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"] == "image/png" and r.headers["x-target-index"] == "967"
        img = Image.open(io.BytesIO(r.read()))
    assert img.size == Image.open(COFFEE).size
    status, body, _ = call(server.url + "/explain?target=not-a-class", "POST", COFFEE.read_bytes())
    assert status == 400 and "target" in body["error"]


def test_settings_and_ports_are_checked(server):
    with pytest.raises(InputError, match="max_batch"):
        ServeSettings(max_batch=0)
    with pytest.raises(InputError, match="topk"):
        ServeSettings(topk=0)
    with pytest.raises(InputError, match="cannot listen"):
        start_server(server.service.runner, port=int(server.url.rsplit(":", 1)[1]))


def test_padded_batch_sizes():
    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert [padded_size(n, bucket_sizes(12)) for n in (1, 3, 8, 9, 12)] == [1, 4, 8, 12, 12]


def _default_sigint() -> None:
    # a test run started in the background by a non-interactive shell inherits SIGINT ignored,
    # and so would the server: give it the disposition a terminal's Ctrl-C meets
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serve_stops_on_ctrl_c_and_sigterm(signum):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "visionzoo", "serve", "efficientnet_lite0", "--port", "0",
                             "--backend", "torch", "--max-batch", "4"], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)
    try:
        line = proc.stderr.readline()
        deadline = time.time() + 120
        while "serving" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        match = re.search(r"http://[\d.]+:\d+", line)
        assert match, line
        status, body, _ = call(match.group(0) + "/health")
        assert (status, body) == (200, {"status": "ok"})
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
