"""HTTP framing on uvicorn's h11 protocol, hardened: JSON errors and a deadline for the request head.

uvicorn answers a request it cannot parse (bad framing, a head over the size limit, a long URL)
itself, in plain text, and lets a connection that never completes its request head sit for as
long as the client likes (its keep-alive timer is reset by every byte received, so one byte every
few seconds keeps it forever). This subclass answers those requests with our JSON error and
the status h11 suggests (431 for a head too long, 501 for an unsupported transfer coding), and
closes a connection whose request head is not complete `header_timeout` seconds after the
connection opened or after its previous response (408 when part of a head had arrived).

h11 (pure Python) is chosen over httptools for its strict parsing: it refuses signed or
duplicated differing Content-Length values, Content-Length together with chunked encoding, and
bytes that do not belong in a header, before the application sees anything.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0
MAX_HEAD_BYTES = 16 * 1024  # request line and headers together (h11's limit; 431 above it)
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            501: "Not Implemented"}


def error_bytes(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 error response with a JSON body, that closes the connection."""
    body = (json.dumps({"error": message}) + "\n").encode()
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with JSON framing errors and a request-head deadline."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_timer: Any = None
        self._waiting_cycle: Any = None
        self._head_bytes = 0  # bytes received since the deadline was armed
        self._head_seen = b""  # the start of a request head not yet complete (for its size limit)
        self._head_done = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
            if not self._head_done and not self._head_fits(data):
                self._refuse(431, f"the request line and headers are over {MAX_HEAD_BYTES:,} bytes")
                return
        super().data_received(data)

    def _head_fits(self, data: bytes) -> bool:
        """Whether the request head being received stays within `MAX_HEAD_BYTES` (h11 checks only
        heads that arrive in pieces: a long one in a single read would pass)."""
        window = self._head_seen + data
        end = window.find(b"\r\n\r\n")
        if end >= 0:
            self._head_done, self._head_seen = True, b""
            return end <= MAX_HEAD_BYTES
        self._head_seen = window[-(MAX_HEAD_BYTES + 4):]
        return len(window) <= MAX_HEAD_BYTES

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._waiting_cycle:
            self._disarm_head_deadline()  # a complete request head arrived: the application has it now

    def on_response_complete(self) -> None:
        # armed first: a pipelined request already buffered is parsed inside the call below and disarms it
        if not self.transport.is_closing():
            self._arm_head_deadline()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from inside its `except h11.RemoteProtocolError`: the error is at hand
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400)
        reason = str(exc) if exc is not None and str(exc) else msg
        if status == 431:
            reason = f"the request line and headers are over {MAX_HEAD_BYTES:,} bytes"
        self._refuse(status, reason if status == 431 else f"malformed HTTP request: {reason}")

    def _refuse(self, status: int, message: str) -> None:
        self._disarm_head_deadline()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, message))
            self.transport.close()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._waiting_cycle = self.cycle
        self._head_bytes = 0
        self._head_seen, self._head_done = b"", False
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_deadline_passed)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes:
            self.transport.write(error_bytes(408, f"the request head did not arrive within "
                                                  f"{self.header_timeout:g} s"))
        self.transport.close()


def protocol_class(header_timeout: float) -> type[GuardedH11Protocol]:
    """`GuardedH11Protocol` with its head deadline set (uvicorn builds the protocol itself)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})
