"""The HTTP prediction server: endpoints, the same answers as `predict`, errors, clean shutdown."""
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
from PIL import Image

import visionzoo
from visionzoo.errors import InputError
from visionzoo.tasks.serve import DRAIN_LIMIT, make_server, serve

IMAGES = Path(__file__).parent.parent / "examples" / "images"
COFFEE = IMAGES / "coffee.png"


def _run(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server():
    srv = make_server("efficientnet_lite0", port=0, backend="torch", topk=5)
    thread = _run(srv)
    yield srv
    _stop(srv, thread)


def call(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; error statuses too."""
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_health_and_info(server):
    assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0")
    status, body, headers = call(server.url + "/health")
    assert (status, body) == (200, {"status": "ok"})
    assert headers["Content-Type"] == "application/json"
    status, info, _ = call(server.url + "/info")
    assert status == 200
    assert info["arch"] == "efficientnet_lite0"
    assert info["num_classes"] == 1000 and len(info["classes"]) == 1000 and info["classes"][967] == "espresso"
    assert info["preprocess"]["crop_size"] == 224 and info["preprocess"]["resize_size"] == 256
    assert (info["backend"], info["precision"]) == ("torch", "fp32")


def test_predict_gives_what_predict_gives(server):
    expected = visionzoo.predict([COFFEE], "efficientnet_lite0", topk=5, num_workers=0)[0]
    status, body, _ = call(server.url + "/predict", "POST", COFFEE.read_bytes())
    assert status == 200, body
    got = body["predictions"]
    assert [p["rank"] for p in got] == [1, 2, 3, 4, 5]
    assert got[0]["label"] == expected.label == "espresso"
    assert [p["index"] for p in got] == [t.index for t in expected.top]
    for p, t in zip(got, expected.top, strict=True):
        assert p["probability"] == pytest.approx(t.probability, abs=1e-5)
    assert body["model"] == "efficientnet_lite0"


def test_predict_jpeg_bytes_and_topk_query(server, tmp_path):
    # a JPEG large enough for predict's fast (reduced-scale) decoding path: the server must take it too
    img = Image.open(IMAGES / "chelsea.png").convert("RGB").resize((1804, 1200))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(buf.getvalue())
    expected = visionzoo.predict([path], "efficientnet_lite0", topk=3, num_workers=0)[0]
    status, body, _ = call(server.url + "/predict?topk=3", "POST", buf.getvalue())
    assert status == 200, body
    assert [p["index"] for p in body["predictions"]] == [t.index for t in expected.top]
    assert body["predictions"][0]["probability"] == pytest.approx(expected.top[0].probability, abs=1e-5)


def test_near_ties_are_decided_on_the_full_size_decode_as_predict_does(server, tmp_path, monkeypatch):
    from visionzoo.tasks import predict as predict_module

    img = Image.open(COFFEE).convert("RGB").resize((1800, 1200))  # a clear answer: no near-tie by default
    path = tmp_path / "coffee.jpg"
    img.save(path, quality=90)
    exact = visionzoo.predict([path], "efficientnet_lite0", topk=1, num_workers=0, fast=False)[0].top[0]
    fast = call(server.url + "/predict?topk=1", "POST", path.read_bytes())[1]["predictions"][0]
    assert fast["probability"] != pytest.approx(exact.probability, abs=1e-6)  # the reduced decode differs
    monkeypatch.setattr(predict_module, "NEAR_TIE", 1.0)  # every image counts as a near-tie
    redone = call(server.url + "/predict?topk=1", "POST", path.read_bytes())[1]["predictions"][0]
    assert (redone["index"], redone["probability"]) == (exact.index, pytest.approx(exact.probability, abs=1e-5))


def test_bad_requests(server):
    status, body, _ = call(server.url + "/predict", "POST", b"this is not an image at all" * 10)
    assert status == 400
    assert set(body) == {"error"} and "\n" not in body["error"] and "not an image" in body["error"]
    truncated = COFFEE.read_bytes()[:5000]
    status, body, _ = call(server.url + "/predict", "POST", truncated)
    assert status == 400 and "truncated" in body["error"]
    status, body, _ = call(server.url + "/predict", "POST", b"")
    assert status == 400 and "empty" in body["error"]
    status, body, _ = call(server.url + "/predict?topk=zero", "POST", COFFEE.read_bytes())
    assert status == 400 and "topk" in body["error"]
    status, body, _ = call(server.url + "/nope")
    assert status == 404 and "/predict" in body["error"]
    status, body, _ = call(server.url + "/nope", "POST", b"xyz")
    assert status == 404
    status, body, headers = call(server.url + "/predict")
    assert status == 405 and headers["Allow"] == "POST"
    # the server still answers after all that
    assert call(server.url + "/health")[0] == 200


def test_body_too_large(server):
    small = make_server(server.runner, port=0, max_bytes=1000)
    thread = _run(small)
    try:
        status, body, _ = call(small.url + "/predict", "POST", COFFEE.read_bytes())
        assert status == 413 and "1,000 bytes" in body["error"]
        # a declared length far over the limit is refused without reading the body
        host, port = small.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Length", str(DRAIN_LIMIT + 1))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and "error" in json.loads(response.read())
        conn.close()
        # no Content-Length at all
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.putrequest("POST", "/predict")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411
        conn.close()
        status, body, _ = call(small.url + "/predict", "POST", b"\x89PNG" + b"\0" * 100)
        assert status == 400  # under the limit: decoded (and refused as an image)
    finally:
        _stop(small, thread)


def test_keep_alive_connection_serves_several_requests(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    for _ in range(2):
        conn.request("POST", "/predict?topk=1", body=COFFEE.read_bytes())
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["predictions"][0]["label"] == "espresso"
    conn.request("GET", "/nope")
    response = conn.getresponse()
    assert response.status == 404
    response.read()
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_concurrent_requests_all_answered(server):
    data = COFFEE.read_bytes()
    results = []

    def one():
        results.append(call(server.url + "/predict?topk=1", "POST", data))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4
    assert all(status == 200 and body["predictions"][0]["label"] == "espresso" for status, body, _ in results)


def test_port_in_use_is_an_input_error(server):
    with pytest.raises(InputError, match="cannot listen"):
        make_server(server.runner, port=server.server_address[1])


def test_serve_returns_and_cleans_up_after_shutdown(server):
    holder = {}
    ready = threading.Event()

    def on_ready(srv):
        holder["server"] = srv
        ready.set()

    thread = threading.Thread(target=serve, args=(server.runner,), kwargs={"port": 0, "on_ready": on_ready},
                              daemon=True)
    thread.start()
    assert ready.wait(30)
    srv = holder["server"]
    assert call(srv.url + "/health")[0] == 200
    srv.shutdown()
    thread.join(10)
    assert not thread.is_alive()
    assert not srv.tmp.exists()


def _default_sigint() -> None:
    # a test run started in the background by a non-interactive shell inherits SIGINT ignored,
    # and so would the server: give it the disposition a terminal's Ctrl-C meets
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serve_stops_on_ctrl_c_and_sigterm(tmp_path, signum):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "visionzoo", "serve", "efficientnet_lite0", "--port", "0",
                             "--backend", "torch"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_default_sigint)
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
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
