"""A scripted loopback HTTP server for download tests, and a small checkpoint to serve."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

import visionzoo


class FaultServer:
    """A loopback HTTP server whose answers are scripted per file.

    `plans[name]` is a list of actions used one per request ("ok" once it is empty):
    "ok", "drop" (half the body, then close), "500", "404", "wrong" (other bytes of the same
    length), "stall" (half the body, then silence), "stall_headers" (no response at all).
    `requests[name]` counts the requests; `delay` slows "ok" bodies down (seconds per 64 KiB).
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.plans: dict[str, list[str]] = defaultdict(list)
        self.requests: Counter = Counter()
        self.delay = 0.0
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests[name] += 1
                body = server.files.get(name)
                action = server.plans[name].pop(0) if server.plans[name] else "ok"
                if body is None or action == "404":
                    self.send_error(404)
                    return
                if action == "500":
                    self.send_error(500)
                    return
                if action == "stall_headers":
                    server.release.wait(30)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action in ("drop", "stall"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if action == "stall":
                        server.release.wait(30)
                    return  # HTTP/1.0: the connection closes here
                if action == "wrong":
                    body = bytes(reversed(body))
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i:i + (1 << 16)])
                    if server.delay:
                        time.sleep(server.delay)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def squeezenet_checkpoint(directory: Path):
    """(bytes of a squeezenet1_1 checkpoint, its SHA-256, the model it came from)."""
    torch.manual_seed(0)
    model = visionzoo.create_model("squeezenet1_1")
    path = directory / "sq.pth"
    torch.save(model.state_dict(), path)
    body = path.read_bytes()
    return body, hashlib.sha256(body).hexdigest(), model


def record_for(server: FaultServer, body: bytes, digest: str, name: str = "sq"):
    """A squeezenet1_1 weights record served by `server` (file named like torchvision's)."""
    file_name = f"{name}-{digest[:8]}.pth"
    server.files[file_name] = body
    return dataclasses.replace(visionzoo.get_weights("squeezenet1_1"), url=f"{server.base}/{file_name}",
                               file_name=file_name, sha256_prefix=digest[:8])
