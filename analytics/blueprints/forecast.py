"""Forecasts: the seed's `/gpu/forecast` (GPU activity and GPUs held, per scope) and
`/resources/forecast` (GPUs held against the GPUs there are, and when they run out).

Answers come from the cached models (:mod:`analytics.forecasting`), refitted on a schedule;
this module parses the request and shapes the answer.

A team-scoped token may read the forecasts of its own namespaces and teams only; cluster and
node forecasts (and capacity) are cluster-wide: 403.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from analytics import cost, forecasting
from analytics import scope as scopes
from analytics.context import services
from analytics.envelope import ApiError, ErrorCode, success, utc_timestamp
from analytics.openapi import NULLABLE_NUMBER, NULLABLE_STRING, operation, query_param
from analytics.scope import forbidden, scoped

api = Blueprint("forecast", __name__)

_TAG = "forecast"
DEFAULT_HOURS = 24


def _arg(name: str) -> str | None:
    value = request.args.get(name)
    return value if value not in (None, "") else None


def _hours() -> int:
    return cost.parse_int(
        _arg("hours"), "hours", default=DEFAULT_HOURS, low=1, high=forecasting.MAX_HOURS
    )


def _forecasts() -> forecasting.Forecasts:
    store = services().forecasts
    assert store is not None  # create_app always builds one
    return store.get()


@api.get("/gpu/forecast")
@scoped("filtered")
def gpu_forecast() -> Response:
    """Hourly forecasts of GPU activity and of GPUs held, for a scope (default the cluster)."""
    hours = _hours()
    scope, target = forecasting.parse_scope(_arg("scope"), _arg("name"))
    token = scopes.current()
    allowed: frozenset[str] | None = None  # None: every target
    if token.restricted:
        if scope not in ("namespace", "team"):
            raise forbidden(
                f"{scope} forecasts are cluster-wide; a team-scoped token may ask for "
                "scope=namespace or scope=team",
                "scope",
            )
        token.check_filters(
            namespace=target if scope == "namespace" else None,
            team=target if scope == "team" else None,
        )
        allowed = token.namespaces if scope == "namespace" else token.teams
    forecasts = _forecasts()
    chosen = forecasting.select(forecasts, scope, target)
    if allowed is not None:
        chosen = {key: item for key, item in chosen.items() if key[1] in allowed}
    if target is not None and not chosen:
        raise ApiError(
            ErrorCode.RESOURCE_NOT_FOUND,
            f"no {scope} named {target!r} has GPU history to forecast",
            {"scope": scope, "name": target},
        )
    now = services().clock()
    return success(
        {
            "hours": hours,
            "scope": scope,
            "generatedAt": utc_timestamp(forecasts.generated_at),
            "forecasts": [forecasting.scope_record(i, hours, now) for i in chosen.values()],
        }
    )


@api.get("/resources/forecast")
@scoped("cluster")
def resources_forecast() -> Response:
    """GPUs held against the GPUs there are, for the cluster and each node, with the time the
    forecast says they run out (within `hours`)."""
    hours = _hours()
    forecasts = _forecasts()
    now = services().clock()
    records = []
    for scope in (forecasting.CLUSTER, "node"):
        for item in forecasting.select(forecasts, scope, None).values():
            record = forecasting.scope_record(item, hours, now)
            records.append(
                {
                    "scope": record["scope"],
                    "target": record["target"],
                    "capacityDevices": record["capacityDevices"],
                    "allocatedDevices": record["allocatedDevices"],
                    "capacityExhaustedAt": record["capacityExhaustedAt"],
                }
            )
    exhausted = [r for r in records if r["capacityExhaustedAt"] is not None]
    return success(
        {
            "hours": hours,
            "generatedAt": utc_timestamp(forecasts.generated_at),
            "exhaustedWithinHorizon": len(exhausted),
            "resources": records,
        }
    )


_POINT = {
    "type": "object",
    "properties": {
        "time": {"type": "string", "format": "date-time"},
        "mean": {"type": "number"},
        "lower": {"type": "number"},
        "upper": {"type": "number"},
    },
}
_SERIES = {
    "type": "object",
    "nullable": True,
    "properties": {
        "model": {"type": "string"},
        "level": {"type": "number"},
        "points": {"type": "array", "items": _POINT},
    },
}
_HOURS = query_param(
    "hours",
    {"type": "integer", "minimum": 1, "maximum": forecasting.MAX_HOURS, "default": DEFAULT_HOURS},
    "How many hours ahead.",
)

OPENAPI_PATHS: dict[str, Any] = {
    "/api/v1/gpu/forecast": {
        "get": operation(
            summary="Hourly forecasts of GPU activity and GPUs held, with 80% intervals",
            tag=_TAG,
            operation_id="getGpuForecast",
            description=(
                "Exponential smoothing with daily (and, from two weeks of history, weekly) "
                "seasonality, chosen by AICc; intervals from the model's own forecast errors. "
                "Models are refitted on a schedule, not per request."
            ),
            parameters=[
                _HOURS,
                query_param(
                    "scope",
                    {"type": "string", "enum": list(forecasting.SCOPES), "default": "cluster"},
                    "What to forecast.",
                ),
                query_param("name", {"type": "string"}, "One node, namespace or team."),
            ],
            errors=(400, 404, 503),
            data={
                "type": "object",
                "properties": {
                    "hours": {"type": "integer"},
                    "scope": {"type": "string"},
                    "generatedAt": {"type": "string", "format": "date-time"},
                    "forecasts": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "scope": {"type": "string"},
                                "target": {"type": "string"},
                                "historyHours": {"type": "integer"},
                                "allocatedDevices": _SERIES,
                                "activity": _SERIES,
                                "capacityDevices": NULLABLE_NUMBER,
                                "capacityExhaustedAt": NULLABLE_STRING,
                            },
                        },
                    },
                },
            },
        )
    },
    "/api/v1/resources/forecast": {
        "get": operation(
            summary="GPUs held against capacity, per cluster and node, and when they run out",
            tag=_TAG,
            operation_id="getResourcesForecast",
            parameters=[_HOURS],
            errors=(400, 503),
            data={
                "type": "object",
                "properties": {
                    "hours": {"type": "integer"},
                    "generatedAt": {"type": "string", "format": "date-time"},
                    "exhaustedWithinHorizon": {"type": "integer"},
                    "resources": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "scope": {"type": "string"},
                                "target": {"type": "string"},
                                "capacityDevices": NULLABLE_NUMBER,
                                "allocatedDevices": _SERIES,
                                "capacityExhaustedAt": NULLABLE_STRING,
                            },
                        },
                    },
                },
            },
        )
    },
}
