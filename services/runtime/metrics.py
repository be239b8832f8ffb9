"""Prometheus metrics: one registry per service instance, served on /metrics.

Metric objects belong to a `ServiceMetrics` instance rather than to module
globals, so several services (or tests) can live in one process.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

# Wide enough for a sub-millisecond unary call and a minutes-long stream.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


class ServiceMetrics:
    """The per-RPC metrics every service records, plus a registry for its own."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tensorgate_rpc_requests_total",
            "RPCs handled, by method and final status code",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tensorgate_rpc_duration_seconds",
            "RPC wall time from first byte to final status",
            ["service", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.service = service
        # Label lookups take a lock and hash the label values; a call's method and
        # code repeat, so their children are looked up once.
        self._requests: dict[tuple[str, str], Counter] = {}
        self._durations: dict[str, Histogram] = {}

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        name = code.name
        counter = self._requests.get((method, name))
        if counter is None:
            counter = self._requests[(method, name)] = self.requests.labels(
                self.service, method, name
            )
        counter.inc()
        histogram = self._durations.get(method)
        if histogram is None:
            histogram = self._durations[method] = self.duration.labels(self.service, method)
        histogram.observe(seconds)


class MetricsEndpoint:
    """An HTTP server exposing a registry at /metrics on its own thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
