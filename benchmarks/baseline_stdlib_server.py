"""The benchmark baseline: visionzoo's first `serve`, a thread-per-connection server on the standard
library that runs one image per forward pass behind a lock (kept only so that
`benchmarks/serve_load.py` can measure the ASGI server against it in the same run).

    python benchmarks/baseline_stdlib_server.py efficientnet_lite0 --port 8001

    visionzoo serve efficientnet_lite0 --port 8000
    curl --data-binary @photo.jpg http://127.0.0.1:8000/predict

Endpoints (every response is JSON; errors are `{"error": "<one line>"}`):

    GET  /health         {"status": "ok"}
    GET  /info           the model: architecture, classes, preprocessing, backend, precision
    POST /predict        the raw bytes of one image file as the body (any format `predict`
                         reads); `?topk=N` overrides the server's top-k. Returns
                         {"model": ..., "predictions": [{"rank", "index", "label", "probability"}, ...]}

    400 an unreadable image or a bad query; 404 an unknown path; 405 a known path with the
    wrong method; 411 no Content-Length; 413 a body over `max_bytes`; 500 inference failed.

Images are decoded and preprocessed exactly as `predict` does (`data/images.load_image`,
with the fast JPEG path unless `fast=False`, then the model's own recipe; a near-tie of the
fast path decided on the full-size decode), so the server and `visionzoo predict` give the
same answer for the same file. Requests are handled in
threads (decoding runs concurrently); inference is serialised by a lock, since one model
serves them all. Ctrl-C (or SIGTERM) stops the server cleanly.

`make_server` returns the (not yet serving) server: tests and embedding applications run
`server.serve_forever()` in a thread (port 0 picks a free port: see `server.url`) and stop
it with `server.shutdown()` and `server.server_close()`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch

from visionzoo.data.images import DEFAULT_MAX_PIXELS, draft_info, load_image
from visionzoo.errors import ImageError, InputError
from visionzoo.runtime.backends import open_runner
from visionzoo.tasks.predict import near_ties
from visionzoo.version import __version__

log = logging.getLogger("visionzoo")
DEFAULT_PORT = 8000
DEFAULT_MAX_BYTES = 20 * 2**20  # the largest request body accepted (413 above it)
DRAIN_LIMIT = 64 * 2**20  # an oversized body up to this is read and discarded, so the client sees the 413
MAX_TOPK = 100


class PredictServer(ThreadingHTTPServer):
    """A threading HTTP server holding one runner; see the module docstring."""

    daemon_threads = True  # a client that keeps its connection open does not block shutdown
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], runner, *, topk: int = 5, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, fast: bool = True):
        self.runner = runner
        self.topk = topk
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.reduce_to = runner.preprocess.resize_size if fast else None
        self.transform = runner.preprocess.transforms()
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests = 0
        self.tmp: Path | None = None
        super().__init__(address, _Handler)  # closes the socket itself when binding fails
        # uploaded bytes go to files here, so that decoding is exactly `predict`'s (load_image reads files)
        self.tmp = Path(tempfile.mkdtemp(prefix="visionzoo-serve-"))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def info(self) -> dict[str, Any]:
        r = self.runner
        d = r.info.to_dict()
        return {"arch": r.arch, "num_classes": r.num_classes, "classes": list(r.categories) if r.categories else None,
                "preprocess": r.preprocess.to_dict(), "input_size": r.info.input_size,
                "embedding_dim": r.info.embedding_dim, "backend": r.backend.value, "precision": r.precision.value,
                "weights": d.get("weights"), "source": str(r.source), "quantization": d.get("quantization") or None,
                "topk": self.topk, "max_bytes": self.max_bytes, "visionzoo_version": __version__}

    def predict_bytes(self, data: bytes, topk: int | None = None) -> dict[str, Any]:
        """Top-k of one image file's bytes; `ImageError` when they are not a readable image."""
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".img")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            img = load_image(name, max_pixels=self.max_pixels, reduce_to=self.reduce_to)
            probs = self._probabilities(img)
            if draft_info(img) is not None and near_ties(probs[None])[0]:
                # as predict does: a near-tie of the reduced decode is decided on the full-size one
                probs = self._probabilities(load_image(name, max_pixels=self.max_pixels))
        finally:
            Path(name).unlink(missing_ok=True)
        k = min(topk or self.topk, self.runner.num_classes)
        values, classes = probs.topk(k)
        names = self.runner.categories
        return {"model": self.runner.arch, "predictions": [
            {"rank": r + 1, "index": c, "label": names[c] if names else f"class_{c}", "probability": v}
            for r, (v, c) in enumerate(zip(values.tolist(), classes.tolist(), strict=True))]}

    def _probabilities(self, img) -> torch.Tensor:
        x = self.transform(img).unsqueeze(0)
        with self.lock:
            logits = self.runner.logits(x)
        return torch.softmax(logits.float(), dim=1)[0]

    def server_close(self) -> None:
        super().server_close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class _Handler(BaseHTTPRequestHandler):
    server: PredictServer
    protocol_version = "HTTP/1.1"  # keep-alive: every response has a Content-Length

    GET_ROUTES = ("/health", "/info")
    POST_ROUTES = ("/predict",)

    @property
    def server_version(self) -> str:  # type: ignore[override]
        return f"visionzoo/{__version__}"

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        route = urlsplit(self.path).path
        if route == "/health":
            self._send(HTTPStatus.OK, {"status": "ok"})
        elif route == "/info":
            self._send(HTTPStatus.OK, self.server.info())
        elif route in self.POST_ROUTES:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{route} takes POST with the image bytes as the body",
                        allow="POST")
        else:
            self._not_found(route)

    def do_POST(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        if parts.path != "/predict":
            self._skip_body()
            if parts.path in self.GET_ROUTES:
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{parts.path} takes GET", allow="GET")
            else:
                self._not_found(parts.path)
            return
        try:
            topk = _topk(parts.query)
        except ValueError as e:
            self._skip_body()
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        body = self._body()
        if body is None:
            return
        try:
            result = self.server.predict_bytes(body, topk)
        except ImageError as e:
            self._error(HTTPStatus.BAD_REQUEST, f"not a readable image: {e.reason}")
            return
        except Exception as e:  # noqa: BLE001  (report any inference failure as one line, keep serving)
            log.exception("inference failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}")
            return
        self.server.requests += 1
        self._send(HTTPStatus.OK, result)

    def do_PUT(self) -> None:  # noqa: N802
        self._skip_body()
        route = urlsplit(self.path).path
        if route in self.GET_ROUTES or route in self.POST_ROUTES:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{route} takes "
                        f"{'GET' if route in self.GET_ROUTES else 'POST'}",
                        allow="GET" if route in self.GET_ROUTES else "POST")
        else:
            self._not_found(route)

    do_DELETE = do_PATCH = do_PUT

    def _body(self) -> bytes | None:
        """The request body, or None after answering 411/413/400."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "send the image with a Content-Length (chunked bodies are "
                        "not supported)")
            return None
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "send the image bytes as the body, with a Content-Length")
            return None
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_text!r}")
            return None
        if length > self.server.max_bytes:
            if length <= DRAIN_LIMIT:
                self._discard(length)  # so that the client, still sending, reads the answer
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is {length:,} bytes; this server takes "
                        f"images up to {self.server.max_bytes:,} bytes")
            return None
        if length == 0:
            self._error(HTTPStatus.BAD_REQUEST, "empty body: send the image file's bytes")
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {length} bytes")
            return None
        return body

    def _skip_body(self) -> None:
        """Read and drop a body that will not be used, so that the connection stays usable
        (or mark it for closing when the body is too large or its length unknown)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if chunked or not 0 <= length <= DRAIN_LIMIT:
            self.close_connection = True
        elif length:
            self._discard(length)

    def _discard(self, length: int) -> None:
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)

    def _not_found(self, route: str) -> None:
        self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {route!r}; use GET /health, GET /info or "
                    f"POST /predict")

    def _error(self, status: HTTPStatus, message: str, *, allow: str | None = None) -> None:
        self._send(status, {"error": message}, allow=allow)

    def _send(self, status: HTTPStatus, payload: dict[str, Any], *, allow: str | None = None) -> None:
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (http.server's signature)
        log.info("%s %s", self.address_string(), format % args)


def _topk(query: str) -> int | None:
    values = parse_qs(query).get("topk")
    if not values:
        return None
    try:
        k = int(values[-1])
    except ValueError:
        raise ValueError(f"topk must be a whole number, got {values[-1]!r}") from None
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"topk must be between 1 and {MAX_TOPK}, got {k}")
    return k


