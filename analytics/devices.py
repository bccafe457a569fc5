"""GPU devices and MIG instances from the exporter's metrics at one instant.

Pure functions over instant-query results (``(labels, value)`` pairs per metric): no Flask, no
Prometheus client. :mod:`analytics.blueprints.devices` runs the queries and calls these.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from analytics.promql import InvalidParameter

#: One instant-query result: the series' labels and its value.
Reading = tuple[Mapping[str, str], float]
#: Metric name -> its readings.
Readings = Mapping[str, Sequence[Reading]]

DEVICE_METRICS: tuple[str, ...] = (
    "gpu_info",
    "gpu_up",
    "gpu_utilization_ratio",
    "gpu_memory_used_bytes",
    "gpu_memory_total_bytes",
    "gpu_temperature_celsius",
    "gpu_power_watts",
    "gpu_allocation_info",
)
MIG_METRICS: tuple[str, ...] = (
    "gpu_mig_info",
    "gpu_mig_memory_used_bytes",
    "gpu_mig_memory_total_bytes",
    "gpu_mig_sm_activity_ratio",
    "gpu_allocation_info",
)
CAPACITY_METRICS: tuple[str, ...] = (
    "gpu_mig_instance_capacity",
    "gpu_mig_instances",
    "gpu_mig_instances_available",
)

STATUS_ACTIVE = "ACTIVE"
STATUS_FAILED = "FAILED"
STATUS_MIG_ENABLED = "MIG_ENABLED"
STATUSES: tuple[str, ...] = (STATUS_ACTIVE, STATUS_FAILED, STATUS_MIG_ENABLED)

DEFAULT_OVERHEAT_C = 85.0
MAX_OVERHEAT_C = 150.0


def parse_status(value: str | None) -> str | None:
    """The ``status`` filter (case-insensitive) as one of :data:`STATUSES`; None when absent."""
    if value is None:
        return None
    upper = value.upper()
    if upper not in STATUSES:
        raise InvalidParameter("status", f"must be one of {', '.join(STATUSES)}")
    return upper


def parse_threshold(value: str | None) -> float:
    """The overheating threshold in degrees Celsius, 0..150; 85 when absent."""
    if value is None:
        return DEFAULT_OVERHEAT_C
    try:
        number = float(value)
    except ValueError:
        raise InvalidParameter("threshold", "must be a number of degrees Celsius") from None
    if not math.isfinite(number) or not 0.0 <= number <= MAX_OVERHEAT_C:
        raise InvalidParameter("threshold", f"must be between 0 and {MAX_OVERHEAT_C:g}")
    return number


def _by_uuid(readings: Iterable[Reading]) -> dict[str, float]:
    """uuid -> value of a per-GPU metric (whole-GPU series only)."""
    return {
        labels["uuid"]: value
        for labels, value in readings
        if "uuid" in labels and not labels.get("mig_uuid")
    }


def _mig_key(labels: Mapping[str, str]) -> tuple[str, str, str]:
    """(GPU uuid, GPU instance, compute instance): one MIG instance."""
    return (
        labels.get("uuid", ""),
        labels.get("gpu_instance", ""),
        labels.get("compute_instance", ""),
    )


def _pods(readings: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    """Distinct ``{namespace, pod}`` of allocation series, sorted."""
    found = {(labels.get("namespace", ""), labels.get("pod", "")) for labels in readings}
    return [{"namespace": ns, "pod": pod} for ns, pod in sorted(found)]


def _optional(values: Mapping[Any, float], key: Any) -> float | None:
    value = values.get(key)
    return None if value is None or not math.isfinite(value) else value


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def device_status(up: float | None, mig_mode: str) -> str:
    """FAILED when the exporter reports the GPU down, MIG_ENABLED in MIG mode, else ACTIVE."""
    if up is not None and up == 0:
        return STATUS_FAILED
    if mig_mode == "enabled":
        return STATUS_MIG_ENABLED
    return STATUS_ACTIVE


def build_devices(readings: Readings) -> list[dict[str, Any]]:
    """One entry per GPU in ``gpu_info``, sorted by node and index.

    ``allocatedTo`` lists the pods assigned the GPU or any of its MIG instances.
    """
    up = _by_uuid(readings.get("gpu_up", ()))
    util = _by_uuid(readings.get("gpu_utilization_ratio", ()))
    used = _by_uuid(readings.get("gpu_memory_used_bytes", ()))
    total = _by_uuid(readings.get("gpu_memory_total_bytes", ()))
    temp = _by_uuid(readings.get("gpu_temperature_celsius", ()))
    power = _by_uuid(readings.get("gpu_power_watts", ()))
    allocations: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for labels, _value in readings.get("gpu_allocation_info", ()):
        if "uuid" in labels:
            allocations[labels["uuid"]].append(labels)
    devices: dict[str, dict[str, Any]] = {}
    for labels, _value in readings.get("gpu_info", ()):
        uuid = labels.get("uuid")
        if not uuid or uuid in devices:
            continue
        mig_mode = labels.get("mig_mode", "")
        devices[uuid] = {
            "deviceId": uuid,
            "node": labels.get("node"),
            "index": int(labels["gpu"]) if labels.get("gpu", "").isdigit() else None,
            "modelName": labels.get("model"),
            "pciBusId": labels.get("pci_bus_id"),
            "migMode": mig_mode or None,
            "driverVersion": labels.get("driver_version"),
            "status": device_status(up.get(uuid), mig_mode),
            "utilization": _optional(util, uuid),
            "memoryUsedBytes": _int_or_none(_optional(used, uuid)),
            "memoryTotalBytes": _int_or_none(_optional(total, uuid)),
            "temperatureCelsius": _optional(temp, uuid),
            "powerWatts": _optional(power, uuid),
            "allocatedTo": _pods(allocations.get(uuid, ())),
        }
    return sorted(devices.values(), key=lambda d: (d["node"] or "", d["index"] or 0))


def build_mig_instances(readings: Readings) -> list[dict[str, Any]]:
    """One entry per MIG instance in ``gpu_mig_info``, sorted by GPU and GPU instance.

    ``smActivity`` is null where the GPU has no GPM (pre-Hopper): never estimated.
    """
    used: dict[tuple[str, str, str], float] = {}
    total: dict[tuple[str, str, str], float] = {}
    activity: dict[tuple[str, str, str], float] = {}
    for metric, target in (
        ("gpu_mig_memory_used_bytes", used),
        ("gpu_mig_memory_total_bytes", total),
        ("gpu_mig_sm_activity_ratio", activity),
    ):
        for labels, value in readings.get(metric, ()):
            target[_mig_key(labels)] = value
    allocations: dict[tuple[str, str, str], list[Mapping[str, str]]] = defaultdict(list)
    for labels, _value in readings.get("gpu_allocation_info", ()):
        if labels.get("gpu_instance"):
            allocations[_mig_key(labels)].append(labels)
    instances: dict[tuple[str, str, str], dict[str, Any]] = {}
    for labels, _value in readings.get("gpu_mig_info", ()):
        key = _mig_key(labels)
        if key in instances:
            continue
        instances[key] = {
            "deviceId": labels.get("uuid"),
            "node": labels.get("node"),
            "index": int(labels["gpu"]) if labels.get("gpu", "").isdigit() else None,
            "profile": labels.get("mig_profile"),
            "gpuInstance": int(key[1]) if key[1].isdigit() else None,
            "computeInstance": int(key[2]) if key[2].isdigit() else None,
            "migUuid": labels.get("mig_uuid"),
            "memoryUsedBytes": _int_or_none(_optional(used, key)),
            "memoryTotalBytes": _int_or_none(_optional(total, key)),
            "smActivity": _optional(activity, key),
            "allocatedTo": _pods(allocations.get(key, ())),
        }
    return sorted(
        instances.values(),
        key=lambda i: (i["node"] or "", i["index"] or 0, i["gpuInstance"] or 0),
    )


def build_mig_capacity(readings: Readings) -> list[dict[str, Any]]:
    """Per GPU and MIG profile: capacity (empty GPU), instances that exist, and available."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    fields = {
        "gpu_mig_instance_capacity": "capacity",
        "gpu_mig_instances": "instances",
        "gpu_mig_instances_available": "available",
    }
    for metric, name in fields.items():
        for labels, value in readings.get(metric, ()):
            key = (labels.get("uuid", ""), labels.get("mig_profile", ""))
            row = rows.setdefault(
                key,
                {
                    "deviceId": key[0],
                    "node": labels.get("node"),
                    "index": int(labels["gpu"]) if labels.get("gpu", "").isdigit() else None,
                    "modelName": labels.get("model"),
                    "profile": key[1],
                    "capacity": None,
                    "instances": None,
                    "available": None,
                },
            )
            row[name] = int(value) if math.isfinite(value) else None
    return sorted(
        rows.values(), key=lambda r: (r["node"] or "", r["index"] or 0, r["profile"] or "")
    )


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _counts(devices: Iterable[Mapping[str, Any]], field: str) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for device in devices:
        counts[str(device.get(field))] += 1
    return dict(sorted(counts.items()))


