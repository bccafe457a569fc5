"""Cost reports from the recorded cost series: pure functions, no Flask.

The pricing rules (``rules/pricing.yml``) record every cost in dollars per hour, one sample per
rule interval. A sample at time ``t`` stands for the interval ``(t - interval, t]``, so the
dollars of a series over a window are exactly::

    sum_over_time(series[window]) * interval_seconds / 3600

Windows are half-open, ``(start, end]``: an instant query at ``end`` over a range one
millisecond shorter than the window (Prometheus 2.x ranges include both ends), so a sample on
a boundary is counted in exactly one of two adjacent windows. Gaps (Prometheus or the rules
not running) cost nothing: nothing was recorded for them. GPU-hours and efficiency come from
the same kind of recorded series (see :data:`POD_DEVICES`); where those are not recorded they
are ``None``, never 0.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from analytics import pricing
from analytics.promql import InvalidParameter, selector

DEFAULT_INTERVAL_SECONDS = 60.0
MAX_WINDOW_DAYS = 90
DEFAULT_DAYS = 7
DEFAULT_WINDOW = "7d"
CURRENCY = "USD"
DAY_SECONDS = 86_400

#: GPU-equivalents each pod holds (1 per whole GPU, k/7 per MIG instance, split evenly between
#: pods sharing a device), the part held while activity was measured, and the busy part.
POD_DEVICES = pricing.POD_DEVICES
POD_MEASURED_DEVICES = pricing.POD_MEASURED_DEVICES
POD_UTILIZED_DEVICES = pricing.POD_UTILIZED_DEVICES
#: Not recorded yet (unallocated rows' GPU-hours are None): GPU-equivalents no pod holds.
DEVICE_UNALLOCATED_DEVICES = "device:gpu_unallocated_devices:share"

AGGREGATES: tuple[str, ...] = (
    "namespace",
    "team",
    "pod",
    "node",
    "model",
    "mig_profile",
    "cluster",
)
FORMATS: tuple[str, ...] = ("json", "csv")
#: The key of rows whose team label is missing (pods without the team label).
NO_TEAM = "(none)"
UNALLOCATED = "unallocated"
CSV_COLUMNS: tuple[str, ...] = (
    "window_start",
    "window_end",
    "aggregate",
    "kind",
    "key",
    "cost_usd",
    "gpu_hours",
    "efficiency",
    "share",
)

_WINDOW = re.compile(r"^([1-9][0-9]{0,4})([hdw])$")
_UNIT_SECONDS = {"h": 3600, "d": DAY_SECONDS, "w": 7 * DAY_SECONDS}
_INT = re.compile(r"^[+-]?[0-9]+$")
_UNIX = re.compile(r"^[0-9]{1,11}(\.[0-9]{1,9})?$")


# -- windows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A report window ``(start, end]`` in whole seconds, aware UTC."""

    start: dt.datetime
    end: dt.datetime

    @property
    def seconds(self) -> int:
        """Length in whole seconds."""
        return int((self.end - self.start).total_seconds())

    @property
    def days(self) -> float:
        """Length in days (fractional for hour windows)."""
        return self.seconds / DAY_SECONDS

    def describe(self) -> dict[str, Any]:
        """The window as the API serves it."""
        return {"start": self.start, "end": self.end, "days": round(self.days, 6)}


