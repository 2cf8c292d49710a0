"""Hostile HTTP against the running server: framing, deadlines, idle connections, and a Hypothesis fuzz
of request framing. Every answer is a well-formed response whose errors are JSON, and the server
keeps serving within a memory limit."""
from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from visionzoo.runtime.backends import open_runner
from visionzoo.tasks.serve import ServeSettings, start_server

COFFEE = Path(__file__).parent.parent / "examples" / "images" / "coffee.png"
TIMEOUTS = {"header_timeout": 0.6, "body_timeout": 0.6}


@pytest.fixture(scope="module")
def server():
    runner = open_runner("efficientnet_lite0", "torch", precision="fp32")
    with start_server(runner, settings=ServeSettings(max_bytes=64 * 1024, max_batch=4, explain=False,
                                                     **TIMEOUTS)) as srv:
        yield srv


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(server, data: bytes, *, wait: float = 3.0, pause: float = 0.0) -> bytes:
    """Send raw bytes, read until the server closes or `wait` seconds pass; what came back."""
    with socket.create_connection(address(server), timeout=wait) as sock:
        if data:
            try:
                sock.sendall(data)
            except OSError:  # the server may close early (an error answered before the rest was sent)
                pass
        if pause:
            time.sleep(pause)
        chunks = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), raw[:200]
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        # the first answer only: bytes after a complete request are a pipelined second request
        # (a fuzzed "...\r\n\r\n\t-\n" gets a 404 and then a 400 on one connection)
        body = body[: int(headers["content-length"])]
    return status, headers, body


def assert_json_error(raw: bytes, status: int | None = None) -> dict:
    code, headers, body = parse(raw)
    if status is not None:
        assert code == status, raw[:300]
    assert code >= 400 and headers["content-type"] == "application/json", raw[:300]
    payload = json.loads(body)
    assert set(payload) == {"error"} and "\n" not in payload["error"]
    return payload


def request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def test_framing_errors_are_json(server):
    image = COFFEE.read_bytes()[:1000]
    cases = [
        (request("POST", "/predict", [("Content-Length", "+35042")], image), 400),
        (request("POST", "/predict", [("Content-Length", "-1")]), 400),
        (request("POST", "/predict", [("Content-Length", "10"), ("Content-Length", "12")], b"x" * 12), 400),
        (request("POST", "/predict", [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
                 b"0\r\n\r\n"), 400),
        (request("POST", "/predict", [("Transfer-Encoding", "gzip")], b"abc"), 501),
        (request("GET", "/" + "a" * 20000, []), 431),
        (request("GET", "/health", [("X-Long", "b" * 20000)]), 431),
        (request("GET", "/health", [(f"X-{i}", "v" * 100) for i in range(300)]), 431),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n", 400),
        (request("POST", "/predict", [("Content-Length", str(10**30))]), 400),
        (request("POST", "/predict", [("Content-Length", str(10**9))]), 413),
    ]
    for data, status in cases:
        assert_json_error(exchange(server, data), status)
    status, _, body = parse(exchange(server, request("GET", "/health", [])))
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_chunked_upload_is_served(server):
    buf = io.BytesIO()
    Image.open(COFFEE).convert("RGB").save(buf, "JPEG", quality=85)  # under the 64 KiB limit of this server
    data = buf.getvalue()
    chunks = b"".join(f"{len(data[i:i + 5000]):x}\r\n".encode() + data[i:i + 5000] + b"\r\n"
                      for i in range(0, len(data), 5000))
    raw = exchange(server, request("POST", "/predict?topk=1", [("Transfer-Encoding", "chunked"),
                                                                ("Connection", "close")], chunks + b"0\r\n\r\n"),
                   wait=60)
    status, _, body = parse(raw)
    assert status == 200 and json.loads(body)["predictions"][0]["label"] == "espresso"


def test_a_request_head_that_does_not_arrive_in_time(server):
    started = time.monotonic()
    assert exchange(server, b"", wait=5) == b""  # silent connection: closed without an answer
    assert 0.4 < time.monotonic() - started < 3
    # one byte at a time keeps no connection open past the deadline (slowloris)
    with socket.create_connection(address(server), timeout=5) as sock:
        started = time.monotonic()
        received = b""
        for byte in b"GET /health HTTP/1.1\r\nHost: slow\r\n":
            try:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                received = sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                break
            if received:
                break
        assert time.monotonic() - started < 3
    assert_json_error(received, 408)


def test_a_body_that_does_not_arrive_in_time(server):
    raw = exchange(server, request("POST", "/predict", [("Content-Length", "5000")], b"x" * 100), wait=5)
    payload = assert_json_error(raw, 408)
    assert "body" in payload["error"]


def _threads_and_rss() -> tuple[int, int]:
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return threading.active_count(), rss


def test_idle_connections_cost_no_threads_and_health_stays_fast(server):
    before, _ = _threads_and_rss()
    socks = [socket.create_connection(address(server), timeout=5) for _ in range(200)]
    try:
        worst = 0.0
        for _ in range(5):
            started = time.perf_counter()
            status, _, _ = parse(exchange(server, request("GET", "/health", [("Connection", "close")])))
            worst = max(worst, time.perf_counter() - started)
            assert status == 200
        assert threading.active_count() == before
        assert worst < 0.5  # loopback on a busy 2-core machine; the load benchmark measures it under 100 ms
    finally:
        for s in socks:
            s.close()


_LENGTHS = st.one_of(st.integers(0, 70000).map(str), st.sampled_from(
    ["+35042", "-0", " 12", "12 ", "1e3", "0x10", "١٢", "", "99999999999999999999", "3, 3", "3,4", "\t7"]))
_HEADER = st.tuples(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30),
                    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200))


