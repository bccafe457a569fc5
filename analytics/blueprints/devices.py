"""Devices and MIG: the exporter's GPUs and MIG instances as they are at the latest instant.

Every figure is an instant query of the exporter's metrics at the service clock's "now"
(Prometheus' 5-minute lookback applies); the shaping lives in :mod:`analytics.devices`.
Request values reach PromQL only through :func:`analytics.promql.selector`, after validation.

A team-scoped token sees the GPUs its pods hold now (a whole GPU, or a GPU with one of its MIG
instances held), with only its own pods in ``allocatedTo`` and only its own MIG instances;
any other device is "not found". Free MIG capacity is cluster-wide: 403.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, request

from analytics import devices
from analytics import scope as scopes
from analytics.auth import API_PREFIX
from analytics.context import services
from analytics.envelope import not_found, success
from analytics.openapi import (
    NULLABLE_INTEGER,
    NULLABLE_NUMBER,
    NULLABLE_RATIO,
    operation,
    path_param,
    query_param,
)
from analytics.promql import selector, validate_label_value, validate_name
from analytics.scope import scoped

api = Blueprint("devices", __name__)

_TAG = "devices"
_MIG_TAG = "mig"


def _arg(name: str) -> str | None:
    """A query parameter; an empty value counts as absent."""
    value = request.args.get(name)
    return value if value not in (None, "") else None


def _read(metrics: Sequence[str], **labels: str | None) -> devices.Readings:
    """Instant-query each metric, filtered by ``labels`` (validated values), at the clock's now."""
    at = services().clock().timestamp()
    prometheus = services().prometheus
    return {
        metric: [(s.labels, s.value) for s in prometheus.query(selector(metric, **labels), at=at)]
        for metric in metrics
    }


@dataclass(frozen=True)
class Held:
    """What the pods a scoped token sees hold now."""

    gpus: frozenset[str]  # GPU uuids, held whole or through one of their MIG instances
    instances: frozenset[str]  # MIG instance uuids
    pods: frozenset[tuple[str, str]]  # (namespace, pod)

    def pods_only(self, entry: dict[str, Any]) -> dict[str, Any]:
        """``entry`` with ``allocatedTo`` cut to these pods."""
        entry["allocatedTo"] = [
            p for p in entry.get("allocatedTo", []) if (p["namespace"], p["pod"]) in self.pods
        ]
        return entry


def held_by_scope() -> Held | None:
    """The devices the token's pods hold now; None for a token that sees everything.

    Read from the source's allocation series (``RuleInputs.allocations``), which carries the
    namespace and the team label for our exporter and for DCGM alike.
    """
    scope = scopes.current()
    if not scope.restricted:
        return None
    cached_held = g.get("gpu_analytics_held")
    if isinstance(cached_held, Held):
        return cached_held
    ctx = services()
    team_label = ctx.config.team_label
    series = ctx.config.rule_inputs().allocations
    samples = ctx.prometheus.query(selector(series), at=ctx.clock().timestamp())
    gpus: set[str] = set()
    instances: set[str] = set()
    pods: set[tuple[str, str]] = set()
    for sample in samples:
        labels = sample.labels
        if not scope.allows_labels(labels, team_label):
            continue
        if labels.get("uuid"):
            gpus.add(labels["uuid"])
        if labels.get("mig_uuid"):
            instances.add(labels["mig_uuid"])
        pods.add((labels.get("namespace", ""), labels.get("pod", "")))
    g.gpu_analytics_held = held = Held(frozenset(gpus), frozenset(instances), frozenset(pods))
    return held


