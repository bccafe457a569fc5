"""Forecasts as the service serves them: which hourly series, per scope, from which recorded
rules; the models fitted on a schedule and cached; and their answers as metrics.

Series (hourly, labelled by the hour's start; an hour without data is missing, not zero):

- allocated GPUs: GPU-equivalents held (`*:gpu_allocated_devices:sum`), the hour's mean;
- GPU activity: busy over measured GPU-equivalents of what pods hold (the efficiency rules);
- capacity (cluster and nodes): the GPUs there are now. Allocated devices forecast above it
  give the time capacity runs out.

The models (:mod:`analytics.forecast`) are refitted when the cache is older than the refresh
interval, in the background; a request never refits (only the very first one waits).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analytics import forecast, pricing
from analytics.sources import RuleInputs

log = logging.getLogger(__name__)

SCOPES: tuple[str, ...] = ("cluster", "node", "namespace", "team")
#: Horizons published as metrics; requests may ask for any number of hours up to MAX_HOURS.
HORIZONS: tuple[int, ...] = (1, 6, 24)
MAX_HOURS = 168
#: History the models see: three weeks, so weekly seasonality has two full weeks.
HISTORY_DAYS = 21
HOUR_S = 3600
#: The `target` of the cluster scope.
CLUSTER = "cluster"
_SCOPE_LABEL = {"node": "node", "namespace": "namespace", "team": "team"}


@dataclass(frozen=True)
class ScopeForecast:
    """The forecasts of one scope target (the cluster, a node, a namespace or a team)."""

    scope: str
    target: str
    allocated: forecast.Forecast
    activity: forecast.Forecast | None
    capacity: float | None
    #: When allocated devices are forecast to exceed capacity (within MAX_HOURS), if ever.
    exhaustion: pd.Timestamp | None
    history_hours: int


@dataclass(frozen=True)
class Forecasts:
    """One refresh: every scope target's forecasts, and when they were made."""

    generated_at: dt.datetime
    scopes: dict[tuple[str, str], ScopeForecast]
    fit_seconds: float


def _hour_sum(series: str, by: str) -> str:
    """The hour's total of a recorded series, summed by `by` (one hour, one ms short)."""
    group = f"sum by ({by}) " if by else "sum "
    return f"{group}(sum_over_time({series}[3599999ms]))"


def history_queries(scope: str) -> dict[str, str]:
    """PromQL whose range query at an hourly step gives the scope's hourly series.

    Values at t cover (t - 1h, t]; the caller labels them by the hour's start.
    """
    aggregate = "namespace" if scope == CLUSTER else scope
    by = _SCOPE_LABEL.get(scope, "")
    devices = pricing.aggregated(pricing.POD_DEVICES, aggregate)
    utilized = pricing.aggregated(pricing.POD_UTILIZED_DEVICES, aggregate)
    measured = pricing.aggregated(pricing.POD_MEASURED_DEVICES, aggregate)
    return {
        # Samples per hour times the interval is the hour's GPU-hours: its mean devices.
        "allocated": _hour_sum(devices, by),
        "activity": f"{_hour_sum(utilized, by)} / {_hour_sum(measured, by)}",
    }


def capacity_query(scope: str, inputs: RuleInputs) -> str | None:
    """GPUs there are now, for the scopes that have a capacity (cluster, node)."""
    if scope == CLUSTER:
        return f"count({inputs.devices})"
    if scope == "node":
        return f"count by (node) ({inputs.devices})"
    return None


def hourly_histories(
    prometheus: Any, query: str, *, end: float, label: str, interval_seconds: float, scale: bool
) -> dict[str, pd.Series]:
    """target -> hourly series from a range query at an hourly step over HISTORY_DAYS."""
    last = math.floor(end / HOUR_S) * HOUR_S
    first = last - HISTORY_DAYS * 86_400 + HOUR_S
    out: dict[str, pd.Series] = {}
    for series in prometheus.query_range(query, first, last, HOUR_S):
        target = series.labels.get(label, "") if label else CLUSTER
        stamps = pd.to_datetime(np.asarray(series.timestamps) - HOUR_S, unit="s", utc=True)
        values = np.asarray(series.values, dtype="float64")
        if scale:
            values = values * interval_seconds / HOUR_S
        full = pd.date_range(
            pd.Timestamp(first - HOUR_S, unit="s", tz="UTC"),
            pd.Timestamp(last - HOUR_S, unit="s", tz="UTC"),
            freq="h",
        )
        out[target] = pd.Series(values, index=stamps).reindex(full)
    return out


