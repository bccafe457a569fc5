"""Idle and savings: allocated-but-idle GPUs and MIG slices, capacity nobody holds, and the
optimisation suggestions (release, right-size, consolidate) with their monthly savings.

The detection lives in :mod:`analytics.idle` (and, as recording and alert rules, in `rules/`),
the suggestions in :mod:`analytics.optimize`; this module parses requests, runs them against
Prometheus and shapes the answers.

A team-scoped token sees only its pods' idle devices and suggestions (consolidation among its
own pods), never the unallocated capacity; both endpoints go through the report cache.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from flask import Blueprint, Response, request

from analytics import cost, idle, optimize
from analytics import scope as scopes
from analytics.context import services
from analytics.envelope import csv_attachment, success
from analytics.limits import cached
from analytics.openapi import (
    DOLLARS,
    NAMESPACE_FILTER,
    NULLABLE_NUMBER,
    NULLABLE_STRING,
    TEAM_FILTER,
    operation,
    query_param,
)
from analytics.promql import validate_name
from analytics.scope import scoped

api = Blueprint("idle", __name__)

_TAG = "idle"
FORMATS = ("json", "csv")


def _arg(name: str) -> str | None:
    value = request.args.get(name)
    return value if value not in (None, "") else None


def _text(value: Any) -> str | None:
    """A label value as text; None for missing, empty or NaN (pandas' missing)."""
    return value if isinstance(value, str) and value else None


def run_idle(window: cost.Window, filters: dict[str, str] | None = None) -> idle.IdleReport:
    """The idle report for a window, with the service's configuration, limited to what the
    request's token may see (its pods only, no unallocated capacity, for a scoped token)."""
    ctx = services()
    report = idle.find_idle(
        ctx.prometheus,
        ctx.config.rule_inputs(),
        ctx.config.idle,
        start=window.start.timestamp(),
        end=window.end.timestamp(),
        team_label=ctx.config.team_label,
        rules_interval_seconds=ctx.config.rules_interval_seconds,
        filters=filters,
    )
    scope = scopes.current()
    if not scope.restricted:
        return report
    items = [
        item
        for item in report.items
        if scope.allows(_text(item.labels["namespace"]), _text(item.labels["team"]))
    ]
    spells = report.spells
    if not spells.empty:
        keep = [
            scope.allows(_text(ns), _text(team))
            for ns, team in zip(spells["namespace"], spells["team"], strict=True)
        ]
        spells = spells[keep].reset_index(drop=True)
    return dataclasses.replace(report, items=items, spells=spells, unallocated=[])


def run_suggestions(window: cost.Window) -> list[dict[str, Any]]:
    """Optimisation suggestions over a window, largest saving first."""
    ctx = services()
    report = run_idle(window)
    holdings = optimize.gather_holdings(
        ctx.prometheus,
        ctx.config.rule_inputs(),
        start=window.start.timestamp(),
        end=window.end.timestamp(),
        team_label=ctx.config.team_label,
        rules_interval_seconds=ctx.config.rules_interval_seconds,
    )
    scope = scopes.current()
    holdings = [h for h in holdings if scope.allows(h.namespace or None, h.team)]
    return optimize.suggestions(
        report.items,
        holdings,
        window_seconds=window.seconds,
        pricing=ctx.pricing,
        headroom=ctx.config.rightsize_headroom,
    )


def days_window(days: int | None = None) -> cost.Window:
    """The last ``days`` days (default: the query parameter) up to the service clock, in whole
    seconds."""
    if days is None:
        days = cost.parse_int(
            _arg("days"), "days", default=cost.DEFAULT_DAYS, low=1, high=cost.MAX_WINDOW_DAYS
        )
    end = services().clock().astimezone(dt.UTC).replace(microsecond=0)
    return cost.Window(end - dt.timedelta(days=days), end)


@api.get("/gpu/cost/optimization")
@scoped("filtered")
def optimization() -> Response:
    """The seed's optimisation endpoint: savings suggestions from the last `days` days."""
    days = cost.parse_int(
        _arg("days"), "days", default=cost.DEFAULT_DAYS, low=1, high=cost.MAX_WINDOW_DAYS
    )
    return success(cached("optimization", (days,), lambda: _optimization(days)))


def _optimization(days: int) -> dict[str, Any]:
    window = days_window(days)
    found = run_suggestions(window)
    return {
        "window": window.describe(),
        "currency": cost.CURRENCY,
        "potentialMonthlySavings": optimize.potential_savings(found),
        "count": len(found),
        "suggestions": found,
    }


@api.get("/gpu/idle")
@scoped("filtered")
def idle_list() -> Response:
    """Allocated-but-idle devices in the window (most idle cost first), then unallocated ones."""
    length, start, end = _arg("window"), _arg("start"), _arg("end")

    def window() -> cost.Window:
        return cost.parse_window(
            now=services().clock(), window=length, start=start, end=end, default="24h"
        )

    window()  # a bad window is a 400 before anything is cached
    fmt = cost.parse_choice(_arg("format"), "format", FORMATS, "json")
    filters: dict[str, str] = {}
    namespace, team = _arg("namespace"), _arg("team")
    if namespace is not None:
        filters["namespace"] = validate_name(namespace, "namespace", rule="dns-label")
    if team is not None:
        filters[services().config.team_label] = validate_name(team, "team", rule="label-value")
    scopes.current().check_filters(namespace, team)
    key = (length, start, end, fmt, namespace, team)
    kind, payload = cached("idle", key, lambda: _idle(window(), fmt, filters, namespace, team))
    if kind == "csv":
        return csv_attachment(*payload)
    return success(payload)


def _idle(
    window: cost.Window,
    fmt: str,
    filters: dict[str, str],
    namespace: str | None,
    team: str | None,
) -> tuple[str, Any]:
    """("csv", (file name, text)) or ("json", data) for one idle request."""
    settings = services().config.idle
    report = run_idle(window, filters)
    items = [idle.item_record(item, settings) for item in report.items]
    if fmt == "csv":
        name = f"gpu-idle-{window.start:%Y%m%dT%H%M%SZ}-{window.end:%Y%m%dT%H%M%SZ}"
        return "csv", (name, idle.idle_csv(items))
    # Unallocated capacity is nobody's: not shown when filtered or to a team-scoped token.
    scope = scopes.current()
    hidden = bool(filters) or scope.restricted
    thresholds = dict(settings.namespace_thresholds)
    if scope.restricted:  # other teams' namespaces are not named either
        seen = scope.namespaces | {str(i["namespace"]) for i in items}
        thresholds = {ns: t for ns, t in thresholds.items() if ns in seen}
    unallocated = idle.unallocated_records(report.unallocated, window.seconds)
    idle_costs = [i["idleCost"] for i in items if i["idleCost"] is not None]
    data = {
        "window": window.describe(),
        "filters": {"namespace": namespace, "team": team},
        "definition": {
            "threshold": settings.threshold,
            "namespaceThresholds": thresholds,
            "windowMinutes": settings.window_seconds / 60,
            "stepSeconds": report.step_seconds,
            "source": services().config.source,
        },
        "currency": cost.CURRENCY,
        "count": len(items),
        "idleNowCount": sum(1 for i in items if i["idleNow"]),
        "idleGpuHours": round(sum(i["idleHours"] * i["gpuEquivalents"] for i in items), 6),
        "idleCost": cost.money(sum(idle_costs)) if idle_costs else None,
        "items": items,
        "unallocated": unallocated if not hidden else None,
        "unallocatedCost": (
            cost.money(sum(u["cost"] for u in unallocated)) if not hidden else None
        ),
    }
    return "json", data


_EVIDENCE = {
    "type": "object",
    "properties": {
        "threshold": {"type": "number"},
        "windowMinutes": {"type": "number"},
        "maxActivity": {"type": "number"},
        "meanActivity": {"type": "number"},
        "samples": {"type": "integer"},
        "memoryHeldBytes": NULLABLE_NUMBER,
    },
}
_ITEM = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["allocated_idle"]},
        "deviceId": {"type": "string"},
        "kind": {"type": "string", "enum": ["gpu", "mig"]},
        "node": NULLABLE_STRING,
        "gpu": NULLABLE_STRING,
        "model": NULLABLE_STRING,
        "migProfile": NULLABLE_STRING,
        "parentUuid": NULLABLE_STRING,
        "namespace": {"type": "string"},
        "pod": {"type": "string"},
        "team": NULLABLE_STRING,
        "idleNow": {"type": "boolean"},
        "idleSince": {"type": "string", "format": "date-time"},
        "idleHours": {"type": "number"},
        "idleSpells": {"type": "integer"},
        "gpuEquivalents": {"type": "number"},
        "idleCost": DOLLARS,
        "costPerHour": DOLLARS,
        "evidence": _EVIDENCE,
    },
}
_UNALLOCATED = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["unallocated"]},
        "deviceId": {"type": "string"},
        "node": NULLABLE_STRING,
        "gpu": NULLABLE_STRING,
        "model": NULLABLE_STRING,
        "unallocatedHours": {"type": "number"},
        "cost": {"type": "number"},
    },
}