def _visible_devices(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPUs of ``found`` the token may see, with only its pods in ``allocatedTo``."""
    held = held_by_scope()
    if held is None:
        return found
    return [held.pods_only(d) for d in found if d["deviceId"] in held.gpus]


def _visible_instances(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The MIG instances of ``found`` the token's pods hold."""
    held = held_by_scope()
    if held is None:
        return found
    return [held.pods_only(i) for i in found if i["migUuid"] in held.instances]


def _device_id(value: str) -> str:
    """A GPU UUID from the path, validated before it reaches PromQL."""
    return validate_label_value(value, "deviceId")


def _one_device(device_id: str) -> dict[str, Any]:
    """The GPU with this UUID, or 404 RESOURCE_NOT_FOUND (also when the token may not see it)."""
    found = _visible_devices(devices.build_devices(_read(devices.DEVICE_METRICS, uuid=device_id)))
    if not found:
        raise not_found("device", device_id)
    return found[0]


# -- devices -----------------------------------------------------------------------------------


@api.get("/gpu/devices")
@scoped("filtered")
def list_devices() -> Response:
    """Every GPU, optionally filtered by node, model and status."""
    node = _arg("nodeName")
    model = _arg("modelId")
    if node is not None:
        validate_name(node, "nodeName")
    if model is not None:
        validate_label_value(model, "modelId")
    status = devices.parse_status(_arg("status"))
    found = devices.build_devices(_read(devices.DEVICE_METRICS, node=node, model=model))
    found = _visible_devices(found)
    if status is not None:
        found = [d for d in found if d["status"] == status]
    return success(found)


@api.get("/gpu/devices/statistics")
@scoped("filtered")
def device_statistics() -> Response:
    """Counts by model, status and node; average utilization and memory use."""
    found = _visible_devices(devices.build_devices(_read(devices.DEVICE_METRICS)))
    return success(devices.device_statistics(found))


@api.get("/gpu/devices/overheating")
@scoped("filtered")
def overheating_devices() -> Response:
    """GPUs hotter than ``threshold`` degrees Celsius (default 85)."""
    threshold = devices.parse_threshold(_arg("threshold"))
    found = _visible_devices(devices.build_devices(_read(devices.DEVICE_METRICS)))
    return success(
        {"thresholdCelsius": threshold, "devices": devices.overheating(found, threshold)}
    )


@api.get("/gpu/devices/<deviceId>")
@scoped("filtered")
def get_device(deviceId: str) -> Response:
    """One GPU and its MIG instances."""
    device_id = _device_id(deviceId)
    device = _one_device(device_id)
    device["migInstances"] = _visible_instances(
        devices.build_mig_instances(_read(devices.MIG_METRICS, uuid=device_id))
    )
    return success(device)


# -- MIG ---------------------------------------------------------------------------------------


@api.get("/gpu/mig/available")
@scoped("cluster")
def mig_available() -> Response:
    """Per GPU and MIG profile: capacity, instances that exist, and instances still creatable."""
    return success(devices.build_mig_capacity(_read(devices.CAPACITY_METRICS)))


@api.get("/gpu/mig/devices/<deviceId>")
@scoped("filtered")
def mig_device(deviceId: str) -> Response:
    """The MIG instances of one GPU (empty when the GPU is not in MIG mode)."""
    device_id = _device_id(deviceId)
    device = _one_device(device_id)
    instances = _visible_instances(
        devices.build_mig_instances(_read(devices.MIG_METRICS, uuid=device_id))
    )
    return success(
        {
            "deviceId": device_id,
            "node": device["node"],
            "migMode": device["migMode"],
            "instances": instances,
        }
    )


@api.get("/gpu/mig/statistics")
@scoped("filtered")
def mig_statistics() -> Response:
    """MIG instances by profile: allocated vs free, and mean SM activity where known."""
    found = _visible_instances(devices.build_mig_instances(_read(devices.MIG_METRICS)))
    return success(devices.mig_statistics(found))


# -- OpenAPI -----------------------------------------------------------------------------------

_PODS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"namespace": {"type": "string"}, "pod": {"type": "string"}},
    },
}
_DEVICE_PROPS: dict[str, Any] = {
    "deviceId": {"type": "string", "description": "The GPU UUID."},
    "node": {"type": "string"},
    "index": NULLABLE_INTEGER,
    "modelName": {"type": "string"},
    "pciBusId": {"type": "string"},
    "migMode": {"type": "string", "nullable": True, "enum": ["enabled", "disabled", "unsupported"]},
    "driverVersion": {"type": "string", "nullable": True},
    "status": {"type": "string", "enum": list(devices.STATUSES)},
    "utilization": {**NULLABLE_RATIO, "description": "Null when unknown (e.g. MIG mode)."},
    "memoryUsedBytes": NULLABLE_INTEGER,
    "memoryTotalBytes": NULLABLE_INTEGER,
    "temperatureCelsius": NULLABLE_NUMBER,
    "powerWatts": NULLABLE_NUMBER,
    "allocatedTo": _PODS,
}
_DEVICE = {"type": "object", "properties": _DEVICE_PROPS}
_MIG_INSTANCE = {
    "type": "object",
    "properties": {
        "deviceId": {"type": "string"},
        "node": {"type": "string"},
        "index": NULLABLE_INTEGER,
        "profile": {"type": "string"},
        "gpuInstance": NULLABLE_INTEGER,
        "computeInstance": NULLABLE_INTEGER,
        "migUuid": {"type": "string"},
        "memoryUsedBytes": NULLABLE_INTEGER,
        "memoryTotalBytes": NULLABLE_INTEGER,
        "smActivity": {**NULLABLE_RATIO, "description": "Null where the GPU has no GPM."},
        "allocatedTo": _PODS,
    },
}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}
_DEVICE_ID = path_param("deviceId", "The GPU UUID.")
_ERRORS_LIST = (400, 503)
_ERRORS_ONE = (400, 404, 503)