def compute(
    prometheus: Any,
    inputs: RuleInputs,
    *,
    now: dt.datetime,
    interval_seconds: float,
    scopes: tuple[str, ...] = SCOPES,
) -> Forecasts:
    """Fetch every scope's history and fit its forecasts (MAX_HOURS ahead)."""
    end = now.timestamp()
    histories: dict[tuple[str, str, str], pd.Series] = {}
    capacities: dict[tuple[str, str], float] = {}
    for scope in scopes:
        label = _SCOPE_LABEL.get(scope, "")
        queries = history_queries(scope)
        for kind, query in queries.items():
            found = hourly_histories(
                prometheus,
                query,
                end=end,
                label=label,
                interval_seconds=interval_seconds,
                scale=kind == "allocated",
            )
            for target, series in found.items():
                histories[(scope, target, kind)] = series
        cap = capacity_query(scope, inputs)
        if cap is not None:
            for sample in prometheus.query(cap, at=end):
                target = sample.labels.get(label, "") if label else CLUSTER
                capacities[(scope, target)] = sample.value
    began = time.perf_counter()
    fitted: dict[tuple[str, str, str], forecast.Forecast] = {}
    for kind, bounds in (("allocated", (0.0, None)), ("activity", (0.0, 1.0))):
        keyed = {f"{s}\0{t}": h for (s, t, k), h in histories.items() if k == kind}
        for key, result in forecast.fit_many(keyed, MAX_HOURS, bounds=bounds).items():
            scope, target = key.split("\0", 1)
            fitted[(scope, target, kind)] = result
    fit_seconds = time.perf_counter() - began
    scopes_out: dict[tuple[str, str], ScopeForecast] = {}
    for (scope, target, kind), result in fitted.items():
        if kind != "allocated" or result.model == forecast.MODEL_NONE:
            continue
        capacity = capacities.get((scope, target))
        activity = fitted.get((scope, target, "activity"))
        if activity is not None and activity.model == forecast.MODEL_NONE:
            activity = None
        history = histories[(scope, target, kind)]
        scopes_out[(scope, target)] = ScopeForecast(
            scope=scope,
            target=target,
            allocated=result,
            activity=activity,
            capacity=capacity,
            exhaustion=None if capacity is None else forecast.exhaustion_time(result, capacity),
            history_hours=int(history.notna().sum()),
        )
    return Forecasts(now, scopes_out, fit_seconds)


