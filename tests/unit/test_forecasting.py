"""The service side of forecasts: hourly histories from range queries (gaps stay gaps),
capacity exhaustion, and a cache that refits on a schedule, never per request. A fake
Prometheus client is injected (the real one is exercised in tests/integration)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from types import MappingProxyType

import numpy as np
import pytest

from analytics import forecasting
from analytics.prometheus import Sample, Series
from analytics.sources import rule_inputs

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
INTERVAL = 60.0


class FakePrometheus:
    """Answers the forecast queries: GPUs held growing steadily, activity flat, 10 GPUs."""

    def __init__(self, gap_hours: int = 0) -> None:
        self.gap_hours = gap_hours
        self.range_queries: list[str] = []

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[Series]:
        self.range_queries.append(promql)
        stamps = np.arange(start, end + 1, step)
        hours = (stamps - stamps[0]) / 3600
        if "gpu_allocated_devices" in promql and "gpu_utilized" not in promql:
            devices = 9.5 * hours / hours[-1]
            values = devices * 3600 / INTERVAL  # an hour's samples summed
        else:
            values = 0.4 + 0.1 * np.sin(hours * 2 * np.pi / 24)
        keep = np.ones(len(stamps), dtype=bool)
        if self.gap_hours:
            keep[-self.gap_hours - 30 : -30] = False  # an outage a day before the end
        if "by (" in promql:
            return []  # only the cluster scope has data here
        return [
            Series(
                MappingProxyType({}),
                tuple(float(t) for t in stamps[keep]),
                tuple(float(v) for v in values[keep]),
            )
        ]

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        if promql.startswith("count(") and "by" not in promql:
            return [Sample(MappingProxyType({}), 10.0, at or 0.0)]
        return []


def _compute(fake: FakePrometheus) -> forecasting.Forecasts:
    return forecasting.compute(fake, rule_inputs(), now=NOW, interval_seconds=INTERVAL)


def test_growing_allocations_run_out_of_capacity_within_the_horizon() -> None:
    forecasts = _compute(FakePrometheus())
    cluster = forecasts.scopes[("cluster", "cluster")]
    assert cluster.capacity == 10
    assert cluster.exhaustion is not None
    hours_left = (cluster.exhaustion - NOW).total_seconds() / 3600
    assert 1 <= hours_left <= forecasting.MAX_HOURS
    readings = forecasting.horizon_readings(forecasts)
    assert readings["exhaustion"] == [
        (("cluster", "cluster"), pytest.approx(hours_left * 3600, abs=3600))
    ]
    record = forecasting.scope_record(cluster, forecasting.MAX_HOURS, NOW)
    assert record["capacityExhaustedAt"] is not None
    # Asked about a horizon that ends before it runs out: no exhaustion in that answer.
    shorter = int(hours_left) - 1
    assert forecasting.scope_record(cluster, shorter, NOW)["capacityExhaustedAt"] is None


def test_hours_without_data_stay_missing() -> None:
    fake = FakePrometheus(gap_hours=10)
    histories = forecasting.hourly_histories(
        fake,
        forecasting.history_queries("cluster")["allocated"],
        end=NOW.timestamp(),
        label="",
        interval_seconds=INTERVAL,
        scale=True,
    )
    series = histories["cluster"]
    assert series.isna().sum() == 10
    assert (series.dropna() >= 0).all()
    assert len(series) == forecasting.HISTORY_DAYS * 24


def test_history_queries_read_the_recorded_aggregates() -> None:
    queries = forecasting.history_queries("team")
    assert "team:gpu_allocated_devices:sum" in queries["allocated"]
    assert "sum by (team)" in queries["allocated"]
    assert "team:gpu_utilized_devices:sum" in queries["activity"]
    assert "team:gpu_measured_devices:sum" in queries["activity"]
    assert forecasting.capacity_query("team", rule_inputs()) is None


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


def test_store_fits_once_and_refreshes_in_the_background_when_stale() -> None:
    clock = Clock()
    calls: list[dt.datetime] = []
    release = threading.Event()

    def compute() -> forecasting.Forecasts:
        if calls:
            release.wait(5)  # a slow refit must not hold requests up
        calls.append(clock.now)
        return forecasting.Forecasts(clock.now, {}, 0.0)

    store = forecasting.ForecastStore(compute, refresh_seconds=900, clock=clock)
    first = store.get()
    assert store.get() is first and len(calls) == 1  # cached, not refit per request
    clock.now = NOW + dt.timedelta(seconds=901)
    assert store.get() is first  # stale: served at once, refit started
    assert store.get() is first  # one refit at a time
    release.set()
    deadline = time.monotonic() + 5
    while store.get() is first and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.get().generated_at == clock.now
    assert len(calls) == 2


def test_a_failed_refresh_keeps_the_last_forecasts() -> None:
    clock = Clock()
    fail = {"now": False}

    def compute() -> forecasting.Forecasts:
        if fail["now"]:
            raise ConnectionError("prometheus down")
        return forecasting.Forecasts(clock.now, {}, 0.0)

    store = forecasting.ForecastStore(compute, refresh_seconds=900, clock=clock)
    kept = store.get()
    fail["now"] = True
    with pytest.raises(ConnectionError):
        store.refresh()
    assert store.last_success is False
    assert store.get() is kept


@pytest.mark.parametrize(
    ("scope", "name", "message"),
    [
        ("galaxy", None, "scope"),
        ("cluster", "x", "no name"),
        ("namespace", "Not_A_Namespace", "name"),
    ],
)
def test_bad_scopes_are_rejected(scope: str, name: str | None, message: str) -> None:
    from analytics.promql import InvalidParameter

    with pytest.raises(InvalidParameter, match=message):
        forecasting.parse_scope(scope, name)
