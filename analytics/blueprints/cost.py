"""Cost: the seed's cost analysis, cost reports over any window, and cost per allocation.

Every figure is read from the pricing rules' recorded series (``analytics.pricing``), so a
90-day report sums a few recorded series in Prometheus instead of re-joining raw device
series. The arithmetic lives in :mod:`analytics.cost`; this module parses requests, runs the
queries and shapes the answers.

A team-scoped token reads the pod series instead (their namespace and team labels say whose
each dollar is) and gets only its pods' rows: no unallocated capacity, no cluster totals.
Reports go through the single-flight cache (:func:`analytics.limits.cached`), keyed by the
parsed parameters and the token's scope.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from flask import Blueprint, Response, request

from analytics import cost, optimize, pricing
from analytics import scope as scopes
from analytics.auth import API_PREFIX
from analytics.blueprints import idle as idle_area
from analytics.context import services
from analytics.envelope import ApiError, ErrorCode, csv_attachment, success, utc_timestamp
from analytics.limits import cached
from analytics.openapi import (
    DOLLARS,
    NAMESPACE_FILTER,
    NULLABLE_RATIO,
    TEAM_FILTER,
    operation,
    query_param,
)
from analytics.promql import validate_name
from analytics.scope import scoped

api = Blueprint("cost", __name__)

_TAG = "cost"


def _interval() -> float:
    """The cost rules' interval in seconds: each recorded sample stands for this long."""
    return float(services().config.rules_interval_seconds)


def _arg(name: str) -> str | None:
    """A query parameter; an empty value counts as absent."""
    value = request.args.get(name)
    return value if value not in (None, "") else None


def _filters() -> tuple[str | None, str | None]:
    """The namespace and team filters, validated (Kubernetes rules) before reaching PromQL,
    and within the token's scope (403 otherwise)."""
    namespace = _arg("namespace")
    team = _arg("team")
    if namespace is not None:
        validate_name(namespace, "namespace", rule="dns-label")
    if team is not None:
        validate_name(team, "team", rule="label-value")
    scopes.current().check_filters(namespace, team)
    return namespace, team