def _utc_second(when: dt.datetime) -> dt.datetime:
    """Aware UTC, truncated to the second (PromQL durations here are whole seconds)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).replace(microsecond=0)


#: Times a request may name: from the Unix epoch to the year 2200 (nothing older is in any
#: Prometheus, and arithmetic on dates near year 1 or 9999 would overflow).
EARLIEST_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST_TIME = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)


def parse_time(text: str, field: str) -> dt.datetime:
    """RFC 3339 (``2025-08-01T00:00:00Z``) or Unix seconds, as aware UTC, 1970 to 2200."""
    parsed = _parse_time(text, field)
    if not EARLIEST_TIME <= parsed <= LATEST_TIME:
        raise InvalidParameter(field, "must be between 1970-01-01 and 2200-01-01")
    return parsed


def _parse_time(text: str, field: str) -> dt.datetime:
    value = text.strip()
    if _UNIX.match(value):
        try:
            return _utc_second(dt.datetime.fromtimestamp(float(value), dt.UTC))
        except (OverflowError, OSError, ValueError) as exc:
            raise InvalidParameter(field, "Unix time out of range") from exc
    if "T" not in value and "t" not in value:
        raise InvalidParameter(field, "must be RFC 3339 (2025-08-01T00:00:00Z) or Unix seconds")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z"))
        if parsed.tzinfo is not None:
            parsed.astimezone(dt.UTC)  # raises OverflowError near year 1 and 9999
    except (ValueError, OverflowError) as exc:
        raise InvalidParameter(
            field, "must be RFC 3339 (2025-08-01T00:00:00Z) or Unix seconds"
        ) from exc
    if parsed.tzinfo is None:
        raise InvalidParameter(field, "RFC 3339 needs a time zone (Z or +hh:mm)")
    return _utc_second(parsed)


def parse_duration(text: str, field: str = "window") -> int:
    """``24h``, ``7d``, ``2w`` as seconds; other units would only invite surprises."""
    match = _WINDOW.match(text.strip())
    if match is None:
        raise InvalidParameter(field, "must be a whole number of hours, days or weeks: 24h, 7d, 2w")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_window(
    *,
    now: dt.datetime,
    window: str | None = None,
    start: str | None = None,
    end: str | None = None,
    default: str = DEFAULT_WINDOW,
    max_days: int = MAX_WINDOW_DAYS,
) -> Window:
    """The window of a report request: ``window`` back from ``end`` (default now), or start/end.

    ``window`` and ``start`` together are ambiguous and rejected. The window must be positive
    and at most ``max_days`` long, so a report never scans more than the retention we plan for.
    """
    if window is not None and start is not None:
        raise InvalidParameter("window", "give either window or start (with optional end)")
    end_at = parse_time(end, "end") if end is not None else _utc_second(now)
    if start is not None:
        start_at = parse_time(start, "start")
    else:
        seconds = parse_duration(window if window is not None else default, "window")
        if seconds > max_days * DAY_SECONDS:
            raise InvalidParameter("window", f"the window must be at most {max_days} days")
        start_at = end_at - dt.timedelta(seconds=seconds)
    if start_at >= end_at:
        raise InvalidParameter("start", "must be before end")
    if (end_at - start_at).total_seconds() > max_days * DAY_SECONDS:
        field = "window" if start is None else "start"
        raise InvalidParameter(field, f"the window must be at most {max_days} days")
    return Window(start_at, end_at)


def parse_int(
    text: str | None, field: str, *, default: int, low: int, high: int, unit: str = ""
) -> int:
    """A bounded integer query parameter (``days``, ``top``)."""
    if text is None:
        return default
    if not _INT.match(text.strip()):
        raise InvalidParameter(field, f"must be a whole number from {low} to {high}{unit}")
    value = int(text)
    if not low <= value <= high:
        raise InvalidParameter(field, f"must be a whole number from {low} to {high}{unit}")
    return value


def parse_choice(text: str | None, field: str, choices: Sequence[str], default: str) -> str:
    """One of ``choices`` (exact match), or ``default`` when absent."""
    if text is None:
        return default
    if text not in choices:
        raise InvalidParameter(field, f"must be one of {', '.join(choices)}")
    return text


# -- PromQL ------------------------------------------------------------------------------------


def range_duration(window: Window) -> str:
    """The range of a window's ``sum_over_time``: one millisecond short, making it half-open.

    Prometheus 2.x selects ``[t - range, t]`` with both ends included; dropping 1 ms gives
    ``(start, end]`` at Prometheus' millisecond resolution.
    """
    if window.seconds <= 0:
        raise ValueError(f"window must be positive, got {window}")
    return f"{window.seconds * 1000 - 1}ms"


def window_sum_query(
    metric: str,
    window: Window,
    by: Sequence[str] = (),
    filters: Mapping[str, str | None] | None = None,
) -> str:
    """``sum by (by) (sum_over_time(metric{filters}[window]))``, evaluated at the window's end.

    Filter values reach PromQL only through :func:`analytics.promql.selector` (quoted).
    """
    series = selector(metric, **dict(filters or {}))
    inner = f"sum_over_time({series}[{range_duration(window)}])"
    return f"sum by ({', '.join(by)}) ({inner})"


@dataclass(frozen=True)
class ReportPlan:
    """Which recorded series and labels a report by one aggregate reads.

    ``cost_metric`` is the cheapest recorded series that answers it (the aggregated rules when
    there are no filters; the pod series when filters need pod labels), and ``devices_metric``,
    ``utilized_metric``, ``measured_metric`` its GPU-hours and efficiency twins. ``by`` are
    their labels that form the row key. ``unallocated_metric`` is None when unallocated
    capacity belongs in no row (filtered reports: idle capacity is no namespace's or team's).
    """

    aggregate: str
    cost_metric: str
    devices_metric: str
    utilized_metric: str
    measured_metric: str
    by: tuple[str, ...]
    filters: Mapping[str, str]
    unallocated_metric: str | None
    unallocated_by: tuple[str, ...]


def pod_labels(aggregate: str, team_label: str) -> tuple[str, ...]:
    """The labels of the pod-level series that key rows of ``aggregate``."""
    if aggregate == "pod":
        return ("namespace", "pod")
    if aggregate == "team":
        return (team_label,)
    return (aggregate,)


def report_plan(
    aggregate: str,
    *,
    namespace: str | None = None,
    team: str | None = None,
    team_label: str = pricing.DEFAULT_TEAM_LABEL,
    scoped: bool = False,
) -> ReportPlan:
    """The series to read for a report by ``aggregate`` with optional namespace/team filters.

    ``scoped`` (a team-scoped token) reads the pod series, whose namespace and team labels let
    the caller keep only the token's pods, and leaves unallocated capacity out like a filter.
    """
    if aggregate not in AGGREGATES:
        raise InvalidParameter("aggregate", f"must be one of {', '.join(AGGREGATES)}")
    filters: dict[str, str] = {}
    if namespace is not None:
        filters["namespace"] = namespace
    if team is not None:
        filters[team_label] = team
    series: tuple[str, ...]
    if filters or scoped or aggregate == "pod":
        series = pricing.POD_SERIES
        by = pod_labels(aggregate, team_label)
    else:
        # Every recorded sum keeps the cluster label: by cluster, the namespace sums add up.
        recorded = "namespace" if aggregate == "cluster" else aggregate
        series = tuple(pricing.aggregated(s, recorded) for s in pricing.POD_SERIES)
        by = (aggregate,)
    unallocated: str | None = None
    unallocated_by: tuple[str, ...] = ()
    if not filters and not scoped:
        if aggregate in ("node", "model", "cluster"):
            unallocated, unallocated_by = pricing.DEVICE_UNALLOCATED, (aggregate,)
        else:
            unallocated = pricing.CLUSTER_UNALLOCATED
    cost_metric, devices, utilized, measured = series
    return ReportPlan(
        aggregate,
        cost_metric,
        devices,
        utilized,
        measured,
        by,
        filters,
        unallocated,
        unallocated_by,
    )


# -- numbers -----------------------------------------------------------------------------------


def to_hours(sample_sum: float, interval_seconds: float = DEFAULT_INTERVAL_SECONDS) -> float:
    """Per-hour samples summed over a window -> the window's total (dollars or GPU-hours)."""
    if interval_seconds <= 0:
        raise ValueError(f"interval_seconds must be positive, got {interval_seconds!r}")
    return sample_sum * interval_seconds / 3600.0


