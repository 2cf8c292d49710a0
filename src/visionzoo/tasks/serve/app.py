"""The ASGI application: routes, request bodies under limits, admission, batching, metrics.

A request to `/predict` is admitted only while fewer than `max_queue` requests are in the
server (otherwise a 503 with `Retry-After` at once); its body is streamed to a temporary file
under a size limit and a deadline; the file is decoded in a bounded pool of threads (at most
`decode_workers` images in memory at once, whatever the number of connections) by the task's
handler, exactly as `predict` decodes files; the input joins the next batch (`batching.py`);
the answer is the handler's JSON. Every error is `{"error": "<one line>"}` with its status.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive

from ...data.images import DEFAULT_MAX_PIXELS, load_image
from ...errors import ImageError, InputError, VisionZooError
from ...runtime.backends import OpenVINORunner, Runner, is_model_file
from ...version import __version__
from .batching import Batcher, bucket_sizes, padded_size
from .handlers import MAX_TOPK, TaskHandler, handler_for
from .metrics import ServerMetrics

log = logging.getLogger("visionzoo")
WEB = Path(__file__).parent / "web"
DEFAULT_MAX_BYTES = 20 * 2**20
DRAIN_LIMIT = 2**20  # a refused request's body up to this is read and dropped, so the connection stays usable
ROUTES = ("/", "/health", "/ready", "/info", "/metrics", "/openapi.json", "/predict", "/explain")


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches, limits and times out (the `visionzoo serve` options)."""

    topk: int = 5  # classes per image unless a request asks `?topk=N`
    max_bytes: int = DEFAULT_MAX_BYTES  # the largest request body (413 above it, checked while reading)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are refused before decoding
    fast: bool = True  # predict's fast JPEG path (reduced-scale decode, near-ties redone in full)
    max_batch: int = 32  # images per model call at most
    max_delay_ms: float = 5.0  # how long the first image of a batch waits for others
    max_queue: int = 32  # requests in the server at once; more get 503 + Retry-After (bounds the latency)
    decode_workers: int | None = None  # images decoded at once (None: one per core, at most 4)
    header_timeout: float = 10.0  # seconds for a request head to arrive (per request)
    body_timeout: float = 30.0  # seconds for a whole request body to arrive
    keepalive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    shutdown_timeout: float = 30.0  # graceful shutdown: in-flight requests get this long to finish
    retry_after: int = 1  # seconds, in the Retry-After of a 503
    explain: bool = True  # serve /explain (Grad-CAM; needs the model's PyTorch weights)

    def __post_init__(self) -> None:
        positive = {"max_bytes": self.max_bytes, "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "header_timeout": self.header_timeout, "body_timeout": self.body_timeout,
                    "keepalive_timeout": self.keepalive_timeout, "retry_after": self.retry_after}
        for name, value in positive.items():
            if not value > 0:
                raise InputError(f"{name} must be > 0, got {value}")
        if not 1 <= self.topk <= MAX_TOPK:
            raise InputError(f"topk must be between 1 and {MAX_TOPK}, got {self.topk}")
        if self.max_delay_ms < 0 or self.shutdown_timeout < 0:
            raise InputError("max_delay_ms and shutdown_timeout must be >= 0")
        if self.decode_workers is not None and self.decode_workers < 1:
            raise InputError(f"decode_workers must be >= 1, got {self.decode_workers}")

    @property
    def workers(self) -> int:
        from ...data.loader import available_cpus

        return self.decode_workers or min(4, available_cpus())