def _totals(
    metric: str,
    window: cost.Window,
    by: Sequence[str],
    aggregate: str,
    filters: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """key -> window total of ``metric`` (dollars, or GPU-hours for device shares).

    For a team-scoped token only pod series are read, grouped by namespace and team label
    too, and only the series of the token's pods count.
    """
    scope = scopes.current()
    if not scope.restricted:
        query = cost.window_sum_query(metric, window, by, filters)
        samples = services().prometheus.query(query, at=window.end.timestamp())
        rows = [(s.labels, s.value) for s in samples]
        return cost.window_totals(rows, by, aggregate, _interval())
    if metric not in pricing.POD_SERIES:  # only pod series say whose a dollar is
        raise RuntimeError(f"{metric} cannot be read for a team-scoped token")
    team_label = services().config.team_label
    query_by = tuple(dict.fromkeys((*by, "namespace", team_label)))
    query = cost.window_sum_query(metric, window, query_by, filters)
    samples = services().prometheus.query(query, at=window.end.timestamp())
    rows = [(s.labels, s.value) for s in samples if scope.allows_labels(s.labels, team_label)]
    return cost.window_totals(rows, by, aggregate, _interval())


def _optional(
    metric: str,
    window: cost.Window,
    by: Sequence[str],
    aggregate: str,
    filters: Mapping[str, str] | None = None,
) -> dict[str, float] | None:
    """Like :func:`_totals`, but None when nothing is recorded (unknown, not zero)."""
    found = _totals(metric, window, by, aggregate, filters)
    return found or None


def _total(metric: str, window: cost.Window) -> float | None:
    """The window total of a cluster-wide series; None when it has no samples in the window."""
    found = _totals(metric, window, (), "cluster")
    return found.get("") if found else None


# -- /gpu/cost/analysis ------------------------------------------------------------------------


@api.get("/gpu/cost/analysis")
@scoped("filtered")
def cost_analysis() -> Response:
    """The seed's cost analysis over the last ``days`` days, from the recorded cost series."""
    days = cost.parse_int(
        _arg("days"), "days", default=cost.DEFAULT_DAYS, low=1, high=cost.MAX_WINDOW_DAYS
    )
    return success(cached("cost-analysis", (days,), lambda: _analysis(days)))


def _analysis(days: int) -> dict[str, Any]:
    now = services().clock()
    end = now.astimezone(dt.UTC).replace(microsecond=0)
    window = cost.Window(end - dt.timedelta(days=days), end)
    if scopes.current().restricted:
        # The token's pods only: every figure from the pod series, no unallocated capacity.
        team_label = services().config.team_label
        by_namespace = _totals(pricing.POD_COST, window, ("namespace",), "namespace")
        by_team = _totals(pricing.POD_COST, window, (team_label,), "team")
        by_model = _totals(pricing.POD_COST, window, ("model",), "model")
        by_profile = _totals(pricing.POD_COST, window, ("mig_profile",), "mig_profile")
        allocated = sum(by_namespace.values()) if by_namespace else None
        unallocated = None
        total = allocated
    else:
        allocated = _total(pricing.CLUSTER_ALLOCATED, window)
        unallocated = _total(pricing.CLUSTER_UNALLOCATED, window)
        total = (
            None
            if allocated is None and unallocated is None
            else (allocated or 0.0) + (unallocated or 0.0)
        )
        by_namespace = _totals(pricing.NAMESPACE_COST, window, ("namespace",), "namespace")
        by_team = _totals(pricing.TEAM_COST, window, ("team",), "team")
        by_model = _totals(pricing.MODEL_COST, window, ("model",), "model")
        by_profile = _totals(pricing.MIG_PROFILE_COST, window, ("mig_profile",), "mig_profile")
    return {
        **cost.cost_summary(total, window.days),
        "costByNamespace": cost.by_name(by_namespace),
        "costByTeam": cost.by_name(by_team),
        "costByModel": cost.by_name(by_model),
        "costByMigProfile": cost.by_name(by_profile),
        "idleCost": {cost.UNALLOCATED: cost.money(unallocated)},
        "totalCost": cost.money(total),
        "allocatedCost": cost.money(allocated),
        "potentialMonthlySavings": optimize.potential_savings(idle_area.run_suggestions(window)),
        "analysisDate": utc_timestamp(now),
        "currency": cost.CURRENCY,
        "window": window.describe(),
    }


# -- /gpu/cost/report --------------------------------------------------------------------------


@api.get("/gpu/cost/report")
@scoped("filtered")
def cost_report() -> Response:
    """Cost by one aggregate over a window, with GPU-hours, efficiency and share; JSON or CSV."""
    length, start, end = _arg("window"), _arg("start"), _arg("end")

    def window() -> cost.Window:
        return cost.parse_window(now=services().clock(), window=length, start=start, end=end)

    window()  # a bad window is a 400 before anything is cached
    aggregate = cost.parse_choice(_arg("aggregate"), "aggregate", cost.AGGREGATES, "namespace")
    fmt = cost.parse_choice(_arg("format"), "format", cost.FORMATS, "json")
    namespace, team = _filters()

    key = (length, start, end, aggregate, fmt, namespace, team)
    kind, payload = cached(
        "cost-report", key, lambda: _report(window(), aggregate, fmt, namespace, team)
    )
    if kind == "csv":
        return csv_attachment(*payload)
    return success(payload)


def _report(
    window: cost.Window, aggregate: str, fmt: str, namespace: str | None, team: str | None
) -> tuple[str, Any]:
    """("csv", (file name, text)) or ("json", data) for one report request."""
    team_label = services().config.team_label
    plan = cost.report_plan(
        aggregate,
        namespace=namespace,
        team=team,
        team_label=team_label,
        scoped=scopes.current().restricted,
    )

    costs = _totals(plan.cost_metric, window, plan.by, aggregate, plan.filters)
    gpu_hours = _optional(plan.devices_metric, window, plan.by, aggregate, plan.filters)
    measured = _optional(plan.measured_metric, window, plan.by, aggregate, plan.filters)
    utilized = _optional(plan.utilized_metric, window, plan.by, aggregate, plan.filters)
    unallocated: dict[str, float] | None = None
    unallocated_hours: dict[str, float] | None = None
    if plan.unallocated_metric is not None:
        by = plan.unallocated_by
        kind = aggregate if by else "cluster"
        unallocated = _totals(plan.unallocated_metric, window, by, kind)
        unallocated_hours = _optional(cost.DEVICE_UNALLOCATED_DEVICES, window, by, kind)
        if not by:  # one cluster-wide row
            unallocated = {cost.UNALLOCATED: sum(unallocated.values())} if unallocated else {}
            if unallocated_hours is not None:
                unallocated_hours = {cost.UNALLOCATED: sum(unallocated_hours.values())}
    frame = cost.build_report(
        costs,
        unallocated=unallocated,
        gpu_hours=gpu_hours,
        utilized=utilized,
        measured=measured,
        unallocated_gpu_hours=unallocated_hours,
    )
    if fmt == "csv":
        name = f"gpu-cost-{aggregate}-{window.start:%Y%m%dT%H%M%SZ}-{window.end:%Y%m%dT%H%M%SZ}"
        return "csv", (name, cost.report_csv(frame, window, aggregate))
    rows = cost.report_records(frame)
    allocated_total = sum(r["cost"] or 0.0 for r in rows if r["kind"] == "allocated")
    unallocated_total = sum(r["cost"] or 0.0 for r in rows if r["kind"] == cost.UNALLOCATED)
    return "json", {
        "aggregate": aggregate,
        "window": window.describe(),
        "currency": cost.CURRENCY,
        "filters": {"namespace": namespace, "team": team},
        "totalCost": cost.money(allocated_total + unallocated_total),
        "allocatedCost": cost.money(allocated_total),
        "unallocatedCost": cost.money(unallocated_total) if unallocated is not None else None,
        "rows": rows,
    }


# -- /gpu/allocations/cost-statistics ----------------------------------------------------------


@api.get("/gpu/allocations/cost-statistics")
@scoped("filtered")
def allocation_cost_statistics() -> Response:
    """Cost per allocation (one pod over the window): summary figures and the top N pods."""
    days = cost.parse_int(
        _arg("days"), "days", default=cost.DEFAULT_DAYS, low=1, high=cost.MAX_WINDOW_DAYS
    )
    top = cost.parse_int(_arg("top"), "top", default=10, low=1, high=1000)
    namespace, team = _filters()
    key = (days, top, namespace, team)
    return success(
        cached("allocation-cost-statistics", key, lambda: _statistics(days, top, namespace, team))
    )


def _statistics(days: int, top: int, namespace: str | None, team: str | None) -> dict[str, Any]:
    team_label = services().config.team_label
    end = services().clock().astimezone(dt.UTC).replace(microsecond=0)
    window = cost.Window(end - dt.timedelta(days=days), end)
    filters: dict[str, str] = {}
    if namespace is not None:
        filters["namespace"] = namespace
    if team is not None:
        filters[team_label] = team
    by = ("namespace", "pod", team_label)
    costs = _totals(pricing.POD_COST, window, by, "pod", filters)
    hours = _optional(cost.POD_DEVICES, window, by, "pod", filters)
    measured = _optional(cost.POD_MEASURED_DEVICES, window, by, "pod", filters)
    utilized = _optional(cost.POD_UTILIZED_DEVICES, window, by, "pod", filters)
    records = []
    for key, dollars in costs.items():
        ns, pod, pod_team = key.split("/", 2)
        records.append(
            {
                "namespace": ns,
                "pod": pod,
                "team": pod_team or None,
                "cost": dollars,
                "gpuHours": hours.get(key) if hours is not None else None,
                "efficiency": cost.efficiency(
                    utilized.get(key) if utilized is not None else None,
                    measured.get(key) if measured is not None else None,
                ),
            }
        )
    frame = pd.DataFrame.from_records(
        records, columns=["namespace", "pod", "team", "cost", "gpuHours", "efficiency"]
    )
    return {
        "window": window.describe(),
        "currency": cost.CURRENCY,
        "filters": {"namespace": namespace, "team": team},
        **cost.allocation_statistics(frame, top),
    }


# -- OpenAPI -----------------------------------------------------------------------------------

_BY_NAME = {"type": "object", "additionalProperties": {"type": "number"}}
_WINDOW = {
    "type": "object",
    "properties": {
        "start": {"type": "string", "format": "date-time"},
        "end": {"type": "string", "format": "date-time"},
        "days": {"type": "number"},
    },
}
_FILTERS = {
    "type": "object",
    "properties": {
        "namespace": {"type": "string", "nullable": True},
        "team": {"type": "string", "nullable": True},
    },
}
_DAYS = query_param(
    "days",
    {"type": "integer", "minimum": 1, "maximum": cost.MAX_WINDOW_DAYS, "default": 7},
    "Window: the last N days, ending now.",
)

_ANALYSIS = operation(
    summary="GPU cost analysis over the last N days (the seed's fields, plus by model and MIG)",
    tag=_TAG,
    operation_id="getGpuCostAnalysis",
    description=(
        "Dollars from the pricing rules' recorded series over (now - days, now]. dailyCost is "
        "the window's total (allocated plus unallocated capacity) per day; weeklyCost and "
        "monthlyCost project it to 7 and 30 days. costBy* maps name to dollars (pods without a "
        "team label sum under '(none)'). idleCost.unallocated is priced capacity no pod held. "
        "potentialMonthlySavings is null: it needs idle detection (allocated but unused GPUs), "
        "which a later release adds."
    ),
    parameters=[_DAYS],
    errors=(400, 503),
    data={
        "type": "object",
        "properties": {
            "dailyCost": DOLLARS,
            "weeklyCost": DOLLARS,
            "monthlyCost": DOLLARS,
            "costByNamespace": _BY_NAME,
            "costByTeam": _BY_NAME,
            "costByModel": _BY_NAME,
            "costByMigProfile": _BY_NAME,
            "idleCost": {"type": "object", "properties": {"unallocated": DOLLARS}},
            "totalCost": DOLLARS,
            "allocatedCost": DOLLARS,
            "potentialMonthlySavings": {
                "type": "number",
                "nullable": True,
                "description": "Always null for now: idle detection is a later release.",
            },
            "analysisDate": {"type": "string", "format": "date-time"},
            "currency": {"type": "string", "enum": [cost.CURRENCY]},
            "window": _WINDOW,
        },
    },
)

_ROW = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": ["allocated", cost.UNALLOCATED]},
        "key": {
            "type": "string",
            "description": "The aggregate's value (namespace/pod for pods); 'unallocated' for "
            "the cluster's idle capacity when the aggregate is not node or model.",
        },
        "cost": DOLLARS,
        "gpuHours": {
            "type": "number",
            "nullable": True,
            "description": "GPU-equivalents held times hours (a MIG instance counts k/7, a "
            "time-sliced share 1/n); null where the GPU-share series is not recorded.",
        },
        "efficiency": {
            **NULLABLE_RATIO,
            "description": "Held devices' utilization, weighted by GPU-hours held; null when "
            "unknown.",
        },
        "share": {**NULLABLE_RATIO, "description": "Part of the report's total cost."},
    },
}