to_dollars = to_hours


def series_key(labels: Mapping[str, str], by: Sequence[str], aggregate: str) -> str:
    """The row key of a result series: its ``by`` labels joined with ``/``.

    A team row without the team label (pods that have none) is :data:`NO_TEAM`.
    """
    key = "/".join(labels.get(name, "") for name in by)
    if aggregate == "team" and key == "":
        return NO_TEAM
    return key


def window_totals(
    results: Sequence[tuple[Mapping[str, str], float]],
    by: Sequence[str],
    aggregate: str,
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
) -> dict[str, float]:
    """``sum by`` results (labels, summed samples) -> key -> window total (dollars or hours).

    MIG profile rows drop the series without a profile (whole GPUs, from the pod series);
    series that differ only in labels outside ``by`` are added together.
    """
    out: dict[str, float] = {}
    for labels, value in results:
        if not math.isfinite(value):
            continue
        key = series_key(labels, by, aggregate)
        if aggregate == "mig_profile" and key == "":
            continue
        out[key] = out.get(key, 0.0) + to_hours(value, interval_seconds)
    return out


def samples_to_totals(
    samples: pd.DataFrame,
    window: Window,
    by: Sequence[str],
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
) -> pd.Series:
    """The reference computation on raw samples (columns ``timestamp``, ``value`` and ``by``).

    What Prometheus does for :func:`window_sum_query`, in pandas: keep samples with
    ``start < timestamp <= end`` (Unix seconds), sum per key and scale by the interval. Used
    to check the recorded answers and to compute from exported history without Prometheus.
    """
    start, end = window.start.timestamp(), window.end.timestamp()
    inside = samples[(samples["timestamp"] > start) & (samples["timestamp"] <= end)]
    inside = inside[inside["value"].map(math.isfinite)]
    if not by:
        return pd.Series({"": to_hours(float(inside["value"].sum()), interval_seconds)})
    sums = inside.groupby(list(by), sort=True)["value"].sum()
    return sums * (interval_seconds / 3600.0)


