"""The simulated fleet's history as NVIDIA's dcgm-exporter would publish it.

Users who already run dcgm-exporter point the analytics at its series (`source: dcgm`). To
test that path against the same ground truth, this re-shapes the history our exporter would
publish (`history._NodeHistory`) into dcgm-exporter's names, units and labels:

- `DCGM_FI_DEV_FB_USED` (MiB) per GPU and per MIG instance, `DCGM_FI_DEV_GPU_UTIL` (percent)
  per whole GPU, `DCGM_FI_PROF_GR_ENGINE_ACTIVE` (0-1) per whole GPU and MIG instance;
- device labels `gpu`, `UUID`, `device`, `modelName`, `Hostname`, `pci_bus_id`, MIG instances
  add `GPU_I_PROFILE` and `GPU_I_ID`;
- a device held by a pod carries that pod's `namespace`, `pod` and `container` (one copy of
  the series per pod on a shared GPU, as dcgm-exporter's virtual-GPU mode publishes it), and
  no unlabelled copy while it is held. With `exported=True` those become `exported_*` and the
  scrape adds the exporter pod's own `namespace`/`pod` (Prometheus' honorLabels false).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: dcgm-exporter's series this fixture writes, and their Prometheus types.
DCGM_METRICS: dict[str, str] = {
    "DCGM_FI_DEV_FB_USED": "gauge",
    "DCGM_FI_DEV_FB_FREE": "gauge",
    "DCGM_FI_DEV_GPU_UTIL": "gauge",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "gauge",
    # kube-state-metrics' pod labels, where DCGM users take teams from.
    "kube_pod_labels": "gauge",
}
KUBE_STATE_METRICS = (("job", "kube-state-metrics"), ("instance", "kube-state-metrics:8080"))
#: The namespace and pod of the dcgm-exporter pod itself, added by the scrape.
EXPORTER_POD = (("namespace", "gpu-operator"), ("pod", "nvidia-dcgm-exporter-x7k2p"))

_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_MIB = 1024 * 1024
_POD_KEYS = ("namespace", "pod", "container")


@dataclass
class DcgmSeries:
    """One DCGM series: labels as pairs, values (formatted) and the timestamps they cover."""

    labels: tuple[tuple[str, str], ...]
    values: list[str]
    index: np.ndarray


def _pairs(labels: str) -> dict[str, str]:
    return {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _PAIR.findall(labels)}


def _values(series: object, n: int) -> np.ndarray:
    """A history series' values at every timestamp (NaN where it has no sample)."""
    out = np.full(n, np.nan)
    index = getattr(series, "index", None)
    where = np.arange(n) if index is None else index
    const = getattr(series, "const", None)
    if const is not None:
        out[where] = float(const)
    else:
        out[where] = np.asarray(series.values, dtype=np.float64)  # type: ignore[attr-defined]
    return out