class RequestError(Exception):
    """Ends a request with a JSON error; `close` ends the connection too (a body left unread)."""

    def __init__(self, status: int, message: str, *, close: bool = False, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, headers or {}


def error_response(status: int, message: str, *, close: bool = False,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class PredictService:
    """One model behind the routes: its runner, task handler, batcher, decode pool and metrics."""

    def __init__(self, runner: Runner, settings: ServeSettings, *, explain_source: Any = None):
        self.runner = runner
        self.settings = settings
        self.handler: TaskHandler = handler_for(runner, topk=settings.topk, max_pixels=settings.max_pixels,
                                                fast=settings.fast)
        # OpenVINO compiles a network per batch shape: batches are padded to a few sizes
        self.pad_sizes = bucket_sizes(settings.max_batch) if isinstance(runner, OpenVINORunner) else None
        if isinstance(runner, OpenVINORunner) and self.pad_sizes and len(self.pad_sizes) > runner.MAX_SHAPES:
            runner.MAX_SHAPES = len(self.pad_sizes)  # every padded size stays compiled
        self.batcher: Batcher[torch.Tensor, torch.Tensor] = Batcher(
            self._run_batch, max_batch=settings.max_batch, max_delay=settings.max_delay_ms / 1000,
            on_batch=self._on_batch)
        self.metrics = ServerMetrics(lambda: self.batcher.waiting)
        self.decode_pool: Any = None
        self.tmp: Path | None = None
        self.admitted = 0
        self.ready = False
        self.started = time.time()
        self._explain_source = explain_source
        self._explainer: Any = None
        self._warmup: asyncio.Task | None = None

    # lifecycle (the application's lifespan)
    async def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.tmp = Path(tempfile.mkdtemp(prefix="visionzoo-serve-"))
        self.decode_pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="visionzoo-decode",
                                              initializer=_one_torch_thread)
        self.batcher.start()
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up())

    async def stop(self) -> None:
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._warmup
        await self.batcher.stop()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def _warm_up(self) -> None:
        """Model calls before `/ready` says so: every padded batch shape (OpenVINO compiles each), else
        one image and a full batch (ONNX Runtime creates its per-core sessions and grows its memory
        arenas to the largest batch now, not on the first busy moment)."""
        size = self.runner.info.input_size
        if size is None:  # only classifiers are served (handler_for), and a classifier's graph has a size
            raise RuntimeError(f"{self.runner.arch}: a served graph without an input size")
        for n in self.pad_sizes or sorted({1, self.settings.max_batch}):
            await self.batcher.call(self.handler.run, torch.zeros(n, 3, size, size))
        self.ready = True
        log.info("warmed up: %s", self.runner.describe())

    # the model thread
    def _run_batch(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.stack(tensors)
        n = len(x)
        if self.pad_sizes is not None and (size := padded_size(n, self.pad_sizes)) > n:
            x = torch.cat([x, x.new_zeros(size - n, *x.shape[1:])])
        return list(self.handler.run(x)[:n])

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.observe_batch(size, seconds)

    # requests
    @contextlib.asynccontextmanager
    async def admission(self, request: Request):
        """Hold one of the `max_queue` places for the request, or answer 503 at once."""
        if self.admitted >= self.settings.max_queue:
            close = await self._drop_body(request)
            raise RequestError(503, f"the server is at capacity ({self.settings.max_queue} requests queued); "
                               f"retry in {self.settings.retry_after} s", close=close,
                               headers={"Retry-After": str(self.settings.retry_after)})
        self.admitted += 1
        self.metrics.queue_depth.inc()
        try:
            yield
        finally:
            self.admitted -= 1
            self.metrics.queue_depth.dec()

    async def _drop_body(self, request: Request) -> bool:
        """Read and drop the body of a refused request when it is small; True: close the connection."""
        declared = request.headers.get("content-length")
        if declared is None or int(declared) > DRAIN_LIMIT:
            return True
        try:
            async for _ in Request(request.scope, self._guarded(request.receive, DRAIN_LIMIT)).stream():
                pass
        except (RequestError, ClientDisconnect):
            return True
        return False

    def _guarded(self, receive: Receive, limit: int) -> Receive:
        """`receive` under the body limit and the body deadline (both checked as the bytes arrive)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.body_timeout
        total = 0

        async def guarded() -> Message:
            nonlocal total
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the request body did not arrive within {self.settings.body_timeout:g} s",
                                   close=True) from None
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > limit:
                    raise RequestError(413, f"the body is over {limit:,} bytes; this server takes images up "
                                       f"to {self.settings.max_bytes:,} bytes", close=True)
            return message

        return guarded

    async def save_body(self, request: Request) -> Path:
        """The uploaded image in a temporary file: the raw body, or the first file of a multipart form."""
        headers = request.headers
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        declared = headers.get("content-length")
        if declared is None and not chunked:
            raise RequestError(411, "send the image as the body, with a Content-Length (or chunked)")
        if declared is not None and int(declared) > self.settings.max_bytes:  # h11 let only digits through
            raise RequestError(413, f"the body is {int(declared):,} bytes; this server takes images up to "
                               f"{self.settings.max_bytes:,} bytes", close=True)
        assert self.tmp is not None  # started
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".img")
        path = Path(name)
        try:
            guarded = Request(request.scope, self._guarded(request.receive, self.settings.max_bytes))
            with os.fdopen(fd, "wb") as f:
                if headers.get("content-type", "").lower().startswith("multipart/form-data"):
                    await self._save_upload(guarded, f)
                else:
                    async for chunk in guarded.stream():
                        f.write(chunk)
            if path.stat().st_size == 0:
                raise RequestError(400, "empty body: send the image file's bytes (or a multipart form with "
                                   "the file)")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    @staticmethod
    async def _save_upload(request: Request, f) -> None:
        try:
            async with request.form(max_files=1, max_fields=16) as form:
                upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
                if upload is None:
                    raise RequestError(400, "the multipart form has no file; send the image as a file field")
                while chunk := await upload.read(1 << 20):
                    f.write(chunk)
        except HTTPException as e:  # starlette's refusal of a malformed or oversized form
            raise RequestError(e.status_code, f"bad multipart form: {e.detail}") from None

    async def decode(self, path: Path, *, exact: bool = False):
        self.metrics.decoding.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.decode_pool, functools.partial(self.handler.prepare, path, exact=exact))
        finally:
            self.metrics.decoding.dec()

    async def predict_file(self, path: Path, options: dict[str, Any]) -> dict[str, Any]:
        prepared = await self.decode(path)
        output = await self.batcher.submit(prepared.tensor)
        if self.handler.needs_exact(prepared, output):
            # as predict does: a near-tie of the reduced decode is decided on the full-size one
            prepared = await self.decode(path, exact=True)
            output = await self.batcher.submit(prepared.tensor)
        return self.handler.respond(output, options)

    # explanations
    def explainer(self):
        """The Grad-CAM explainer of the served model (built on first use); None when the model's
        PyTorch weights are not at hand (an exported file)."""
        if self._explainer is None:
            from ..explain import Explainer

            net = self.runner.torch_net
            if net is None and self._explain_source is not None:
                from ...factory import resolve_model

                net = resolve_model(self._explain_source)
            if net is not None:
                self._explainer = Explainer(net)
        return self._explainer

    def info(self) -> dict[str, Any]:
        r = self.runner
        d = r.info.to_dict()
        return {"arch": r.arch, "task": r.info.task.value, "num_classes": r.num_classes,
                "classes": list(r.categories) if r.categories else None, "preprocess": r.preprocess.to_dict(),
                "input_size": r.info.input_size, "embedding_dim": r.info.embedding_dim,
                "backend": r.backend.value, "precision": r.precision.value, "weights": d.get("weights"),
                "accuracy": _accuracy(d.get("weights")), "source": str(r.source),
                "quantization": d.get("quantization") or None,
                "auto": r.choice.summary() if r.choice is not None else None,
                "explain": self.settings.explain and (r.torch_net is not None or self._explain_source is not None),
                "settings": asdict(self.settings), "visionzoo_version": __version__}


def _one_torch_thread() -> None:
    """Decode threads run torch's small preprocessing ops on one thread each: the pool is the
    parallelism, and an OpenMP team per tiny op costs more than it saves (on a busy machine its
    spinning threads cost 30 ms of CPU per image). The setting is per thread; the model's is untouched."""
    torch.set_num_threads(1)


def _accuracy(weights: str | None) -> dict[str, Any] | None:
    """The published accuracy of a weights record name (None for a bundle or a file)."""
    if not weights or weights.startswith("bundle "):
        return None
    from ...registry import REGISTRY

    try:
        record = REGISTRY.get_weights(weights)
    except VisionZooError:
        return None
    return {"dataset": record.dataset, "acc1": record.acc1, "acc5": record.acc5}


def _explain_source(model: Any) -> Any:
    """What the explainer can build a PyTorch model from: a name or bundle (not an exported file)."""
    from ...models.base import VisionModel

    if isinstance(model, VisionModel):
        return model
    if isinstance(model, (str, os.PathLike)) and not is_model_file(model):
        return model
    return None


def create_app(model: Any, *, backend: str = "auto", threads: int | None = None, precision: str = "auto",
               settings: ServeSettings | None = None) -> Starlette:
    """The server's ASGI application for `model` (a name, bundle, model, exported file or `Runner`).

    `app.state.service` is the `PredictService`; run the app with `server.serve` / `start_server`
    (uvicorn with the hardened protocol), or any ASGI server."""
    from ...runtime.backends import open_runner

    settings = settings or ServeSettings()
    # `auto` measures at the largest batch the server forms (the batches that cost the most)
    runner = open_runner(model, backend, threads=threads, precision=precision, batch_size=settings.max_batch)
    service = PredictService(runner, settings, explain_source=_explain_source(model) if settings.explain else None)
    return build_app(service)


def build_app(service: PredictService) -> Starlette:
    s = service

    async def index(request: Request) -> Response:
        return FileResponse(WEB / "index.html", media_type="text/html")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if not s.ready:
            return error_response(503, "warming up: the model is not ready yet", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "model": s.runner.describe()})

    async def info(request: Request) -> Response:
        return JSONResponse(s.info())

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        from .openapi import schema

        return JSONResponse(schema(s))

    async def predict(request: Request) -> Response:
        options = _query(s.handler.parse_query, request)
        async with s.admission(request):
            path = await s.save_body(request)
            try:
                return JSONResponse(await s.predict_file(path, options))
            finally:
                path.unlink(missing_ok=True)

    async def explain(request: Request) -> Response:
        if not s.settings.explain:
            raise RequestError(404, "explanations are turned off on this server (--no-explain)")
        explainer = await s.batcher.call(s.explainer)  # the first call may build the model: off the event loop
        if explainer is None:
            raise RequestError(501, "explanations need the model's PyTorch weights; serve a model name or bundle, "
                               "not an exported file")
        target = request.query_params.get("target")
        async with s.admission(request):
            path = await s.save_body(request)
            try:
                loop = asyncio.get_running_loop()
                img = await loop.run_in_executor(s.decode_pool, functools.partial(
                    load_image, path, max_pixels=s.settings.max_pixels))
                result = await s.batcher.call(explainer.explain_image, img, target)
                png = await loop.run_in_executor(s.decode_pool, _png, result.overlay(img))
            finally:
                path.unlink(missing_ok=True)
        return Response(png, media_type="image/png", headers={
            "X-Target-Index": str(result.target), "X-Target-Label": _header_safe(result.label),
            "X-Target-Probability": f"{result.probability:.6f}", "X-Stage": result.stage})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await s.start()
        try:
            yield
        finally:
            await s.stop()

    routes = [Route("/", index), Route("/health", health), Route("/ready", ready), Route("/info", info),
              Route("/metrics", metrics), Route("/openapi.json", openapi),
              Route("/predict", predict, methods=["POST"]), Route("/explain", explain, methods=["POST"]),
              Mount("/web", StaticFiles(directory=WEB), name="web")]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        HTTPException: _http_error, RequestError: _request_error, ImageError: _image_error,
        InputError: _input_error, Exception: _server_error})
    app.state.service = service
    app.add_middleware(_Observe, service=service)
    return app