def money(value: float | None) -> float | None:
    """Dollars for the API: 6 decimals (below a cent, without float noise); None stays None."""
    if value is None or not math.isfinite(value):
        return None
    return round(value + 0.0, 6)


def cost_summary(total: float | None, days: float) -> dict[str, float | None]:
    """The seed's daily/weekly/monthly figures from a window's total over ``days``.

    ``dailyCost`` is the window's average per day; weekly and monthly (30 days) project it.
    """
    if total is None or days <= 0:
        return {"dailyCost": None, "weeklyCost": None, "monthlyCost": None}
    daily = total / days
    return {
        "dailyCost": money(daily),
        "weeklyCost": money(daily * 7),
        "monthlyCost": money(daily * 30),
    }


def by_name(totals: Mapping[str, float]) -> dict[str, float | None]:
    """name -> dollars, dearest first (ties by name), for the ``costBy*`` objects."""
    ordered = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return {name: money(value) for name, value in ordered}


# -- report rows -------------------------------------------------------------------------------

REPORT_COLUMNS: tuple[str, ...] = ("kind", "key", "cost", "gpuHours", "efficiency", "share")


def efficiency(utilized: float | None, measured: float | None) -> float | None:
    """Busy GPU-hours over GPU-hours held while measured (0-1); None when nothing was measured."""
    if utilized is None or measured is None or measured <= 0:
        return None
    return min(max(utilized / measured, 0.0), 1.0)