def make_server(model, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, backend: str = "auto",
                threads: int | None = None, precision: str = "fp32", topk: int = 5,
                max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                fast: bool = True) -> PredictServer:
    """A `PredictServer` for `model` bound to (host, port), not yet serving.

    Args:
        model: a name (`arch[.TAG]`), a bundle folder, a visionzoo model, an ONNX file from
            `export`/`quantize`, or a `Runner`.
        port: 0 picks a free port (see `server.url`).
        backend, threads, precision: as for `predict`.
        topk: classes returned per image (a request may ask for others with `?topk=N`).
        max_bytes: the largest accepted body (413 above it).
        max_pixels: refuse larger images (decompression bombs); None: no limit.
        fast: decode large JPEGs at a reduced scale first, as `predict` does by default.
    """
    if not 1 <= topk <= MAX_TOPK:
        raise InputError(f"topk must be between 1 and {MAX_TOPK}, got {topk}")
    if max_bytes < 1:
        raise InputError(f"max_bytes must be >= 1, got {max_bytes}")
    if not 0 <= port <= 65535:
        raise InputError(f"port must be between 0 and 65535, got {port}")
    runner = open_runner(model, backend, threads=threads, precision=precision)
    try:
        return PredictServer((host, port), runner, topk=topk, max_bytes=max_bytes, max_pixels=max_pixels,
                             fast=fast)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or "
                         f"--host") from None


def serve(model, host: str = "127.0.0.1", port: int = DEFAULT_PORT, backend: str = "auto",
          threads: int | None = None, topk: int = 5, max_bytes: int = DEFAULT_MAX_BYTES, *,
          precision: str = "fp32", max_pixels: int | None = DEFAULT_MAX_PIXELS, fast: bool = True,
          on_ready=None) -> None:
    """Serve `model` over HTTP until Ctrl-C or SIGTERM (see the module docstring).

    `on_ready(server)` is called once the socket listens (the CLI prints the URL there).
    """
    server = make_server(model, host, port, backend=backend, threads=threads, precision=precision, topk=topk,
                         max_bytes=max_bytes, max_pixels=max_pixels, fast=fast)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (docker stop, systemd) stops the server like Ctrl-C does
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if on_ready is not None:
            on_ready(server)
        log.info("serving %s on %s", server.runner.describe(), server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping the server")
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    def ready(server) -> None:
        print(f"serving {server.runner.describe()} on {server.url}", flush=True)

    serve(args.model, args.host, args.port, backend=args.backend, threads=args.threads, on_ready=ready)


if __name__ == "__main__":
    main()