_REPORT = operation(
    summary="GPU cost report over a window, by namespace, team, pod, node, model or MIG profile",
    tag=_TAG,
    operation_id="getGpuCostReport",
    description=(
        "The window is (start, end]: either `window` back from `end` (default now), or "
        "`start` and optional `end`; at most 90 days. Rows: allocated cost per key, dearest "
        "first, then unallocated (idle) capacity as rows of kind 'unallocated' (per node or "
        "model for those aggregates, one cluster row otherwise; none when filtered). "
        "format=csv answers text/csv with columns " + ",".join(cost.CSV_COLUMNS) + "."
    ),
    parameters=[
        query_param(
            "window",
            {"type": "string", "pattern": "^[1-9][0-9]*[hdw]$", "default": "7d"},
            "Window length ending at `end`: 24h, 7d, 30d, 2w.",
        ),
        query_param(
            "start", {"type": "string"}, "Window start, RFC 3339 or Unix seconds (not with window)."
        ),
        query_param("end", {"type": "string"}, "Window end, RFC 3339 or Unix seconds; now."),
        query_param(
            "aggregate",
            {"type": "string", "enum": list(cost.AGGREGATES), "default": "namespace"},
            "What one row is.",
        ),
        query_param(
            "format",
            {"type": "string", "enum": list(cost.FORMATS), "default": "json"},
            "json (the envelope) or csv (a spreadsheet).",
        ),
        NAMESPACE_FILTER,
        TEAM_FILTER,
    ],
    errors=(400, 503),
    data={
        "type": "object",
        "properties": {
            "aggregate": {"type": "string", "enum": list(cost.AGGREGATES)},
            "window": _WINDOW,
            "currency": {"type": "string"},
            "filters": _FILTERS,
            "totalCost": DOLLARS,
            "allocatedCost": DOLLARS,
            "unallocatedCost": DOLLARS,
            "rows": {"type": "array", "items": _ROW},
        },
    },
)
_REPORT["responses"]["200"]["content"]["text/csv"] = {"schema": {"type": "string"}}