@st.composite
def framings(draw) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "get", "PO ST"]))
    path = draw(st.sampled_from(["/predict", "/health", "/info", "/predict?topk=2", "/x", "*", "//", "/%00"]))
    headers = [("Host", "fuzz")]
    body = draw(st.binary(max_size=3000))
    framing = draw(st.sampled_from(["length", "two-lengths", "chunked", "chunked-bad", "none", "both"]))
    if framing in ("length", "two-lengths", "both"):
        headers.append(("Content-Length", draw(_LENGTHS)))
    if framing == "two-lengths":
        headers.append(("Content-Length", draw(_LENGTHS)))
    if framing in ("chunked", "both"):
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "Chunked", "gzip, chunked"]))))
        size = len(body)
        body = f"{size:x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if size else b"0\r\n\r\n"
    if framing == "chunked-bad":
        headers.append(("Transfer-Encoding", "chunked"))
        body = draw(st.sampled_from([b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nabc\r\n", b"-1\r\n\r\n", b"ffffffffffff\r\n"]))
    headers += draw(st.lists(_HEADER, max_size=4))
    if draw(st.booleans()):
        headers.append(("X-Huge", "h" * draw(st.integers(1000, 40000))))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1", "replace") + body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=framings())
@example(data=b"POST /%00 HTTP/1.1\r\nHost: fuzz\r\n\r\n\t-\n")  # CI stop 22: two answers on one connection
def test_fuzzed_framing_gets_well_formed_answers(server, data):
    raw = exchange(server, data, wait=3)
    if not raw:
        return  # closed without an answer: allowed for a request that never completes
    status, headers, body = parse(raw)
    if status >= 400:
        assert headers.get("content-type") == "application/json", raw[:300]
        if not data.upper().startswith(b"HEAD "):
            assert "error" in json.loads(body)


def test_the_server_survives_the_fuzz_within_memory(server):
    _, before = _threads_and_rss()
    big = request("POST", "/predict", [("Content-Length", str(60 * 1024))], b"\xff" * (60 * 1024))
    for _ in range(40):  # bodies just under the limit, never decoded as images
        assert_json_error(exchange(server, big), 400)
    _, after = _threads_and_rss()
    assert after - before < 200 * 2**20
    status, _, _ = parse(exchange(server, request("GET", "/health", [])))
    assert status == 200