_LIST = operation(
    summary="All GPUs at the latest instant",
    tag=_TAG,
    operation_id="listGpuDevices",
    description="Status: FAILED when gpu_up is 0, MIG_ENABLED in MIG mode, else ACTIVE.",
    parameters=[
        query_param("nodeName", {"type": "string"}, "Only GPUs of this node (a DNS-1123 name)."),
        query_param("modelId", {"type": "string"}, "Only GPUs of this model (model label)."),
        query_param(
            "status",
            {"type": "string", "enum": list(devices.STATUSES)},
            "Only GPUs in this status (case-insensitive).",
        ),
    ],
    errors=_ERRORS_LIST,
    data={"type": "array", "items": _DEVICE},
)
_ONE = operation(
    summary="One GPU with its MIG instances",
    tag=_TAG,
    operation_id="getGpuDevice",
    parameters=[_DEVICE_ID],
    errors=_ERRORS_ONE,
    data={
        "type": "object",
        "properties": {
            **_DEVICE_PROPS,
            "migInstances": {"type": "array", "items": _MIG_INSTANCE},
        },
    },
)
_STATISTICS = operation(
    summary="GPU counts by model, status and node; average utilization and memory use",
    tag=_TAG,
    operation_id="getGpuDeviceStatistics",
    errors=(503,),
    data={
        "type": "object",
        "properties": {
            "totalDevices": {"type": "integer"},
            "byModel": _COUNTS,
            "byStatus": _COUNTS,
            "byNode": _COUNTS,
            "allocatedDevices": {"type": "integer"},
            "averageUtilization": NULLABLE_RATIO,
            "averageMemoryUsedBytes": NULLABLE_NUMBER,
            "memoryUsedRatio": NULLABLE_RATIO,
            "averageTemperatureCelsius": NULLABLE_NUMBER,
            "totalPowerWatts": NULLABLE_NUMBER,
        },
    },
)
_OVERHEATING = operation(
    summary="GPUs above a temperature threshold, hottest first",
    tag=_TAG,
    operation_id="listOverheatingGpuDevices",
    parameters=[
        query_param(
            "threshold",
            {
                "type": "number",
                "minimum": 0,
                "maximum": devices.MAX_OVERHEAT_C,
                "default": devices.DEFAULT_OVERHEAT_C,
            },
            "Degrees Celsius; GPUs strictly above it are listed.",
        )
    ],
    errors=_ERRORS_LIST,
    data={
        "type": "object",
        "properties": {
            "thresholdCelsius": {"type": "number"},
            "devices": {"type": "array", "items": _DEVICE},
        },
    },
)
_AVAILABLE = operation(
    summary="MIG capacity per GPU and profile",
    tag=_MIG_TAG,
    operation_id="listAvailableMigInstances",
    description="From gpu_mig_instance_capacity, gpu_mig_instances and "
    "gpu_mig_instances_available; null where the exporter did not report one.",
    errors=(503,),
    data={
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "deviceId": {"type": "string"},
                "node": {"type": "string"},
                "index": NULLABLE_INTEGER,
                "modelName": {"type": "string"},
                "profile": {"type": "string"},
                "capacity": NULLABLE_INTEGER,
                "instances": NULLABLE_INTEGER,
                "available": NULLABLE_INTEGER,
            },
        },
    },
)
_MIG_DEVICE = operation(
    summary="The MIG instances of one GPU",
    tag=_MIG_TAG,
    operation_id="getMigDevice",
    parameters=[_DEVICE_ID],
    errors=_ERRORS_ONE,
    data={
        "type": "object",
        "properties": {
            "deviceId": {"type": "string"},
            "node": {"type": "string"},
            "migMode": {"type": "string", "nullable": True},
            "instances": {"type": "array", "items": _MIG_INSTANCE},
        },
    },
)
_PROFILE_STATS = {
    "type": "object",
    "properties": {
        "instances": {"type": "integer"},
        "allocated": {"type": "integer"},
        "free": {"type": "integer"},
        "averageSmActivity": NULLABLE_RATIO,
    },
}
_MIG_STATISTICS = operation(
    summary="MIG instances by profile: allocated vs free, average SM activity where known",
    tag=_MIG_TAG,
    operation_id="getMigStatistics",
    errors=(503,),
    data={
        "type": "object",
        "properties": {
            "totalInstances": {"type": "integer"},
            "allocatedInstances": {"type": "integer"},
            "freeInstances": {"type": "integer"},
            "averageSmActivity": NULLABLE_RATIO,
            "devices": {"type": "integer"},
            "byProfile": {"type": "object", "additionalProperties": _PROFILE_STATS},
        },
    },
)

OPENAPI_PATHS: dict[str, Any] = {
    f"{API_PREFIX}/gpu/devices": {"get": _LIST},
    f"{API_PREFIX}/gpu/devices/statistics": {"get": _STATISTICS},
    f"{API_PREFIX}/gpu/devices/overheating": {"get": _OVERHEATING},
    f"{API_PREFIX}/gpu/devices/{{deviceId}}": {"get": _ONE},
    f"{API_PREFIX}/gpu/mig/available": {"get": _AVAILABLE},
    f"{API_PREFIX}/gpu/mig/devices/{{deviceId}}": {"get": _MIG_DEVICE},
    f"{API_PREFIX}/gpu/mig/statistics": {"get": _MIG_STATISTICS},
}