def build_report(
    costs: Mapping[str, float],
    *,
    unallocated: Mapping[str, float] | None = None,
    gpu_hours: Mapping[str, float] | None = None,
    utilized: Mapping[str, float] | None = None,
    measured: Mapping[str, float] | None = None,
    unallocated_gpu_hours: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Report rows (:data:`REPORT_COLUMNS`): allocated rows, dearest first, then unallocated.

    ``gpu_hours`` None means the GPU-hours series is not recorded: every row gets None. When it
    is recorded, a key without GPU-hours gets None too (cost without a holder is unexplained,
    not zero). ``share`` is each row's part of the report's total cost.
    """
    records: list[dict[str, Any]] = []
    for key, cost in sorted(costs.items(), key=lambda item: (-item[1], item[0])):
        hours = gpu_hours.get(key) if gpu_hours is not None else None
        eff = efficiency(
            utilized.get(key) if utilized is not None else None,
            measured.get(key) if measured is not None else None,
        )
        records.append(
            {"kind": "allocated", "key": key, "cost": cost, "gpuHours": hours, "efficiency": eff}
        )
    for key, cost in sorted((unallocated or {}).items(), key=lambda item: (-item[1], item[0])):
        hours = unallocated_gpu_hours.get(key) if unallocated_gpu_hours is not None else None
        records.append(
            {"kind": UNALLOCATED, "key": key, "cost": cost, "gpuHours": hours, "efficiency": None}
        )
    frame = pd.DataFrame.from_records(records, columns=list(REPORT_COLUMNS[:-1]))
    total = float(frame["cost"].sum()) if len(frame) else 0.0
    frame["share"] = frame["cost"] / total if total > 0 else None
    return frame[list(REPORT_COLUMNS)]


def _cell(value: Any) -> Any:
    """A DataFrame cell as plain Python: NaN/None -> None, numpy scalars unwrapped."""
    if value is None:
        return None
    item = getattr(value, "item", None)
    if callable(item):
        value = item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows for JSON: money to 6 decimals, hours to 6, ratios to 6, missing as None."""
    out: list[dict[str, Any]] = []
    for row in frame.to_dict(orient="records"):
        cells = {name: _cell(row[name]) for name in REPORT_COLUMNS}
        cells["cost"] = money(cells["cost"])
        for name in ("gpuHours", "efficiency", "share"):
            if cells[name] is not None:
                cells[name] = round(float(cells[name]), 6)
        out.append(cells)
    return out


def report_csv(frame: pd.DataFrame, window: Window, aggregate: str) -> str:
    """The report as CSV: a header, then one row per line in :data:`CSV_COLUMNS` order.

    Missing numbers are empty cells (never 0), times are RFC 3339 UTC.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    start = window.start.strftime("%Y-%m-%dT%H:%M:%SZ")
    end = window.end.strftime("%Y-%m-%dT%H:%M:%SZ")
    for row in report_records(frame):
        numbers = [row["cost"], row["gpuHours"], row["efficiency"], row["share"]]
        writer.writerow(
            [
                start,
                end,
                aggregate,
                row["kind"],
                row["key"],
                *("" if value is None else repr(value) for value in numbers),
            ]
        )
    return buffer.getvalue()


def allocation_statistics(frame: pd.DataFrame, top: int) -> dict[str, Any]:
    """Cost per allocation (a pod over the window): count, total, mean, median, max, top N.

    ``frame`` has one row per pod: ``namespace``, ``pod``, ``team``, ``cost``, ``gpuHours``,
    ``efficiency`` (the last two may be None).
    """
    if frame.empty:
        return {
            "allocationCount": 0,
            "totalCost": 0.0,
            "averageCostPerAllocation": None,
            "medianCostPerAllocation": None,
            "maxCostPerAllocation": None,
            "topAllocations": [],
        }
    ordered = frame.sort_values(["cost", "namespace", "pod"], ascending=[False, True, True])
    total = float(ordered["cost"].sum())
    rows: list[dict[str, Any]] = []
    for row in ordered.head(top).to_dict(orient="records"):
        cost = float(row["cost"])
        hours = _cell(row.get("gpuHours"))
        rows.append(
            {
                "namespace": row["namespace"],
                "pod": row["pod"],
                "team": _cell(row.get("team")),
                "cost": money(cost),
                "gpuHours": None if hours is None else round(float(hours), 6),
                "costPerGpuHour": money(cost / hours) if hours else None,
                "efficiency": _cell(row.get("efficiency")),
                "share": round(cost / total, 6) if total > 0 else None,
            }
        )
    return {
        "allocationCount": len(ordered),
        "totalCost": money(total),
        "averageCostPerAllocation": money(float(ordered["cost"].mean())),
        "medianCostPerAllocation": money(float(ordered["cost"].median())),
        "maxCostPerAllocation": money(float(ordered["cost"].max())),
        "topAllocations": rows,
    }
