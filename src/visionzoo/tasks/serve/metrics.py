"""The server's Prometheus metrics (prometheus_client), one registry per application.

    visionzoo_requests_total{endpoint, code}     answered requests
    visionzoo_errors_total{code}                 answers with status >= 400 (503: turned away, queue full)
    visionzoo_request_seconds{endpoint}          latency, histogram
    visionzoo_batch_size                         images per model call, histogram
    visionzoo_inference_seconds                  time of one model call, histogram
    visionzoo_queue_depth                        requests admitted and not yet answered
    visionzoo_batch_queue                        decoded images waiting for a batch
    visionzoo_decodes_in_progress                images being decoded now (at most --decode-workers)
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self, batch_waiting: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("visionzoo_requests", "Answered requests", ["endpoint", "code"], registry=r)
        self.errors = Counter("visionzoo_errors", "Answers with an error status", ["code"], registry=r)
        self.latency = Histogram("visionzoo_request_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("visionzoo_batch_size", "Images per model call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.inference = Histogram("visionzoo_inference_seconds", "Time of one model call",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("visionzoo_queue_depth", "Requests admitted and not yet answered", registry=r)
        self.batch_queue = Gauge("visionzoo_batch_queue", "Decoded images waiting for a batch", registry=r)
        self.batch_queue.set_function(batch_waiting)
        self.decoding = Gauge("visionzoo_decodes_in_progress", "Images being decoded", registry=r)

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if code >= 400:
            self.errors.labels(str(code)).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