def _device_labels(
    ours: Mapping[str, str], target: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    pairs = [
        ("gpu", ours["gpu"]),
        ("UUID", ours["uuid"]),
        ("device", f"nvidia{ours['gpu']}"),
        ("modelName", ours["model"]),
        ("Hostname", ours["node"]),
        ("pci_bus_id", ours.get("pci_bus_id", "")),
    ]
    if ours.get("mig_uuid"):
        pairs += [("GPU_I_PROFILE", ours["mig_profile"]), ("GPU_I_ID", ours["gpu_instance"])]
    return [*pairs, *target]


def dcgm_series(
    history: object, n: int, target: Sequence[tuple[str, str]], *, exported: bool = False
) -> dict[str, list[DcgmSeries]]:
    """One node's history (`history._NodeHistory`, `n` timestamps) as dcgm-exporter series.

    `target` are the labels the scrape adds (job, instance; no namespace/pod of our own).
    """
    series: Mapping[str, list[object]] = history.series  # type: ignore[attr-defined]
    # Who holds each device (uuid for whole GPUs, mig_uuid for instances), at which samples.
    holders: dict[str, list[tuple[tuple[tuple[str, str], ...], np.ndarray]]] = {}
    # kube_pod_labels of the pods holding devices: namespace, pod and their label_* labels.
    pods: dict[tuple[tuple[str, str], ...], np.ndarray] = {}
    for alloc in series["gpu_allocation_info"]:
        labels = _pairs(alloc.labels)  # type: ignore[attr-defined]
        key = labels.get("mig_uuid") or labels["uuid"]
        held = ~np.isnan(_values(alloc, n))
        who = tuple((k, labels[k]) for k in _POD_KEYS)
        holders.setdefault(key, []).append((who, held))
        pod = (*who[:2], *sorted((k, v) for k, v in labels.items() if k.startswith("label_")))
        pods[pod] = pods[pod] | held if pod in pods else held

    prefix = "exported_" if exported else ""
    scrape = [*target, *(EXPORTER_POD if exported else ())]
    out: dict[str, list[DcgmSeries]] = {name: [] for name in DCGM_METRICS}

    def emit(metric: str, ours: Mapping[str, str], values: np.ndarray, fmt: str) -> None:
        key = ours.get("mig_uuid") or ours["uuid"]
        device = _device_labels(ours, scrape)
        present = ~np.isnan(values)
        unheld = present.copy()
        for _, held in holders.get(key, []):
            unheld &= ~held
        copies: list[tuple[tuple[tuple[str, str], ...], np.ndarray]] = [((), unheld)]
        seen: set[tuple[tuple[str, str], ...]] = set()
        for who, held in holders.get(key, []):
            if who[:2] in seen:
                continue  # one copy per pod; its first container names it
            seen.add(who[:2])
            copies.append((tuple((prefix + k, v) for k, v in who), held & present))
        for pod_labels, mask in copies:
            index = np.flatnonzero(mask)
            if not len(index):
                continue
            text = [fmt.format(v) for v in values[index].tolist()]
            out[metric].append(DcgmSeries((*device, *pod_labels), text, index))

    totals = {
        _pairs(t.labels).get("mig_uuid") or _pairs(t.labels)["uuid"]: _values(t, n)  # type: ignore[attr-defined]
        for t in [*series["gpu_memory_total_bytes"], *series["gpu_mig_memory_total_bytes"]]
    }
    carved = {_pairs(m.labels)["uuid"] for m in series["gpu_mig_info"]}  # type: ignore[attr-defined]

    def memory(ours: Mapping[str, str], used: np.ndarray) -> None:
        emit("DCGM_FI_DEV_FB_USED", ours, np.floor(used / _MIB), "{:.0f}")
        total = totals.get(ours.get("mig_uuid") or ours["uuid"])
        if total is not None:
            emit("DCGM_FI_DEV_FB_FREE", ours, np.floor((total - used) / _MIB), "{:.0f}")

    for used in series["gpu_memory_used_bytes"]:
        ours = _pairs(used.labels)  # type: ignore[attr-defined]
        if ours["uuid"] not in carved:
            memory(ours, _values(used, n))
    for util in series["gpu_utilization_ratio"]:
        ours = _pairs(util.labels)  # type: ignore[attr-defined]
        percent = _values(util, n)  # the history keeps whole percent; it writes them / 100
        emit("DCGM_FI_DEV_GPU_UTIL", ours, percent, "{:.0f}")
        emit("DCGM_FI_PROF_GR_ENGINE_ACTIVE", ours, percent / 100.0, "{!r}")
    for used in series["gpu_mig_memory_used_bytes"]:
        memory(_pairs(used.labels), _values(used, n))  # type: ignore[attr-defined]
    for active in series["gpu_mig_sm_activity_ratio"]:
        ours = _pairs(active.labels)  # type: ignore[attr-defined]
        emit("DCGM_FI_PROF_GR_ENGINE_ACTIVE", ours, _values(active, n), "{!r}")
    for pod, present in pods.items():
        index = np.flatnonzero(present)
        out["kube_pod_labels"].append(
            DcgmSeries((*pod, *KUBE_STATE_METRICS), ["1"] * len(index), index)
        )
    return out