_SUGGESTION = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["release", "right-size", "consolidate"]},
        "action": {"type": "string"},
        "estimatedMonthlySavings": DOLLARS,
        "confidence": {"type": "string", "enum": ["high", "medium", "low"]},
        "evidence": {"type": "object"},
        "namespace": {"type": "string"},
        "pod": {"type": "string"},
        "team": NULLABLE_STRING,
        "deviceId": {"type": "string"},
        "model": NULLABLE_STRING,
        "migProfile": NULLABLE_STRING,
        "targetProfile": {"type": "string"},
        "pods": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["type", "action", "estimatedMonthlySavings", "confidence", "evidence"],
}

OPENAPI_PATHS: dict[str, Any] = {
    "/api/v1/gpu/cost/optimization": {
        "get": operation(
            summary="Savings suggestions: release idle GPUs, right-size to MIG, consolidate",
            tag=_TAG,
            operation_id="getGpuCostOptimization",
            description=(
                "From the last `days` days: release devices pods left idle for at least a "
                "quarter of the time they held them; move pods whose peak memory and p95 "
                "activity (with the configured headroom) fit a smaller MIG profile; share GPUs "
                "among long-running "
                "low-activity pods. Savings are per month (730 h) at the configured prices; "
                "null where a device has no price. potentialMonthlySavings counts each pod once."
            ),
            parameters=[
                query_param(
                    "days",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": cost.MAX_WINDOW_DAYS,
                        "default": 7,
                    },
                    "How many days of history to judge by.",
                )
            ],
            errors=(400, 503),
            data={
                "type": "object",
                "properties": {
                    "window": {"type": "object"},
                    "currency": {"type": "string"},
                    "potentialMonthlySavings": DOLLARS,
                    "count": {"type": "integer"},
                    "suggestions": {"type": "array", "items": _SUGGESTION},
                },
            },
        )
    },
    "/api/v1/gpu/idle": {
        "get": operation(
            summary="Allocated-but-idle GPUs and MIG slices in a window, and unallocated capacity",
            tag=_TAG,
            operation_id="getGpuIdle",
            description=(
                "A device a pod holds is idle while its activity stays under the threshold "
                "(GPU utilization, GPM SM activity on MIG, DCGM graphics-engine activity); a "
                "spell counts once it lasts the idle window. Each item is one pod on one "
                "device with its idle time in the window, its cost and the evidence. "
                "format=csv answers text/csv with columns " + ",".join(idle.CSV_COLUMNS) + "."
            ),
            parameters=[
                query_param(
                    "window",
                    {"type": "string", "pattern": "^[1-9][0-9]*[hdw]$", "default": "24h"},
                    "Window length ending at `end`: 24h, 7d.",
                ),
                query_param("start", {"type": "string"}, "Window start (not with window)."),
                query_param("end", {"type": "string"}, "Window end; default now."),
                NAMESPACE_FILTER,
                TEAM_FILTER,
                query_param(
                    "format",
                    {"type": "string", "enum": list(FORMATS), "default": "json"},
                    "json (the envelope) or csv.",
                ),
            ],
            errors=(400, 503),
            data={
                "type": "object",
                "properties": {
                    "window": {"type": "object"},
                    "filters": {"type": "object"},
                    "definition": {"type": "object"},
                    "currency": {"type": "string"},
                    "count": {"type": "integer"},
                    "idleNowCount": {"type": "integer"},
                    "idleGpuHours": {"type": "number"},
                    "idleCost": DOLLARS,
                    "items": {"type": "array", "items": _ITEM},
                    "unallocated": {"type": "array", "nullable": True, "items": _UNALLOCATED},
                    "unallocatedCost": DOLLARS,
                },
            },
        )
    },
}
OPENAPI_PATHS["/api/v1/gpu/idle"]["get"]["responses"]["200"]["content"]["text/csv"] = {
    "schema": {"type": "string"}
}
