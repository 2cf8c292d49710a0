"""`visionzoo serve`: a production HTTP server for a zoo model, and a web page to try it.

    visionzoo serve efficientnet_lite0 --backend openvino --max-batch 32
    curl --data-binary @photo.jpg http://127.0.0.1:8000/predict
    open http://127.0.0.1:8000/          (the page: drop images, see top-k, the Grad-CAM toggle)

An ASGI application (Starlette) on uvicorn, with uvicorn's h11 protocol hardened
(`protocol.py`: JSON framing errors, a request-head deadline). Images are decoded in a bounded
thread pool exactly as `predict` decodes files, and run in dynamic batches (`batching.py`) on
any backend; the model card's task picks the handler (`handlers.py`). Endpoints:

    GET  /               the web page (static files in `web/`, no build step, no CDN)
    GET  /health         {"status": "ok"} while the process serves
    GET  /ready          200 once the model is loaded and warmed up, 503 before
    GET  /info           the model's card (architecture, weights, accuracy, preprocessing) and settings
    GET  /metrics        Prometheus metrics (`metrics.py`)
    GET  /openapi.json   the OpenAPI description
    POST /predict        the image as the raw body or a multipart file; `?topk=N`
    POST /explain        the same body; `?target=CLASS`; a PNG with the Grad-CAM heat map

Threads: the event loop (every connection, idle or not), `decode_workers` decode threads, one
inference thread, and the runtime's own compute threads; none per connection.

Errors are `{"error": "<one line>"}`: 400 a bad image, query or request; 404, 405; 408 a head
or body that did not arrive in time; 411 no length; 413 a body over `max_bytes`; 431 headers
too long; 501 no explanations for an exported file; 503 queue full (`Retry-After`).
"""
from __future__ import annotations

from .app import ServeSettings, create_app
from .server import DEFAULT_PORT, ServerThread, serve, server_url, start_server

__all__ = ["DEFAULT_PORT", "ServeSettings", "ServerThread", "create_app", "serve", "server_url", "start_server"]
