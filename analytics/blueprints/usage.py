"""Allocations, usage statistics, overheating alerts and the cluster overview.

Read from the exporter's series through Prometheus at the service clock's instant; the
arithmetic lives in :mod:`analytics.usage`, this module parses requests and runs queries.

A team-scoped token sees its own pods' allocations, and usage and temperature of the GPUs its
pods hold now (see :func:`analytics.blueprints.devices.held_by_scope`); the cluster overview
is cluster-wide (403).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from analytics import cost, pricing, usage
from analytics import scope as scopes
from analytics.auth import API_PREFIX
from analytics.blueprints.devices import held_by_scope
from analytics.context import services
from analytics.envelope import success, utc_timestamp
from analytics.openapi import (
    NAMESPACE_FILTER,
    NULLABLE_NUMBER,
    NULLABLE_STRING,
    TEAM_FILTER,
    operation,
    query_param,
)
from analytics.promql import selector, validate_name
from analytics.scope import scoped

api = Blueprint("usage", __name__)

_TAG = "usage"


def _arg(name: str) -> str | None:
    """A query parameter; an empty value counts as absent."""
    value = request.args.get(name)
    return value if value not in (None, "") else None


def _now() -> float:
    return services().clock().timestamp()


def _query(promql: str, at: float) -> list[usage.Sample]:
    return [(s.labels, s.value) for s in services().prometheus.query(promql, at=at)]


def _hours(default: int) -> int:
    return cost.parse_int(_arg("hours"), "hours", default=default, low=1, high=usage.MAX_HOURS)


def _scalar(metric: str, at: float) -> float | None:
    found = _query(f"sum({selector(metric)})", at)
    return found[0][1] if found else None


@api.get("/gpu/allocations")
@scoped("filtered")
def allocations() -> Response:
    """Allocations observed now (``gpu_allocation_info``), filtered by namespace and team."""
    namespace = _arg("namespace")
    team = _arg("team")
    team_label = services().config.team_label
    filters: dict[str, str] = {}
    if namespace is not None:
        filters["namespace"] = validate_name(namespace, "namespace", rule="dns-label")
    if team is not None:
        filters[team_label] = validate_name(team, "team", rule="label-value")
    scopes.current().check_filters(namespace, team)
    at = _now()
    series = services().config.rule_inputs().allocations
    pods = usage.pods_per_device(_query(usage.pods_per_device_query(series), at))
    records = scopes.visible(
        usage.allocation_records(
            _query(usage.allocations_query(filters, series), at), pods, team_label
        )
    )
    return success(
        {
            "filters": {"namespace": namespace, "team": team},
            "count": len(records),
            "allocations": records,
        }
    )


@api.get("/gpu/metrics/usage-statistics")
@scoped("filtered")
def usage_statistics() -> Response:
    """Per device, GPU model and node: utilization, memory and GPU-hours over the last hours."""
    hours = _hours(usage.DEFAULT_HOURS)
    at = _now()
    results = {name: _query(q, at) for name, q in usage.usage_queries(hours).items()}
    devices = usage.device_statistics(results, hours)
    rows = [devices[key] for key in sorted(devices)]
    held = held_by_scope()
    if held is not None:
        rows = [row for row in rows if row["deviceId"] in held.gpus]
    return success(
        {
            "timeRange": f"{hours} hours",
            "hours": hours,
            "analysisDate": utc_timestamp(services().clock()),
            "deviceStatistics": {f"{row['node']}/{row['deviceId']}": row for row in rows},
            "modelStatistics": usage.group_statistics(rows, "modelName"),
            "nodeStatistics": usage.group_statistics(rows, "node"),
        }
    )


@api.get("/gpu/metrics/overheating-alerts")
@scoped("filtered")
def overheating_alerts() -> Response:
    """GPUs whose peak temperature in the last hours exceeded the threshold."""
    threshold = usage.parse_threshold(_arg("threshold"))
    hours = _hours(usage.DEFAULT_ALERT_HOURS)
    at = _now()
    peaks = _query(usage.overheating_query(threshold, hours), at)
    current = _query(selector("gpu_temperature_celsius"), at)
    alerts = usage.overheating_records(peaks, current, threshold)
    held = held_by_scope()
    if held is not None:
        alerts = [alert for alert in alerts if alert["deviceId"] in held.gpus]
    return success({"threshold": threshold, "hours": hours, "count": len(alerts), "alerts": alerts})


@api.get("/gpu/overview")
@scoped("cluster")
def overview() -> Response:
    """The cluster now: nodes, GPUs, MIG instances, allocations, utilization, cost per hour."""
    at = _now()
    data: dict[str, Any] = usage.overview(
        info=_query(selector("gpu_info"), at),
        mig=_query(selector("gpu_mig_info"), at),
        up=_query(selector("gpu_up"), at),
        allocations=_query(selector("gpu_allocation_info"), at),
        utilization=_query(selector("gpu_utilization_ratio"), at),
        memory_ratio=_query(
            f"{selector('gpu_memory_used_bytes')} / {selector('gpu_memory_total_bytes')}", at
        ),
        temperature=_query(selector("gpu_temperature_celsius"), at),
    )
    data.update(
        usage.hourly_cost(
            _scalar(pricing.CLUSTER_ALLOCATED, at), _scalar(pricing.CLUSTER_UNALLOCATED, at)
        )
    )
    data["analysisDate"] = utc_timestamp(services().clock())
    return success(data)


# -- OpenAPI -----------------------------------------------------------------------------------

_HOURS_PARAM = query_param(
    "hours",
    {"type": "integer", "minimum": 1, "maximum": usage.MAX_HOURS, "default": usage.DEFAULT_HOURS},
    "Window: the last N hours, ending now.",
)
_STATS = {
    "type": "object",
    "properties": {
        "deviceCount": {"type": "integer"},
        "avgGpuUtilization": NULLABLE_NUMBER,
        "maxGpuUtilization": NULLABLE_NUMBER,
        "avgMemoryUtilization": NULLABLE_NUMBER,
        "avgTemperature": NULLABLE_NUMBER,
        "gpuHours": NULLABLE_NUMBER,
    },
}
_DEVICE_STATS = {
    "type": "object",
    "properties": {
        "node": {"type": "string"},
        "deviceId": {"type": "string"},
        "modelName": NULLABLE_STRING,
        "avgGpuUtilization": NULLABLE_NUMBER,
        "maxGpuUtilization": NULLABLE_NUMBER,
        "avgMemoryUtilization": NULLABLE_NUMBER,
        "avgTemperature": NULLABLE_NUMBER,
        "gpuHours": NULLABLE_NUMBER,
        "samples": {"type": "integer"},
    },
}
_ALLOCATION = {
    "type": "object",
    "properties": {
        "allocationId": {"type": "string", "description": "namespace/pod/device uuid"},
        "namespace": {"type": "string"},
        "pod": {"type": "string"},
        "container": NULLABLE_STRING,
        "team": NULLABLE_STRING,
        "resource": NULLABLE_STRING,
        "resourceType": {"type": "string", "enum": ["GPU", "MIG_INSTANCE", "SHARED_GPU"]},
        "deviceId": {"type": "string", "description": "GPU uuid"},
        "migUuid": NULLABLE_STRING,
        "migProfile": NULLABLE_STRING,
        "model": NULLABLE_STRING,
        "node": {"type": "string"},
        "status": {"type": "string", "enum": ["ALLOCATED"]},
    },
}
_ALERT = {
    "type": "object",
    "properties": {
        "node": {"type": "string"},
        "deviceId": {"type": "string"},
        "gpu": NULLABLE_STRING,
        "modelName": NULLABLE_STRING,
        "peakTemperature": {"type": "number"},
        "currentTemperature": NULLABLE_NUMBER,
        "threshold": {"type": "number"},
        "severity": {"type": "string", "enum": ["WARNING", "CRITICAL"]},
    },
}

OPENAPI_PATHS: dict[str, Any] = {
    f"{API_PREFIX}/gpu/allocations": {
        "get": operation(
            summary="GPU allocations observed now (from the exporter's gpu_allocation_info)",
            tag=_TAG,
            operation_id="listGpuAllocations",
            description=(
                "One row per pod and device (a whole GPU, a MIG instance, or a share of a "
                "time-sliced GPU: SHARED_GPU when several pods hold one GPU)."
            ),
            parameters=[
                NAMESPACE_FILTER,
                TEAM_FILTER,
            ],
            errors=(400, 503),
            data={
                "type": "object",
                "properties": {
                    "filters": {"type": "object"},
                    "count": {"type": "integer"},
                    "allocations": {"type": "array", "items": _ALLOCATION},
                },
            },
        )
    },
    f"{API_PREFIX}/gpu/metrics/usage-statistics": {
        "get": operation(
            summary="Utilization, memory, temperature and GPU-hours per device, model and node",
            tag=_TAG,
            operation_id="getGpuUsageStatistics",
            description=(
                "avg_over_time/max_over_time over the last `hours` at now, in percent. "
                "Utilization is gpu_utilization_ratio on whole GPUs; on MIG GPUs the average is "
                "the instances' SM activity weighted by compute slices / 7 and the maximum the "
                "busiest instance's peak. gpuHours = fraction of gpu_up samples equal to 1 times "
                "the window (a GPU that appeared during the window counts for all of it)."
            ),
            parameters=[_HOURS_PARAM],
            errors=(400, 503),
            data={
                "type": "object",
                "properties": {
                    "timeRange": {"type": "string"},
                    "hours": {"type": "integer"},
                    "analysisDate": {"type": "string", "format": "date-time"},
                    "deviceStatistics": {"type": "object", "additionalProperties": _DEVICE_STATS},
                    "modelStatistics": {"type": "object", "additionalProperties": _STATS},
                    "nodeStatistics": {"type": "object", "additionalProperties": _STATS},
                },
            },
        )
    },
    f"{API_PREFIX}/gpu/metrics/overheating-alerts": {
        "get": operation(
            summary="GPUs whose peak temperature in the window exceeded a threshold",
            tag=_TAG,
            operation_id="getGpuOverheatingAlerts",
            description="CRITICAL when the peak is 10 °C or more above the threshold.",
            parameters=[
                query_param(
                    "threshold",
                    {
                        "type": "number",
                        "minimum": 0,
                        "maximum": usage.MAX_THRESHOLD,
                        "default": usage.DEFAULT_THRESHOLD,
                    },
                    "Degrees Celsius.",
                ),
                query_param(
                    "hours",
                    {"type": "integer", "minimum": 1, "maximum": usage.MAX_HOURS, "default": 1},
                    "Window: the last N hours, ending now.",
                ),
            ],
            errors=(400, 503),
            data={
                "type": "object",
                "properties": {
                    "threshold": {"type": "number"},
                    "hours": {"type": "integer"},
                    "count": {"type": "integer"},
                    "alerts": {"type": "array", "items": _ALERT},
                },
            },
        )
    },
    f"{API_PREFIX}/gpu/overview": {
        "get": operation(
            summary="Cluster overview now: nodes, GPUs, MIG instances, allocations, cost per hour",
            tag=_TAG,
            operation_id="getGpuOverview",
            description=(
                "Devices are whole GPUs plus MIG instances (a time-sliced GPU counts once). "
                "overallGpuUtilization averages gpu_utilization_ratio (whole GPUs). "
                "totalHourlyCost is cluster allocated + unallocated cost from the pricing rules; "
                "null when they are not recorded. totalMonthlyCost projects it to 30 days."
            ),
            errors=(503,),
            data={
                "type": "object",
                "properties": {
                    **{
                        name: {"type": "integer"}
                        for name in (
                            "totalNodes",
                            "totalGpuDevices",
                            "totalMigInstances",
                            "totalDevices",
                            "allocatedDevices",
                            "freeDevices",
                            "activeAllocations",
                            "gpusDown",
                        )
                    },
                    "devicesByModel": {
                        "type": "object",
                        "additionalProperties": {"type": "integer"},
                    },
                    "overallGpuUtilization": NULLABLE_NUMBER,
                    "overallMemoryUtilization": NULLABLE_NUMBER,
                    "overallTemperature": NULLABLE_NUMBER,
                    "totalHourlyCost": NULLABLE_NUMBER,
                    "totalMonthlyCost": NULLABLE_NUMBER,
                    "analysisDate": {"type": "string", "format": "date-time"},
                },
            },
        )
    },
}
