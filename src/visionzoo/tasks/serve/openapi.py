"""The server's OpenAPI description (`GET /openapi.json`), written out: Starlette does not derive one,
and a hand-written one says what the endpoints really take (raw bytes or a form) and answer."""
from __future__ import annotations

from typing import Any

from ...version import __version__

_ERROR = {"description": "an error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
_IMAGE_BODY = {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}
_REFUSALS = {"400": _ERROR, "408": _ERROR, "411": _ERROR, "413": _ERROR, "503": _ERROR}


def _get(summary: str, content_type: str = "application/json") -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": {content_type: {}}}}}}


def schema(service: Any) -> dict[str, Any]:
    top = {"name": "topk", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 100}}
    target = {"name": "target", "in": "query", "required": False, "description": "class index or label "
              "(default: the most probable class)", "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"visionzoo serve: {service.runner.arch}", "version": __version__},
        "paths": {
            "/": _get("The web page", "text/html"),
            "/health": _get("Alive"),
            "/ready": {"get": {"summary": "Model loaded and warmed up", "responses": {
                "200": {"description": "ready"}, "503": _ERROR}}},
            "/info": _get("The model's card and the server's settings"),
            "/metrics": _get("Prometheus metrics", "text/plain"),
            "/predict": {"post": {"summary": "Top-k classes of one image (raw bytes or a multipart file)",
                                  "parameters": [top], "requestBody": _IMAGE_BODY,
                                  "responses": {"200": {"description": "the predictions"}, **_REFUSALS}}},
            "/explain": {"post": {"summary": "Grad-CAM heat map over one image, as a PNG",
                                  "parameters": [target], "requestBody": _IMAGE_BODY,
                                  "responses": {"200": {"description": "the overlay",
                                                        "content": {"image/png": {}}},
                                                **_REFUSALS, "501": _ERROR}}},
        },
    }
