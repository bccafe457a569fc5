"""analytics.cost: window parsing, PromQL, exact dollars from recorded $/h samples, report rows
and CSV, on plain DataFrames and dicts (no Prometheus, no Flask)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math

import pandas as pd
import pytest

from analytics import cost, pricing
from analytics.promql import InvalidParameter

NOW = dt.datetime(2025, 8, 3, 12, 0, 0, tzinfo=dt.UTC)
T0 = int(dt.datetime(2025, 8, 1, tzinfo=dt.UTC).timestamp())
HOUR = 3600
DAY = 86_400


def window(start: int, end: int) -> cost.Window:
    return cost.Window(
        dt.datetime.fromtimestamp(start, dt.UTC), dt.datetime.fromtimestamp(end, dt.UTC)
    )


def samples(
    key: str, value: float, start: int, end: int, step: int = 60, skip: range = range(0)
) -> pd.DataFrame:
    """One sample per ``step`` at start+step ... end (each standing for the step before it)."""
    times = [t for t in range(start + step, end + 1, step) if t not in skip]
    return pd.DataFrame({"namespace": key, "timestamp": times, "value": value})


# --- dollars ----------------------------------------------------------------------------------


def test_dollars_are_the_sample_sum_times_the_interval_in_hours() -> None:
    assert cost.to_dollars(60 * 3.5) == 3.5  # an hour of 1-minute samples at 3.5 $/h
    assert cost.to_dollars(120 * 3.5, interval_seconds=30) == 3.5
    assert cost.to_dollars(0.0) == 0.0
    with pytest.raises(ValueError):
        cost.to_dollars(1.0, interval_seconds=0)


def test_samples_to_totals_counts_each_boundary_sample_once() -> None:
    frame = pd.concat(
        [samples("a", 7.0, T0, T0 + 2 * DAY), samples("b", 0.5, T0, T0 + 2 * DAY)],
        ignore_index=True,
    )
    first = cost.samples_to_totals(frame, window(T0, T0 + DAY), ["namespace"])
    second = cost.samples_to_totals(frame, window(T0 + DAY, T0 + 2 * DAY), ["namespace"])
    assert first.to_dict() == {"a": 168.0, "b": 12.0}
    assert second.to_dict() == {"a": 168.0, "b": 12.0}
    whole = cost.samples_to_totals(frame, window(T0, T0 + 2 * DAY), ["namespace"])
    assert whole.to_dict() == {"a": 336.0, "b": 24.0}


def test_partial_windows_and_gaps_cost_only_what_was_recorded() -> None:
    gap = range(T0 + HOUR + 60, T0 + 2 * HOUR + 1)  # one hour with no samples
    frame = samples("a", 6.0, T0, T0 + 4 * HOUR, skip=gap)
    assert cost.samples_to_totals(frame, window(T0, T0 + 4 * HOUR), ["namespace"])["a"] == 18.0
    # A window reaching before the first sample, and half an hour into it.
    partial = cost.samples_to_totals(frame, window(T0 - DAY, T0 + HOUR // 2), ["namespace"])
    assert partial["a"] == 3.0


def test_non_finite_samples_are_ignored() -> None:
    frame = pd.DataFrame(
        {"namespace": "a", "timestamp": [T0 + 60, T0 + 120, T0 + 180], "value": [6, math.nan, 6]}
    )
    assert cost.samples_to_totals(frame, window(T0, T0 + 180), ["namespace"])["a"] == 0.2


def test_window_totals_scale_and_key_results() -> None:
    results = [
        ({"team": "ml"}, 60 * 7.0),
        ({}, 60 * 0.5),  # pods without the team label
        ({"team": "x"}, math.nan),
    ]
    assert cost.window_totals(results, ("team",), "team") == {"ml": 7.0, cost.NO_TEAM: 0.5}
    mig = [({"mig_profile": "3g.40gb"}, 120.0), ({}, 600.0)]  # {} = whole GPUs
    assert cost.window_totals(mig, ("mig_profile",), "mig_profile", 30) == {"3g.40gb": 1.0}
    pods = [({"namespace": "ns", "pod": "p"}, 60.0)]
    assert cost.window_totals(pods, ("namespace", "pod"), "pod") == {"ns/p": 1.0}


# --- windows ----------------------------------------------------------------------------------


def test_default_window_is_the_last_seven_days() -> None:
    got = cost.parse_window(now=NOW.replace(microsecond=123))
    assert got == cost.Window(NOW - dt.timedelta(days=7), NOW)
    assert got.seconds == 7 * DAY
    assert got.describe() == {"start": NOW - dt.timedelta(days=7), "end": NOW, "days": 7.0}


@pytest.mark.parametrize(
    ("kwargs", "start", "end"),
    [
        ({"window": "24h"}, NOW - dt.timedelta(hours=24), NOW),
        ({"window": "2w"}, NOW - dt.timedelta(days=14), NOW),
        (
            {"window": "1d", "end": "2025-08-01T00:00:00Z"},
            dt.datetime(2025, 7, 31, tzinfo=dt.UTC),
            None,
        ),
        (
            {"start": "2025-08-01T02:00:00+02:00", "end": str(T0 + HOUR)},
            dt.datetime(2025, 8, 1, tzinfo=dt.UTC),
            dt.datetime(2025, 8, 1, 1, tzinfo=dt.UTC),
        ),
        ({"start": f"{T0}.5"}, dt.datetime(2025, 8, 1, tzinfo=dt.UTC), NOW),
    ],
)
def test_windows_from_length_or_start_end(
    kwargs: dict[str, str], start: dt.datetime, end: dt.datetime | None
) -> None:
    got = cost.parse_window(now=NOW, **kwargs)
    assert got.start == start
    assert got.end == (end if end is not None else dt.datetime(2025, 8, 1, tzinfo=dt.UTC))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window": "91d"}, "window"),
        ({"window": "13w"}, "window"),
        ({"window": "0d"}, "window"),
        ({"window": "-7d"}, "window"),
        ({"window": "7m"}, "window"),
        ({"window": "7d", "start": "2025-08-01T00:00:00Z"}, "window"),
        ({"start": "2025-08-04T00:00:00Z"}, "start"),
        ({"start": "2025-08-01T00:00:00Z", "end": "2025-08-01T00:00:00Z"}, "start"),
        ({"start": "2025-01-01T00:00:00Z"}, "start"),
        ({"start": "2025-08-01"}, "start"),
        ({"start": "2025-08-01T00:00:00"}, "start"),
        ({"end": "next tuesday"}, "end"),
        ({"end": "99999999999999"}, "end"),
    ],
)
def test_bad_windows_name_the_field(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        cost.parse_window(now=NOW, **kwargs)
    assert caught.value.field == field


def test_bounded_integers_and_choices() -> None:
    assert cost.parse_int(None, "days", default=7, low=1, high=90) == 7
    assert cost.parse_int("90", "days", default=7, low=1, high=90) == 90
    for bad in ("-1", "0", "91", "1.5", "seven", ""):
        with pytest.raises(InvalidParameter):
            cost.parse_int(bad, "days", default=7, low=1, high=90)
    assert cost.parse_choice(None, "format", cost.FORMATS, "json") == "json"
    with pytest.raises(InvalidParameter, match="aggregate"):
        cost.parse_choice("Namespace", "aggregate", cost.AGGREGATES, "namespace")


# --- PromQL -----------------------------------------------------------------------------------


def test_window_query_is_a_half_open_sum_over_time() -> None:
    query = cost.window_sum_query(pricing.NAMESPACE_COST, window(T0, T0 + DAY), ("namespace",))
    assert query == (
        "sum by (namespace) (sum_over_time(namespace:gpu_cost_dollars_per_hour:sum{}[86399999ms]))"
    )


def test_filter_values_are_quoted_by_the_selector() -> None:
    query = cost.window_sum_query(
        pricing.POD_COST, window(T0, T0 + HOUR), ("namespace",), {"namespace": 'a"} or vector(1)'}
    )
    assert 'namespace="a\\"} or vector(1)"' in query


def test_report_plan_reads_the_cheapest_series() -> None:
    plan = cost.report_plan("team")
    assert (plan.cost_metric, plan.by) == (pricing.TEAM_COST, ("team",))
    # GPU-hours and efficiency from the team sums too, not one series per pod.
    assert (plan.devices_metric, plan.utilized_metric, plan.measured_metric) == (
        "team:gpu_allocated_devices:sum",
        "team:gpu_utilized_devices:sum",
        "team:gpu_measured_devices:sum",
    )
    assert plan.unallocated_metric == pricing.CLUSTER_UNALLOCATED
    node = cost.report_plan("node")
    assert (node.unallocated_metric, node.unallocated_by) == (pricing.DEVICE_UNALLOCATED, ("node",))
    pod = cost.report_plan("pod")
    assert (pod.cost_metric, pod.by) == (pricing.POD_COST, ("namespace", "pod"))
    filtered = cost.report_plan("team", namespace="research", team="ml", team_label="label_squad")
    assert filtered.cost_metric == pricing.POD_COST
    assert filtered.devices_metric == pricing.POD_DEVICES
    assert filtered.by == ("label_squad",)
    assert filtered.filters == {"namespace": "research", "label_squad": "ml"}
    assert filtered.unallocated_metric is None
    # By cluster: the namespace sums (they keep the cluster label) add up per cluster.
    clusters = cost.report_plan("cluster")
    assert (clusters.cost_metric, clusters.by) == (pricing.NAMESPACE_COST, ("cluster",))
    assert (clusters.unallocated_metric, clusters.unallocated_by) == (
        pricing.DEVICE_UNALLOCATED,
        ("cluster",),
    )
    with pytest.raises(InvalidParameter, match="aggregate"):
        cost.report_plan("datacenter")


# --- report rows, CSV, summaries --------------------------------------------------------------


def test_report_rows_sorted_with_shares_and_unknowns_as_none() -> None:
    frame = cost.build_report(
        {"research": 84.0, "ml-serving": 504.0, "dev": 0.0},
        unallocated={"unallocated": 222.0},
        gpu_hours={"ml-serving": 72.0, "research": 24.0},
        utilized={"ml-serving": 36.0},
        measured={"ml-serving": 72.0},
        unallocated_gpu_hours=None,
    )
    rows = cost.report_records(frame)
    assert [(r["kind"], r["key"]) for r in rows] == [
        ("allocated", "ml-serving"),
        ("allocated", "research"),
        ("allocated", "dev"),
        ("unallocated", "unallocated"),
    ]
    assert rows[0] == {
        "kind": "allocated",
        "key": "ml-serving",
        "cost": 504.0,
        "gpuHours": 72.0,
        "efficiency": 0.5,
        "share": round(504 / 810, 6),
    }
    assert rows[1]["efficiency"] is None  # not measured: unknown, not 0
    assert rows[2]["gpuHours"] is None  # recorded for others, not for this key
    assert rows[3]["gpuHours"] is None
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def test_report_without_gpu_share_series_has_no_gpu_hours() -> None:
    rows = cost.report_records(cost.build_report({"a": 1.0}))
    assert rows == [
        {
            "kind": "allocated",
            "key": "a",
            "cost": 1.0,
            "gpuHours": None,
            "efficiency": None,
            "share": 1.0,
        }
    ]
    assert cost.report_records(cost.build_report({})) == []
    zero = cost.report_records(cost.build_report({"a": 0.0}))
    assert zero[0]["share"] is None


def test_csv_has_a_header_and_one_row_per_line_in_a_stable_order() -> None:
    frame = cost.build_report(
        {"ml-serving": 504.0, "research": 84.0},
        unallocated={"unallocated": 222.0},
        gpu_hours={"ml-serving": 72.0, "research": 24.0},
    )
    text = cost.report_csv(frame, window(T0, T0 + 3 * DAY), "namespace")
    lines = text.splitlines()
    assert lines == [
        "window_start,window_end,aggregate,kind,key,cost_usd,gpu_hours,efficiency,share",
        "2025-08-01T00:00:00Z,2025-08-04T00:00:00Z,namespace,allocated,ml-serving,504.0,72.0,,0.622222",
        "2025-08-01T00:00:00Z,2025-08-04T00:00:00Z,namespace,allocated,research,84.0,24.0,,0.103704",
        "2025-08-01T00:00:00Z,2025-08-04T00:00:00Z,namespace,unallocated,unallocated,222.0,,,0.274074",
    ]
    assert text.endswith("\n")


def test_csv_quotes_keys_that_need_it() -> None:
    frame = cost.build_report({'NVIDIA "X", 80GB': 1.25})
    rows = list(csv.reader(io.StringIO(cost.report_csv(frame, window(T0, T0 + DAY), "model"))))
    assert rows[1][4] == 'NVIDIA "X", 80GB'
    assert rows[1][5] == "1.25"


def test_cost_summary_projects_the_daily_average() -> None:
    assert cost.cost_summary(810.0, 3) == {
        "dailyCost": 270.0,
        "weeklyCost": 1890.0,
        "monthlyCost": 8100.0,
    }
    assert cost.cost_summary(None, 7) == {
        "dailyCost": None,
        "weeklyCost": None,
        "monthlyCost": None,
    }


def test_money_rounds_float_noise_and_keeps_none() -> None:
    assert cost.money(0.1 + 0.2) == 0.3
    assert cost.money(None) is None
    assert cost.money(math.inf) is None
    assert cost.by_name({"b": 1.0, "a": 1.0, "c": 3.0}) == {"c": 3.0, "a": 1.0, "b": 1.0}


def test_efficiency_is_bounded_and_none_when_unmeasured() -> None:
    assert cost.efficiency(36.0, 72.0) == 0.5
    assert cost.efficiency(80.0, 72.0) == 1.0
    assert cost.efficiency(None, 72.0) is None
    assert cost.efficiency(1.0, 0.0) is None


def test_allocation_statistics() -> None:
    frame = pd.DataFrame.from_records(
        [
            {
                "namespace": "r",
                "pod": "b",
                "team": None,
                "cost": 12.0,
                "gpuHours": None,
                "efficiency": None,
            },
            {
                "namespace": "m",
                "pod": "a",
                "team": "ml",
                "cost": 504.0,
                "gpuHours": 72.0,
                "efficiency": 0.5,
            },
            {
                "namespace": "r",
                "pod": "a",
                "team": "r",
                "cost": 72.0,
                "gpuHours": 0.0,
                "efficiency": None,
            },
        ]
    )
    got = cost.allocation_statistics(frame, top=2)
    assert got["allocationCount"] == 3
    assert got["totalCost"] == 588.0
    assert got["averageCostPerAllocation"] == 196.0
    assert got["medianCostPerAllocation"] == 72.0
    assert got["maxCostPerAllocation"] == 504.0
    assert [(a["namespace"], a["pod"]) for a in got["topAllocations"]] == [("m", "a"), ("r", "a")]
    assert got["topAllocations"][0]["costPerGpuHour"] == 7.0
    assert got["topAllocations"][1]["costPerGpuHour"] is None  # no GPU-hours: no rate
    assert got["topAllocations"][0]["share"] == round(504 / 588, 6)
    empty = cost.allocation_statistics(frame.iloc[0:0], top=5)
    assert empty["allocationCount"] == 0
    assert empty["topAllocations"] == []
    assert empty["averageCostPerAllocation"] is None
