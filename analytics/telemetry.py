"""The service's own metrics (``gpu_analytics_*``), in a registry that belongs to one app.

Request count and latency are labelled by the route template (``/api/v1/gpu/devices/<id>``,
never the raw path) and a normalised method, so clients cannot inflate cardinality.
Prometheus errors are counted where they happen, by wrapping the client, so errors that a
blueprint catches and degrades around are counted too.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Family:
    """One gauge family a background refresh publishes: name, help and label names."""

    name: str
    help: str
    labels: tuple[str, ...] = ()


#: A refresh's answer: family name -> [(label values, value)].
Readings = dict[str, list[tuple[tuple[str, ...], float]]]


class RefreshedMetrics:
    """Gauges computed from Prometheus in the background, at most every `refresh_seconds`.

    A scrape of /metrics never waits on Prometheus: a scrape that finds the readings older
    than the interval starts one background refresh and serves the last readings. Nobody
    scraping means no queries. Until the first refresh succeeds nothing is published (never
    a made-up 0); if a refresh fails, the last values stay and `<success_name>` says 0.
    """

    def __init__(
        self,
        name: str,
        families: tuple[Family, ...],
        compute: Callable[[], Readings],
        refresh_seconds: float,
        success: Family,
    ) -> None:
        self._name = name
        self._families = families
        self._compute = compute
        self._refresh_seconds = refresh_seconds
        self._success_family = success
        self._lock = threading.Lock()
        self._values: Readings = {}
        self._success: bool | None = None
        self._refreshing = False
        self._refreshed_at: float | None = None

    def refresh(self) -> None:
        """Compute the readings once (the background thread calls this)."""
        try:
            values = self._compute()
        except Exception as error:  # an outage or a bad answer: keep what we had, say so
            log.warning("refreshing the %s metrics failed: %s", self._name, error)
            with self._lock:
                self._success = False
            return
        with self._lock:
            self._values, self._success = values, True

    def describe(self) -> Iterator[Metric]:
        """Families without samples: registering does not start the refresh thread."""
        for family in (*self._families, self._success_family):
            yield GaugeMetricFamily(family.name, family.help, labels=[])

    def collect(self) -> Iterator[Metric]:
        self._ensure_refreshing()
        with self._lock:
            values, success = dict(self._values), self._success
        for family in self._families:
            gauge = GaugeMetricFamily(family.name, family.help, labels=list(family.labels))
            for labels, value in sorted(values.get(family.name, [])):
                gauge.add_metric(list(labels), value)
            yield gauge
        if success is not None:
            yield GaugeMetricFamily(
                self._success_family.name,
                self._success_family.help,
                value=1.0 if success else 0.0,
            )

    def _ensure_refreshing(self) -> None:
        """Start one background refresh when the readings are stale and none is running."""
        now = time.monotonic()
        with self._lock:
            fresh = self._refreshed_at is not None and (
                now - self._refreshed_at < self._refresh_seconds
            )
            if self._refreshing or fresh:
                return
            self._refreshing = True
            self._refreshed_at = now

        def run() -> None:
            try:
                self.refresh()
            finally:
                with self._lock:
                    self._refreshing = False

        threading.Thread(target=run, name=f"{self._name}-metrics", daemon=True).start()


NAMESPACE_COST = Family(
    "gpu_analytics_namespace_cost_dollars_per_hour",
    "GPU cost per hour of each namespace now, in US dollars, from the pricing rules.",
    ("namespace",),
)
TEAM_COST = Family(
    "gpu_analytics_team_cost_dollars_per_hour",
    "GPU cost per hour of each team now, in US dollars (team '' when pods have none).",
    ("team",),
)
COST_REFRESH = Family(
    "gpu_analytics_cost_refresh_success",
    "1 when the last refresh of the cost metrics from Prometheus succeeded, else 0.",
)


def cost_metrics(prometheus: Any, refresh_seconds: float) -> RefreshedMetrics:
    """Current GPU cost per hour by namespace and by team, from the recorded pricing series."""
    from analytics import pricing

    def compute() -> Readings:
        out: Readings = {}
        for family, metric, label in (
            (NAMESPACE_COST, pricing.NAMESPACE_COST, "namespace"),
            (TEAM_COST, pricing.TEAM_COST, "team"),
        ):
            samples = prometheus.query(f"sum by ({label}) ({metric})")
            out[family.name] = [((str(s.labels.get(label, "")),), float(s.value)) for s in samples]
        return out

    return RefreshedMetrics(
        "cost", (NAMESPACE_COST, TEAM_COST), compute, refresh_seconds, COST_REFRESH
    )


IDLE_DEVICES = Family(
    "gpu_analytics_idle_devices",
    "GPU-equivalents held by pods and idle now (a MIG slice counts k/7, a time-sliced share "
    "1/n), by namespace and team.",
    ("namespace", "team"),
)
IDLE_COST = Family(
    "gpu_analytics_idle_cost_dollars_per_hour",
    "What the allocated-but-idle GPUs cost per hour now, in US dollars, by namespace and team.",
    ("namespace", "team"),
)
SAVINGS = Family(
    "gpu_analytics_potential_monthly_savings_dollars",
    "Monthly savings the optimisation suggestions estimate from the last 7 days, in US dollars.",
)
IDLE_REFRESH = Family(
    "gpu_analytics_idle_refresh_success",
    "1 when the last refresh of the idle and savings metrics succeeded, else 0.",
)
SAVINGS_DAYS = 7


def idle_metrics(
    prometheus: Any, config: Any, prices: Any, clock: Callable[[], Any]
) -> RefreshedMetrics:
    """Idle devices and their cost per hour now (over the last two idle windows), and the
    potential monthly savings of the last 7 days."""
    from analytics import idle, optimize

    def compute() -> Readings:
        end = float(int(clock().timestamp()))
        inputs = config.rule_inputs()
        common = {
            "team_label": config.team_label,
            "rules_interval_seconds": config.rules_interval_seconds,
        }
        recent = idle.find_idle(
            prometheus,
            inputs,
            config.idle,
            start=end - 2 * config.idle.window_seconds,
            end=end,
            **common,
        )
        devices: dict[tuple[str, str], float] = {}
        dollars: dict[tuple[str, str], float] = {}
        for item in recent.items:
            if not item.idle_now:
                continue
            key = (str(item.labels["namespace"]), str(item.labels["team"] or ""))
            devices[key] = devices.get(key, 0.0) + item.share
            if item.price_per_hour is not None:
                dollars[key] = dollars.get(key, 0.0) + item.price_per_hour
        start = end - SAVINGS_DAYS * 86_400
        week = idle.find_idle(prometheus, inputs, config.idle, start=start, end=end, **common)
        holdings = optimize.gather_holdings(prometheus, inputs, start=start, end=end, **common)
        found = optimize.suggestions(
            week.items,
            holdings,
            window_seconds=end - start,
            pricing=prices,
            headroom=config.rightsize_headroom,
        )
        savings = optimize.potential_savings(found)
        return {
            IDLE_DEVICES.name: sorted(devices.items()),
            IDLE_COST.name: sorted(dollars.items()),
            SAVINGS.name: [] if savings is None else [((), savings)],
        }

    return RefreshedMetrics(
        "idle", (IDLE_DEVICES, IDLE_COST, SAVINGS), compute, config.refresh_seconds, IDLE_REFRESH
    )


FORECAST_LABELS = ("scope", "target", "horizon", "bound")
FORECAST_ALLOCATED = Family(
    "gpu_analytics_forecast_allocated_devices",
    "Forecast GPU-equivalents held by pods, by scope (cluster, node, namespace, team), target, "
    "horizon and bound (mean, and the 80% interval's lower and upper).",
    FORECAST_LABELS,
)
FORECAST_ACTIVITY = Family(
    "gpu_analytics_forecast_activity_ratio",
    "Forecast activity (0-1) of the GPUs pods hold, by scope, target, horizon and bound.",
    FORECAST_LABELS,
)
CAPACITY_EXHAUSTION = Family(
    "gpu_analytics_capacity_exhaustion_seconds",
    "Seconds until the forecast GPUs held exceed the GPUs there are (cluster and nodes); only "
    "where that happens within the forecast's 168 hours.",
    ("scope", "target"),
)
FORECAST_REFRESH = Family(
    "gpu_analytics_forecast_refresh_success",
    "1 when the last refresh of the forecasts succeeded, else 0.",
)


def forecast_metrics(store: Any, refresh_seconds: float) -> RefreshedMetrics:
    """The cached forecasts at the published horizons (the store refits on its schedule)."""
    from analytics import forecasting

    def compute() -> Readings:
        readings = forecasting.horizon_readings(store.get())
        return {
            FORECAST_ALLOCATED.name: readings["allocated"],
            FORECAST_ACTIVITY.name: readings["activity"],
            CAPACITY_EXHAUSTION.name: readings["exhaustion"],
        }

    return RefreshedMetrics(
        "forecast",
        (FORECAST_ALLOCATED, FORECAST_ACTIVITY, CAPACITY_EXHAUSTION),
        compute,
        refresh_seconds,
        FORECAST_REFRESH,
    )


#: Every metric family the service publishes at /metrics (histograms also as _bucket, _sum and
#: _count). Rules and dashboards may use only these, the exporter's catalogue and the recording
#: rules; tests/unit/test_dashboards.py and test_rules.py check it.
ANALYTICS_METRIC_NAMES: tuple[str, ...] = (
    "gpu_analytics_http_requests_total",
    "gpu_analytics_http_request_duration_seconds",
    "gpu_analytics_prometheus_errors_total",
    "gpu_analytics_prometheus_request_duration_seconds",
    # analytics.limits: rejections (rate limit, overload) and the report cache's outcomes.
    "gpu_analytics_rejected_requests_total",
    "gpu_analytics_report_cache_requests_total",
    *(
        family.name
        for family in (
            NAMESPACE_COST,
            TEAM_COST,
            COST_REFRESH,
            IDLE_DEVICES,
            IDLE_COST,
            SAVINGS,
            IDLE_REFRESH,
            FORECAST_ALLOCATED,
            FORECAST_ACTIVITY,
            CAPACITY_EXHAUSTION,
            FORECAST_REFRESH,
        )
    ),
)
