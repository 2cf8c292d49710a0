"""Running the application: uvicorn with the hardened protocol, in the foreground or in a thread.

`serve(...)` runs until Ctrl-C or SIGTERM, then shuts down gracefully: it stops accepting,
closes idle connections, lets in-flight requests finish (up to `shutdown_timeout`), then stops
the batcher. `start_server(...)` runs the same server in a background thread (tests, notebooks,
embedding applications): `with start_server(model, port=0) as srv: srv.url`.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from ...errors import InputError
from ...optional import require
from .app import ServeSettings, create_app
from .protocol import MAX_HEAD_BYTES, protocol_class

log = logging.getLogger("visionzoo")
DEFAULT_PORT = 8000


def _config(app, host: str, port: int, settings: ServeSettings, sock: socket.socket | None = None):
    uvicorn = require("uvicorn")
    return uvicorn.Config(app, host=host, port=port, http=protocol_class(settings.header_timeout),
                          lifespan="on", log_level="warning", access_log=False, backlog=2048,
                          timeout_keep_alive=settings.keepalive_timeout,
                          timeout_graceful_shutdown=settings.shutdown_timeout,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, server_header=False, date_header=False)


def _server_class():
    uvicorn = require("uvicorn")

    class Server(uvicorn.Server):
        """uvicorn's server, calling `on_ready(self)` once its socket listens."""

        on_ready: Callable[[Any], None] | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and self.on_ready is not None:
                self.on_ready(self)

    return Server


def server_url(server) -> str:
    """The http:// address a started uvicorn server listens on (its real port when 0 was asked)."""
    sock = server.servers[0].sockets[0]
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise InputError(f"port must be between 0 and 65535, got {port}")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is our error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or "
                         f"--host") from None
    sock.set_inheritable(True)
    return sock


def serve(model: Any, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, backend: str = "auto",
          threads: int | None = None, precision: str = "auto", settings: ServeSettings | None = None,
          on_ready: Callable[[Any], None] | None = None) -> None:
    """Serve `model` over HTTP until Ctrl-C or SIGTERM, then shut down gracefully.

    Args:
        model: a name (`arch[.TAG]`), a bundle folder, a visionzoo model, an ONNX file from
            `export`/`quantize`, or a `Runner`.
        backend, threads, precision: as for `predict`.
        settings: batching, limits and timeouts (`ServeSettings`).
        on_ready: called with the uvicorn server once the socket listens (`server_url(server)`).
    """
    _check_port(port)
    settings = settings or ServeSettings()
    app = create_app(model, backend=backend, threads=threads, precision=precision, settings=settings)
    sock = _bind(host, port)
    server = _server_class()(_config(app, host, port, settings))
    server.on_ready = on_ready
    previous = None
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it once it has shut down: SIGTERM (docker stop,
        # systemd) then ends here like Ctrl-C does, instead of killing the process
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class ServerThread:
    """A server running in a background thread; `stop()` shuts it down gracefully."""

    def __init__(self, app, host: str, port: int, settings: ServeSettings):
        self.app = app
        self.sock = _bind(host, port)
        self.server = _server_class()(_config(app, host, port, settings))
        self._ready = threading.Event()
        self.url = ""  # the http:// address, once started
        self.server.on_ready = self._on_ready
        self.thread = threading.Thread(target=self._run, name="visionzoo-server", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # noqa: BLE001  (reported by start())
            self.error = e
        finally:
            self._ready.set()

    @property
    def service(self):
        return self.app.state.service

    def _on_ready(self, server) -> None:
        self.url = server_url(server)
        self._ready.set()

    def start(self, timeout: float = 120) -> ServerThread:
        self.thread.start()
        if not self._ready.wait(timeout) or not self.server.started:
            self.stop()
            raise RuntimeError(f"the server did not start ({self.error!r})")
        return self

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(model: Any, host: str = "127.0.0.1", port: int = 0, *, backend: str = "auto",
                 threads: int | None = None, precision: str = "auto",
                 settings: ServeSettings | None = None) -> ServerThread:
    """Start serving `model` in a background thread (port 0: a free one, see `.url`); returns once
    the socket listens. Stop it with `.stop()` or use it as a context manager."""
    _check_port(port)
    settings = settings or ServeSettings()
    app = create_app(model, backend=backend, threads=threads, precision=precision, settings=settings)
    return ServerThread(app, host, port, settings).start()