_ALLOCATION = {
    "type": "object",
    "properties": {
        "namespace": {"type": "string"},
        "pod": {"type": "string"},
        "team": {"type": "string", "nullable": True},
        "cost": DOLLARS,
        "gpuHours": {"type": "number", "nullable": True},
        "costPerGpuHour": DOLLARS,
        "efficiency": NULLABLE_RATIO,
        "share": NULLABLE_RATIO,
    },
}

_STATISTICS = operation(
    summary="Cost per allocation (a pod over the last N days): summary and the top N pods",
    tag=_TAG,
    operation_id="getGpuAllocationCostStatistics",
    parameters=[
        _DAYS,
        query_param(
            "top",
            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
            "How many of the dearest pods to list.",
        ),
        NAMESPACE_FILTER,
        TEAM_FILTER,
    ],
    errors=(400, 503),
    data={
        "type": "object",
        "properties": {
            "window": _WINDOW,
            "currency": {"type": "string"},
            "filters": _FILTERS,
            "allocationCount": {"type": "integer"},
            "totalCost": DOLLARS,
            "averageCostPerAllocation": DOLLARS,
            "medianCostPerAllocation": DOLLARS,
            "maxCostPerAllocation": DOLLARS,
            "topAllocations": {"type": "array", "items": _ALLOCATION},
        },
    },
)


