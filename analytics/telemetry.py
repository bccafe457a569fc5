"""The service's own metrics (``gpu_analytics_*``), in a registry that belongs to one app.

Request count and latency are labelled by the route template (``/api/v1/gpu/devices/<id>``,
never the raw path) and a normalised method, so clients cannot inflate cardinality.
Prometheus errors are counted where they happen, by wrapping the client, so errors that a
blueprint catches and degrades around are counted too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"


class ServiceMetrics:
    """Request and Prometheus-client metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gpu_analytics_http_requests_total",
            "HTTP requests served, by route template, method and status code.",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "gpu_analytics_http_request_duration_seconds",
            "Time to serve an HTTP request in seconds, by route template, method and status.",
            ["endpoint", "method", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        self.prometheus_errors = Counter(
            "gpu_analytics_prometheus_errors_total",
            "Failed calls to Prometheus, by kind (unavailable: unreachable or 5xx; query: "
            "Prometheus rejected the query).",
            ["kind"],
            registry=registry,
        )
        self.prometheus_duration = Histogram(
            "gpu_analytics_prometheus_request_duration_seconds",
            "Time spent in calls to Prometheus in seconds, by client method.",
            ["call"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        for kind in ("unavailable", "query"):
            self.prometheus_errors.labels(kind=kind)

    def install(self, app: Flask) -> None:
        """Time every request of ``app`` and count it once its status is known."""

        @app.before_request
        def _start_timer() -> None:
            g.gpu_analytics_started = time.perf_counter()

        @app.after_request
        def _observe(response: Response) -> Response:
            started = g.pop("gpu_analytics_started", None)
            rule = request.url_rule
            endpoint = rule.rule if rule is not None else UNMATCHED
            method = request.method if request.method in _METHODS else "OTHER"
            labels = {"endpoint": endpoint, "method": method, "status": str(response.status_code)}
            self.requests.labels(**labels).inc()
            if started is not None:
                self.latency.labels(**labels).observe(time.perf_counter() - started)
            return response


class InstrumentedPrometheus:
    """A transparent proxy over a Prometheus client that times calls and counts failures."""

    def __init__(
        self,
        client: Any,
        metrics: ServiceMetrics,
        unavailable: type[BaseException],
        query_error: type[BaseException],
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._unavailable = unavailable
        self._query_error = query_error

    @property
    def wrapped(self) -> Any:
        """The client itself."""
        return self._client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        return self._instrument(name, attribute)

    def _instrument(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        metrics = self._metrics

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = function(*args, **kwargs)
            except self._unavailable:
                metrics.prometheus_errors.labels(kind="unavailable").inc()
                raise
            except self._query_error:
                metrics.prometheus_errors.labels(kind="query").inc()
                raise
            finally:
                metrics.prometheus_duration.labels(call=name).observe(time.perf_counter() - started)
            if name == "healthy" and result is False:
                metrics.prometheus_errors.labels(kind="unavailable").inc()
            return result

        return call
