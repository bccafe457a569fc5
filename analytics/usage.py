"""Allocations, usage statistics, overheating alerts and the cluster overview: pure functions.

PromQL is built here from validated values only (:func:`analytics.promql.selector` and
:func:`analytics.promql.duration`); the shaping functions turn Prometheus samples (label
mappings and values) into the API's records. Nothing here touches Flask or the network.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from analytics.promql import InvalidParameter, duration, selector

MAX_HOURS = 720
DEFAULT_HOURS = 24
DEFAULT_ALERT_HOURS = 1
DEFAULT_THRESHOLD = 85.0
MAX_THRESHOLD = 200.0
MIG_SLICES = 7
HOURS_PER_MONTH = 24 * 30

DEVICE_KEY = ("node", "uuid")
_SLICES = re.compile(r"^(?:\d+c\.)?(\d+)g\.")
_NUMBER = re.compile(r"^\s*[0-9]+(\.[0-9]+)?\s*$")

Labels = Mapping[str, str]
Sample = tuple[Labels, float]


# -- parameters --------------------------------------------------------------------------------


def parse_threshold(text: str | None, field: str = "threshold") -> float:
    """A temperature threshold in degrees Celsius, 0 to :data:`MAX_THRESHOLD`."""
    if text is None:
        return DEFAULT_THRESHOLD
    reason = f"must be a number of degrees Celsius from 0 to {MAX_THRESHOLD:g}"
    if not _NUMBER.match(text):
        raise InvalidParameter(field, reason)
    value = float(text)
    if not 0.0 <= value <= MAX_THRESHOLD:
        raise InvalidParameter(field, reason)
    return value


# -- PromQL ------------------------------------------------------------------------------------


def allocations_query(filters: Mapping[str, str], series: str = "gpu_allocation_info") -> str:
    """The allocation series, filtered by validated label values.

    `series` is where the source's allocations are (`RuleInputs.allocations`): our exporter's
    `gpu_allocation_info`, or the pricing rules' adapter record for DCGM or renamed labels.
    """
    return selector(series, **filters)


def pods_per_device_query(series: str = "gpu_allocation_info") -> str:
    """Pods per device (whole GPU or MIG instance), over every namespace: a device held by
    more than one pod is shared (time-slicing or MPS)."""
    return (
        "count by (node, uuid, mig_uuid) "
        f"(count by (node, uuid, mig_uuid, namespace, pod) ({series}))"
    )


def over_time(function: str, metric: str, hours: int) -> str:
    """``function(metric[hours])`` for a plain metric name."""
    if function not in ("avg_over_time", "max_over_time", "count_over_time"):
        raise ValueError(f"unexpected function {function!r}")
    return f"{function}({selector(metric)}[{duration(hours * 3600)}])"


def usage_queries(hours: int) -> dict[str, str]:
    """Per-device (and per MIG instance) window statistics, keyed by figure."""
    return {
        "avgUtil": over_time("avg_over_time", "gpu_utilization_ratio", hours),
        "maxUtil": over_time("max_over_time", "gpu_utilization_ratio", hours),
        "avgMigActivity": over_time("avg_over_time", "gpu_mig_sm_activity_ratio", hours),
        "maxMigActivity": over_time("max_over_time", "gpu_mig_sm_activity_ratio", hours),
        # Total memory is constant, so the ratio of the averages is the average ratio.
        "memoryRatio": (
            over_time("avg_over_time", "gpu_memory_used_bytes", hours)
            + " / "
            + over_time("avg_over_time", "gpu_memory_total_bytes", hours)
        ),
        "avgTemp": over_time("avg_over_time", "gpu_temperature_celsius", hours),
        "upFraction": over_time("avg_over_time", "gpu_up", hours),
        "samples": over_time("count_over_time", "gpu_up", hours),
        "info": selector("gpu_info"),
    }


def overheating_query(threshold: float, hours: int) -> str:
    """GPUs whose peak temperature in the window is above ``threshold`` (a parsed float)."""
    if not math.isfinite(threshold):
        raise ValueError("threshold must be finite")
    peak = over_time("max_over_time", "gpu_temperature_celsius", hours)
    return f"{peak} > {threshold!r}"


# -- shaping -----------------------------------------------------------------------------------


def _device(labels: Labels) -> tuple[str, str]:
    return labels.get("node", ""), labels.get("uuid", "")


def resource_type(labels: Labels, pods_on_device: int) -> str:
    """MIG_INSTANCE, SHARED_GPU (several pods on one GPU) or GPU."""
    if labels.get("mig_uuid"):
        return "MIG_INSTANCE"
    return "SHARED_GPU" if pods_on_device > 1 else "GPU"


def pods_per_device(samples: Iterable[Sample]) -> dict[tuple[str, str, str], int]:
    """(node, uuid, mig_uuid) -> pods holding it, from :func:`pods_per_device_query`."""
    return {
        (labels.get("node", ""), labels.get("uuid", ""), labels.get("mig_uuid", "")): int(value)
        for labels, value in samples
    }


def allocation_records(
    samples: Iterable[Sample], pods: Mapping[tuple[str, str, str], int], team_label: str
) -> list[dict[str, Any]]:
    """One record per allocation (namespace/pod/device), sorted by allocationId."""
    out: dict[str, dict[str, Any]] = {}
    for labels, _ in samples:
        mig_uuid = labels.get("mig_uuid", "")
        device = mig_uuid or labels.get("uuid", "")
        key = f"{labels.get('namespace', '')}/{labels.get('pod', '')}/{device}"
        holders = pods.get((labels.get("node", ""), labels.get("uuid", ""), mig_uuid), 1)
        out[key] = {
            "allocationId": key,
            "namespace": labels.get("namespace"),
            "pod": labels.get("pod"),
            "container": labels.get("container"),
            "team": labels.get(team_label) or None,
            "resource": labels.get("resource"),
            "resourceType": resource_type(labels, holders),
            "deviceId": labels.get("uuid"),
            "migUuid": mig_uuid or None,
            "migProfile": labels.get("mig_profile") or None,
            "model": labels.get("model"),
            "node": labels.get("node"),
            "status": "ALLOCATED",
        }
    return [out[key] for key in sorted(out)]


def mig_slices(profile: str) -> int:
    """Compute slices of a MIG profile (``3g.40gb`` -> 3; ``1c.3g.40gb`` -> 3); 1 if unknown."""
    found = _SLICES.match(profile)
    return int(found.group(1)) if found else 1


def _percent(ratio: float | None) -> float | None:
    return None if ratio is None or math.isnan(ratio) else round(ratio * 100.0, 2)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _max(values: Sequence[float]) -> float | None:
    return max(values) if values else None


def device_statistics(
    results: Mapping[str, Iterable[Sample]], hours: int
) -> dict[tuple[str, str], dict[str, Any]]:
    """Per GPU (node, uuid): the window's utilization, memory, temperature and GPU-hours.

    Utilization is ``gpu_utilization_ratio`` on whole GPUs; on MIG GPUs, which have none, the
    average is the instances' ``gpu_mig_sm_activity_ratio`` weighted by compute slices / 7
    (the GPU's activity) and the maximum is the busiest instance's peak. GPU-hours are the
    fraction of ``gpu_up`` samples that read 1 times the window: a GPU that appeared during the
    window counts as if watched all of it (an approximation; counting samples times the scrape
    interval breaks when the interval changes).
    """
    devices: dict[tuple[str, str], dict[str, Any]] = {}
    for labels, _ in results.get("info", ()):
        devices[_device(labels)] = {
            "node": labels.get("node"),
            "uuid": labels.get("uuid"),
            "model": labels.get("model"),
            "ratios": {},
        }

    def put(name: str) -> None:
        for labels, value in results.get(name, ()):
            found = devices.get(_device(labels))
            if found is not None and not math.isnan(value):
                found["ratios"][name] = value

    for name in ("avgUtil", "maxUtil", "memoryRatio", "avgTemp", "upFraction", "samples"):
        put(name)
    weighted: dict[tuple[str, str], float] = defaultdict(float)
    peaks: dict[tuple[str, str], float] = {}
    for labels, value in results.get("avgMigActivity", ()):
        weighted[_device(labels)] += value * mig_slices(labels.get("mig_profile", "")) / MIG_SLICES
    for labels, value in results.get("maxMigActivity", ()):
        key = _device(labels)
        peaks[key] = max(value, peaks.get(key, 0.0))
    for key, value in weighted.items():
        if key in devices and "avgUtil" not in devices[key]["ratios"]:
            devices[key]["ratios"]["avgUtil"] = value
            devices[key]["ratios"]["maxUtil"] = peaks.get(key)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, found in devices.items():
        r = found["ratios"]
        up = r.get("upFraction")
        out[key] = {
            "node": found["node"],
            "deviceId": found["uuid"],
            "modelName": found["model"],
            "avgGpuUtilization": _percent(r.get("avgUtil")),
            "maxGpuUtilization": _percent(r.get("maxUtil")),
            "avgMemoryUtilization": _percent(r.get("memoryRatio")),
            "avgTemperature": None if r.get("avgTemp") is None else round(r["avgTemp"], 2),
            "gpuHours": None if up is None else round(up * hours, 4),
            "samples": int(r["samples"]) if r.get("samples") is not None else 0,
        }
    return out


def group_statistics(devices: Iterable[Mapping[str, Any]], by: str) -> dict[str, dict[str, Any]]:
    """Device statistics grouped by ``modelName`` or ``node``: means of the device figures."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for device in devices:
        groups[str(device[by])].append(device)

    def values(rows: list[Mapping[str, Any]], field: str) -> list[float]:
        return [row[field] for row in rows if row[field] is not None]

    out: dict[str, dict[str, Any]] = {}
    for name in sorted(groups):
        rows = groups[name]
        avg_util = _mean(values(rows, "avgGpuUtilization"))
        avg_mem = _mean(values(rows, "avgMemoryUtilization"))
        avg_temp = _mean(values(rows, "avgTemperature"))
        hours = values(rows, "gpuHours")
        out[name] = {
            "deviceCount": len(rows),
            "avgGpuUtilization": None if avg_util is None else round(avg_util, 2),
            "maxGpuUtilization": _max(values(rows, "maxGpuUtilization")),
            "avgMemoryUtilization": None if avg_mem is None else round(avg_mem, 2),
            "avgTemperature": None if avg_temp is None else round(avg_temp, 2),
            "gpuHours": round(sum(hours), 4) if hours else None,
        }
    return out


def overheating_records(
    peaks: Iterable[Sample], current: Iterable[Sample], threshold: float
) -> list[dict[str, Any]]:
    """One alert per GPU whose peak exceeded ``threshold``, hottest first."""
    now = {_device(labels): value for labels, value in current}
    out = []
    for labels, peak in peaks:
        key = _device(labels)
        out.append(
            {
                "node": labels.get("node"),
                "deviceId": labels.get("uuid"),
                "gpu": labels.get("gpu"),
                "modelName": labels.get("model"),
                "peakTemperature": peak,
                "currentTemperature": now.get(key),
                "threshold": threshold,
                "severity": "CRITICAL" if peak >= threshold + 10 else "WARNING",
            }
        )
    return sorted(out, key=lambda a: (-a["peakTemperature"], a["node"] or "", a["deviceId"] or ""))


def overview(
    info: Iterable[Sample],
    mig: Iterable[Sample],
    up: Iterable[Sample],
    allocations: Iterable[Sample],
    utilization: Iterable[Sample],
    memory_ratio: Iterable[Sample],
    temperature: Iterable[Sample],
) -> dict[str, Any]:
    """The cluster overview from current samples (cost is added by the caller).

    Devices are what pods are given: a whole GPU, or each MIG instance of a MIG GPU (a
    time-sliced GPU counts once). A device is allocated when any pod holds it.
    """
    gpus = {_device(labels): labels for labels, _ in info}
    instances = {
        (labels.get("node", ""), labels.get("uuid", ""), labels.get("mig_uuid", ""))
        for labels, _ in mig
    }
    mig_gpus = {(node, uuid) for node, uuid, _ in instances}
    devices = {(node, uuid, "") for node, uuid in gpus if (node, uuid) not in mig_gpus}
    devices |= instances
    held: set[tuple[str, str, str]] = set()
    allocation_ids: set[tuple[str, str, str]] = set()
    for labels, _ in allocations:
        device = (labels.get("node", ""), labels.get("uuid", ""), labels.get("mig_uuid", ""))
        held.add(device)
        allocation_ids.add(
            (labels.get("namespace", ""), labels.get("pod", ""), device[2] or device[1])
        )
    allocated = len(devices & held)
    by_model: dict[str, int] = defaultdict(int)
    for labels in gpus.values():
        by_model[labels.get("model", "")] += 1
    util = [v for _, v in utilization if not math.isnan(v)]
    mem = [v for _, v in memory_ratio if not math.isnan(v)]
    temp = [v for _, v in temperature if not math.isnan(v)]
    avg_temp = _mean(temp)
    return {
        "totalNodes": len({node for node, _ in gpus}),
        "totalGpuDevices": len(gpus),
        "totalMigInstances": len(instances),
        "totalDevices": len(devices),
        "allocatedDevices": allocated,
        "freeDevices": len(devices) - allocated,
        "activeAllocations": len(allocation_ids),
        "devicesByModel": dict(sorted(by_model.items())),
        "overallGpuUtilization": _percent(_mean(util)),
        "overallMemoryUtilization": _percent(_mean(mem)),
        "overallTemperature": None if avg_temp is None else round(avg_temp, 2),
        "gpusDown": sum(1 for _, value in up if value == 0),
    }


def hourly_cost(allocated: float | None, unallocated: float | None) -> dict[str, float | None]:
    """Current cost per hour and its 30-day projection; None when nothing is recorded."""
    if allocated is None and unallocated is None:
        return {"totalHourlyCost": None, "totalMonthlyCost": None}
    hourly = (allocated or 0.0) + (unallocated or 0.0)
    return {
        "totalHourlyCost": round(hourly, 2),
        "totalMonthlyCost": round(hourly * HOURS_PER_MONTH, 2),
    }