def _query(parse: Callable[[Any], dict[str, Any]], request: Request) -> dict[str, Any]:
    try:
        return parse(request.query_params)
    except InputError as e:
        raise RequestError(400, str(e)) from None


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")


# errors: every one is {"error": "<one line>"} with its status
async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    route = request.url.path
    route = route if len(route) <= 80 else route[:80] + "..."
    if exc.status_code == 404:
        message = (f"no such endpoint {route!r}; use GET / (the page), /health, /ready, /info, /metrics, "
                   f"/openapi.json, or POST /predict, /explain")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{route} takes {allowed or 'another method'}, not {request.method}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=exc.headers)


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_response(exc.status, exc.message, close=exc.close, headers=exc.headers)


async def _image_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ImageError)
    return error_response(400, f"not a readable image: {exc.reason}")


async def _input_error(request: Request, exc: Exception) -> Response:
    return error_response(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


async def _server_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnect):
        return Response(status_code=499)  # nobody reads it; the client left
    log.error("request failed: %s: %s", type(exc).__name__, exc)
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return error_response(500, f"the server failed: {type(exc).__name__}: {first}")


class _Observe:
    """ASGI middleware: latency and status of every request into the metrics."""

    def __init__(self, app, service: PredictService):
        self.app = app
        self.metrics = service.metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in ROUTES else "/web" if path.startswith("/web/") else "other"
        status = 500

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.observe(endpoint, status, time.perf_counter() - started)