class ForecastStore:
    """The latest forecasts, refreshed in the background when older than `refresh_seconds`.

    The first call computes synchronously (there is nothing to serve yet); later calls get the
    cached forecasts at once and, when they are stale, start one background refresh.
    """

    def __init__(
        self,
        compute_now: Callable[[], Forecasts],
        refresh_seconds: float,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self._compute = compute_now
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._first = threading.Lock()
        self._latest: Forecasts | None = None
        self._refreshing = False
        self.last_success: bool | None = None

    def get(self) -> Forecasts:
        """The cached forecasts (computing them once if there are none yet)."""
        latest = self._latest
        if latest is None:
            with self._first:  # one computation for concurrent first requests
                if self._latest is None:
                    self._store(self._compute())
            latest = self._latest
            assert latest is not None
        elif self._stale(latest):
            self._refresh_in_background()
        return latest

    def refresh(self) -> None:
        """Recompute now; keep the previous forecasts if it fails."""
        try:
            self._store(self._compute())
        except Exception as error:
            log.warning("refreshing the forecasts failed: %s", error)
            self.last_success = False
            raise

    def _store(self, forecasts: Forecasts) -> None:
        with self._lock:
            self._latest = forecasts
        self.last_success = True

    def _stale(self, forecasts: Forecasts) -> bool:
        age = (self._clock() - forecasts.generated_at).total_seconds()
        return age >= self._refresh_seconds

    def _refresh_in_background(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.refresh()
            except Exception:  # already logged and counted
                pass
            finally:
                with self._lock:
                    self._refreshing = False

        threading.Thread(target=run, name="forecast-refresh", daemon=True).start()


def points(result: forecast.Forecast, hours: int) -> list[dict[str, Any]]:
    """The first `hours` hourly points of a forecast, as the API serves them."""
    out = []
    for i in range(min(hours, len(result.index))):
        out.append(
            {
                "time": result.index[i].strftime("%Y-%m-%dT%H:%M:%SZ"),
                "mean": round(float(result.mean[i]), 6),
                "lower": round(float(result.lower[i]), 6),
                "upper": round(float(result.upper[i]), 6),
            }
        )
    return out


def scope_record(item: ScopeForecast, hours: int, now: dt.datetime) -> dict[str, Any]:
    """One scope target's forecasts for `hours` hours, with capacity and exhaustion."""
    exhaustion = item.exhaustion
    within = exhaustion is not None and (exhaustion - pd.Timestamp(now)).total_seconds() <= (
        hours * HOUR_S
    )
    return {
        "scope": item.scope,
        "target": item.target,
        "historyHours": item.history_hours,
        "allocatedDevices": {
            "model": item.allocated.model,
            "level": item.allocated.level,
            "points": points(item.allocated, hours),
        },
        "activity": None
        if item.activity is None
        else {
            "model": item.activity.model,
            "level": item.activity.level,
            "points": points(item.activity, hours),
        },
        "capacityDevices": item.capacity,
        "capacityExhaustedAt": (
            exhaustion.strftime("%Y-%m-%dT%H:%M:%SZ") if within and exhaustion else None
        ),
    }


def horizon_readings(forecasts: Forecasts) -> dict[str, list[tuple[tuple[str, ...], float]]]:
    """Forecast values at the published horizons, bounds included, and exhaustion seconds."""
    allocated: list[tuple[tuple[str, ...], float]] = []
    activity: list[tuple[tuple[str, ...], float]] = []
    exhaustion: list[tuple[tuple[str, ...], float]] = []
    now = pd.Timestamp(forecasts.generated_at)
    for (scope, target), item in sorted(forecasts.scopes.items()):
        for hours in HORIZONS:
            for out, result in ((allocated, item.allocated), (activity, item.activity)):
                if result is None or hours > len(result.index):
                    continue
                for bound, values in (
                    ("mean", result.mean),
                    ("lower", result.lower),
                    ("upper", result.upper),
                ):
                    out.append(((scope, target, f"{hours}h", bound), float(values[hours - 1])))
        if item.exhaustion is not None:
            seconds = max((item.exhaustion - now).total_seconds(), 0.0)
            exhaustion.append(((scope, target), seconds))
    return {"allocated": allocated, "activity": activity, "exhaustion": exhaustion}


def parse_scope(scope: str | None, target: str | None) -> tuple[str, str | None]:
    """Validated scope (default cluster) and optional target name."""
    from analytics.promql import InvalidParameter, NameRule, validate_name

    chosen = scope or CLUSTER
    if chosen not in SCOPES:
        raise InvalidParameter("scope", f"must be one of {', '.join(SCOPES)}")
    if target is None:
        return chosen, None
    if chosen == CLUSTER:
        raise InvalidParameter("name", "the cluster scope takes no name")
    rules: dict[str, NameRule] = {
        "node": "dns-subdomain",
        "namespace": "dns-label",
        "team": "label-value",
    }
    return chosen, validate_name(target, "name", rule=rules[chosen])


def select(
    forecasts: Forecasts, scope: str, target: str | None
) -> Mapping[tuple[str, str], ScopeForecast]:
    """The scope's targets (or the one named)."""
    return {
        key: item
        for key, item in sorted(forecasts.scopes.items())
        if key[0] == scope and (target is None or key[1] == target)
    }