@api.get("/gpu/cost/pricing-rules")
@scoped("open")
def pricing_rules() -> Response:
    """The configured pricing as Prometheus recording rules, ready for a rule file.

    The same text `gpu-analytics rules` writes: load it into Prometheus (or the Helm chart's
    PrometheusRule) so that Prometheus records cost every interval.
    """
    ctx = services()
    if ctx.pricing is None:
        raise ApiError(
            ErrorCode.RESOURCE_NOT_FOUND,
            "no pricing_file is configured",
            {"fix": "set pricing_file in the analytics configuration"},
        )
    interval = ctx.config.rules_interval
    text = pricing.render_rules(
        ctx.pricing,
        interval=interval,
        team_label=ctx.config.team_label,
        inputs=ctx.config.rule_inputs(),
    )
    return success({"interval": interval, "teamLabel": ctx.config.team_label, "rules": text})


_PRICING_RULES = operation(
    summary="The pricing as Prometheus recording rules (YAML text)",
    tag=_TAG,
    description="The rule file `gpu-analytics rules` writes, generated from the configured "
    "pricing file; 404 when none is configured.",
    data={
        "type": "object",
        "properties": {
            "interval": {"type": "string"},
            "teamLabel": {"type": "string"},
            "rules": {"type": "string", "description": "a Prometheus rule file, YAML"},
        },
    },
    errors=(404,),
)


OPENAPI_PATHS: dict[str, Any] = {
    f"{API_PREFIX}/gpu/cost/pricing-rules": {"get": _PRICING_RULES},
    f"{API_PREFIX}/gpu/cost/analysis": {"get": _ANALYSIS},
    f"{API_PREFIX}/gpu/cost/report": {"get": _REPORT},
    f"{API_PREFIX}/gpu/allocations/cost-statistics": {"get": _STATISTICS},
}
