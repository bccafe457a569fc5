"""The service's own metrics (``gpu_analytics_*``), in a registry that belongs to one app.

Request count and latency are labelled by the route template (``/api/v1/gpu/devices/<id>``,
never the raw path) and a normalised method, so clients cannot inflate cardinality.
Prometheus errors are counted where they happen, by wrapping the client, so errors that a
blueprint catches and degrades around are counted too.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

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


class CostMetrics:
    """The service's results as metrics: current GPU cost per hour by namespace and by team.

    Read from the recorded pricing series by a background refresh every `refresh_seconds`, so
    a scrape of /metrics never waits on Prometheus. Until the first refresh succeeds nothing
    is published (never a made-up 0); if a refresh fails, the last values stay and
    `gpu_analytics_cost_refresh_success` says 0.
    """

    def __init__(self, prometheus: Any, team_label: str, refresh_seconds: float) -> None:
        self._prometheus = prometheus
        self._team_label = team_label
        self._refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, float]] = {}
        self._success: bool | None = None
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        """Query the recorded cost rates once (the background thread calls this)."""
        from analytics import pricing

        try:
            values = {
                "namespace": self._latest(pricing.NAMESPACE_COST, "namespace"),
                "team": self._latest(pricing.TEAM_COST, "team"),
            }
        except Exception:  # an outage or a bad answer: keep what we had, say it failed
            with self._lock:
                self._success = False
            return
        with self._lock:
            self._values, self._success = values, True

    def _latest(self, metric: str, label: str) -> dict[str, float]:
        samples = self._prometheus.query(f"sum by ({label}) ({metric})")
        return {str(s.labels.get(label, "")): float(s.value) for s in samples}

    def describe(self) -> Iterator[Metric]:
        """Families without samples: registering does not start the refresh thread."""
        yield GaugeMetricFamily("gpu_analytics_namespace_cost_dollars_per_hour", "", labels=[])
        yield GaugeMetricFamily("gpu_analytics_team_cost_dollars_per_hour", "", labels=[])
        yield GaugeMetricFamily("gpu_analytics_cost_refresh_success", "", labels=[])

    def collect(self) -> Iterator[Metric]:
        self._ensure_refreshing()
        with self._lock:
            values, success = dict(self._values), self._success
        namespaces = GaugeMetricFamily(
            "gpu_analytics_namespace_cost_dollars_per_hour",
            "GPU cost per hour of each namespace now, in US dollars, from the pricing rules.",
            labels=["namespace"],
        )
        for name, value in sorted(values.get("namespace", {}).items()):
            namespaces.add_metric([name], value)
        teams = GaugeMetricFamily(
            "gpu_analytics_team_cost_dollars_per_hour",
            "GPU cost per hour of each team now, in US dollars (team '' when pods have none).",
            labels=["team"],
        )
        for name, value in sorted(values.get("team", {}).items()):
            teams.add_metric([name], value)
        yield namespaces
        yield teams
        if success is not None:
            yield GaugeMetricFamily(
                "gpu_analytics_cost_refresh_success",
                "1 when the last refresh of the cost metrics from Prometheus succeeded, else 0.",
                value=1.0 if success else 0.0,
            )

    def _ensure_refreshing(self) -> None:
        """Start the refresh thread on the first scrape (apps built in tests never start it)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="cost-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self.refresh()
            time.sleep(self._refresh_seconds)