def device_statistics(devices: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts by model, status and node; mean utilization (where known) and memory use."""
    used = [d["memoryUsedBytes"] for d in devices if d.get("memoryUsedBytes") is not None]
    total = [d["memoryTotalBytes"] for d in devices if d.get("memoryTotalBytes") is not None]
    return {
        "totalDevices": len(devices),
        "byModel": _counts(devices, "modelName"),
        "byStatus": _counts(devices, "status"),
        "byNode": _counts(devices, "node"),
        "allocatedDevices": sum(1 for d in devices if d.get("allocatedTo")),
        "averageUtilization": _mean(d.get("utilization") for d in devices),
        "averageMemoryUsedBytes": sum(used) / len(used) if used else None,
        "memoryUsedRatio": sum(used) / sum(total) if used and total and sum(total) else None,
        "averageTemperatureCelsius": _mean(d.get("temperatureCelsius") for d in devices),
        "totalPowerWatts": sum(p for d in devices if (p := d.get("powerWatts")) is not None)
        if any(d.get("powerWatts") is not None for d in devices)
        else None,
    }


def overheating(devices: Iterable[Mapping[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """GPUs whose temperature is above ``threshold``, hottest first."""
    hot = [
        dict(d)
        for d in devices
        if d.get("temperatureCelsius") is not None and d["temperatureCelsius"] > threshold
    ]
    return sorted(hot, key=lambda d: -float(d["temperatureCelsius"]))


def mig_statistics(instances: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MIG instances by profile: allocated vs free and mean SM activity where known."""
    by_profile: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for inst in instances:
        by_profile[str(inst.get("profile"))].append(inst)
    profiles = {
        profile: {
            "instances": len(group),
            "allocated": sum(1 for i in group if i.get("allocatedTo")),
            "free": sum(1 for i in group if not i.get("allocatedTo")),
            "averageSmActivity": _mean(i.get("smActivity") for i in group),
        }
        for profile, group in sorted(by_profile.items())
    }
    allocated = sum(1 for i in instances if i.get("allocatedTo"))
    return {
        "totalInstances": len(instances),
        "allocatedInstances": allocated,
        "freeInstances": len(instances) - allocated,
        "averageSmActivity": _mean(i.get("smActivity") for i in instances),
        "devices": len({i.get("deviceId") for i in instances}),
        "byProfile": profiles,
    }
