"""Days of history for a simulated fleet, written as OpenMetrics and backfilled into Prometheus.

Cost reports and forecasts need weeks of data, and a demo cannot scrape for weeks. Every
simulated reading is a pure function of (seed, device, t), so the history the exporter *would*
have published can be computed directly: `write_openmetrics` writes it (same metric names,
units, values and label sets as the live exporter, plus the scrape's target labels), and
`backfill` turns it into TSDB blocks with `promtool tsdb create-blocks-from openmetrics`, and
optionally backfills recording rules over it.

Speed: values are computed for all timestamps of a device at once with numpy, replicating the
fleet's scalar arithmetic operation for operation (so every value equals `Fleet.gpu_state`,
`Fleet.mig_state` and `processes_at` exactly; tests check this), and each series is written as
one string join. History joins up with live data when `end` is at or before the moment the
live exporters start, and the target labels are those the live scrape adds.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import yaml

from exporter.attribution import pod_label_metric_name
from exporter.nvml import bounded_label
from exporter.procfs import COMM_MAX_BYTES, sanitize_command

from .fleet import (
    _BURST_STEP,
    _BUSY_FLOOR,
    _INV64,
    _MIB,
    _MIG_RESERVED_MIB,
    _NOISE_STEP,
    MIG_COMPUTE_SLICES,
    Fleet,
    SimGpu,
    SimMigInstance,
    SimNode,
    _alloc_bytes,
    _mix,
    _Signal,
    load_fleet,
    parse_duration,
)
from .pods import ContainerSpec, DeviceClaim, PodSpec, ProcessSpec, Window, _pid, resource_name

HISTORY_METRICS: tuple[str, ...] = (
    "gpu_info",
    "gpu_up",
    "gpu_utilization_ratio",
    "gpu_memory_used_bytes",
    "gpu_memory_total_bytes",
    "gpu_power_watts",
    "gpu_temperature_celsius",
    "gpu_mig_info",
    "gpu_mig_memory_used_bytes",
    "gpu_mig_memory_total_bytes",
    "gpu_mig_sm_activity_ratio",
    "gpu_allocation_info",
    "gpu_process_sm_utilization_ratio",
    "gpu_process_memory_used_bytes",
)

#: How history can be shaped: as our exporter publishes it, or as dcgm-exporter does.
SHAPES = ("exporter", "dcgm", "dcgm-exported")

#: The exporter's default --collection-interval: GPM activity is the mean over one interval.
DEFAULT_GPM_INTERVAL = 5.0
#: Block durations promtool accepts (tsdb.ExponentialBlockRanges(2h, 10, 3)), up to 162h:
#: longer blocks would exceed what Prometheus itself ever compacts to with default retention.
_BLOCK_RANGES_H = (2, 6, 18, 54, 162)

_C1 = 0x9E3779B97F4A7C15
_C2 = 0xC2B2AE3D27D4EB4F
_M64 = (1 << 64) - 1


class HistoryError(RuntimeError):
    """A backfill step failed; the message names the command and its output."""


# ---------------------------------------------------------------------------------------------
# Vectorised replicas of the fleet's signal functions (operation for operation, so equal floats)


def _mix_np(key: int, a: np.ndarray, b: int) -> np.ndarray:
    """`fleet._mix(key, a, b)` for an int64 array `a` (splitmix64 wraps modulo 2**64 in uint64)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) ^ (a.astype(np.uint64) * np.uint64(_C1)) ^ np.uint64((b * _C2) & _M64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.astype(np.float64) * _INV64


def _activity(sig: _Signal, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`_Signal.activity` at each of the sorted times ts, whether ts is in an idle spell)."""
    w = sig.w
    n = len(ts)
    if w.always_idle:
        return np.zeros(n), np.ones(n, dtype=bool)
    key = sig.key
    # math.cos, not np.cos: numpy's SIMD cosine may differ from libm in the last bit.
    phase_args = (sig._omega * (ts - sig._phase)).tolist()
    u = w.base + w.amplitude * np.fromiter(map(math.cos, phase_args), np.float64, n)
    if w.noise:
        x = ts / _NOISE_STEP
        k = np.floor(x)
        f = x - k
        ki = k.astype(np.int64)
        n0 = _mix_np(key, ki, 11)
        n1 = _mix_np(key, ki + 1, 11)
        u = u + w.noise * (2.0 * (n0 + (n1 - n0) * f) - 1.0)
    if w.burst_probability:
        bucket = np.floor(ts / _BURST_STEP).astype(np.int64)
        u = np.where(_mix_np(key, bucket, 13) < w.burst_probability, u + w.burst_height, u)
    u = np.where(u > 100.0, 100.0, np.where(u < _BUSY_FLOOR, _BUSY_FLOOR, u))
    spell = np.zeros(n, dtype=bool)
    if w.idle_probability > 0.0 and n:
        first = math.floor(float(ts[0]) / w.idle_every)
        last = math.floor(float(ts[-1]) / w.idle_every)
        for window in range(first, last + 1):
            sp = sig.spell(window)
            if sp is None:
                continue
            i0, i1 = np.searchsorted(ts, [sp[0], sp[1]], side="left")
            u[i0:i1] = sp[2]
            spell[i0:i1] = True
    return u, spell


def _gpm_mean(sig: _Signal, ts: np.ndarray, interval: float) -> np.ndarray:
    """`Fleet.mean_activity(t - interval, t)` for each t: what GPM reports at a collection."""
    t1 = ts - interval
    width = ts - t1
    n = np.minimum(32, np.maximum(1, np.ceil(width))).astype(np.int64)
    if len(n) and not (n == n[0]).all():  # fractional times: fall back to the scalar rule
        out = np.empty(len(ts))
        for i, (a, b) in enumerate(zip(t1.tolist(), ts.tolist(), strict=True)):
            pts = [a + (k + 0.5) * ((b - a) / math.ceil(b - a)) for k in range(math.ceil(b - a))]
            out[i] = sum(sig.activity(p) for p in pts) / len(pts)
        return out
    count = int(n[0]) if len(n) else 1
    step = width / count
    total: np.ndarray | int = 0
    for k in range(count):
        total = total + _activity(sig, t1 + (k + 0.5) * step)[0]
    return np.asarray(total, dtype=np.float64) / count


# ---------------------------------------------------------------------------------------------
# Labels and text


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    """`{a="x",b="y"}` without empty values: Prometheus drops empty labels on scrape, so a
    backfilled series must leave them out to be the same series as the live one."""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs if v != "")
    return "{" + inner + "}"


def _device_pairs(node: SimNode, gpu: SimGpu) -> list[tuple[str, str]]:
    return [
        ("node", node.name),
        ("gpu", str(gpu.index)),
        ("uuid", gpu.uuid),
        ("model", gpu.model.name),
        ("pci_bus_id", gpu.pci_bus_id),
    ]


def _mig_pairs(node: SimNode, gpu: SimGpu, inst: SimMigInstance | None) -> list[tuple[str, str]]:
    """Device labels plus the MIG labels (empty, so left out, for a whole GPU)."""
    if inst is None:
        return _device_pairs(node, gpu)
    return [
        *_device_pairs(node, gpu),
        ("gpu_instance", str(inst.gpu_instance_id)),
        ("compute_instance", str(inst.compute_instance_id)),
        ("mig_profile", inst.profile.key),
        ("mig_uuid", inst.uuid),
    ]


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


@dataclass
class _Series:
    """One series of one node: a label string, and its values at some or all timestamps."""

    labels: str
    #: A constant value (text), or per-sample values formatted at write time.
    const: str | None = None
    values: np.ndarray | None = None
    fmt: Callable[[np.ndarray], list[str]] | None = None
    #: Indices into the timestamps where the series has a sample; None: all of them.
    index: np.ndarray | None = None


def _ints(values: np.ndarray) -> list[str]:
    return [str(v) for v in values.tolist()]


def _floats(values: np.ndarray) -> list[str]:
    return [repr(v) for v in values.tolist()]


_PERCENT_TEXT = [repr(p / 100.0) for p in range(101)]


def _percent_ratio(values: np.ndarray) -> list[str]:
    """Integer percent to the exporter's ratio (percent / 100.0), via a table."""
    table = _PERCENT_TEXT
    return [table[v] if 0 <= v <= 100 else repr(v / 100.0) for v in values.tolist()]


def _milli(values: np.ndarray) -> list[str]:
    return [repr(v / 1000.0) for v in values.tolist()]


@dataclass
class _NodeHistory:
    series: dict[str, list[_Series]] = field(
        default_factory=lambda: {m: [] for m in HISTORY_METRICS}
    )


# ---------------------------------------------------------------------------------------------
# One node's history


def _node_history(
    fleet: Fleet,
    node: SimNode,
    ts: np.ndarray,
    pod_labels: Sequence[str],
    target: Sequence[tuple[str, str]],
    gpm_interval: float,
) -> _NodeHistory:
    out = _NodeHistory()
    s = out.series
    n = len(ts)
    gpu_mem: dict[int, np.ndarray] = {}
    gpu_util: dict[int, np.ndarray] = {}
    mig_mem: dict[tuple[int, int | None], np.ndarray] = {}
    for g in node.gpus:
        m = g.model
        dev = _labels([*_device_pairs(node, g), *target])
        mode = "enabled" if g.mig is not None else ("disabled" if m.mig_capable else "unsupported")
        info = [
            *_device_pairs(node, g),
            ("driver_version", node.driver_version),
            ("cuda_driver_version", _cuda_text(node.cuda_driver_version)),
            ("mig_mode", mode),
            *target,
        ]
        s["gpu_info"].append(_Series(_labels(info), const="1"))
        s["gpu_up"].append(_Series(dev, const="1"))
        if g.mig is None:
            sig = fleet._signal(node.name, g.index, None)
            u, spell = _activity(sig, ts)
            w = g.workload
            alloc = _alloc_bytes(g.key, w.memory, m.memory_mib - m.reserved_mib)
            if w.memory <= 0:
                used = np.zeros(n, dtype=np.int64)
            elif w.release_memory_when_idle:
                used = np.where(spell, 0, alloc).astype(np.int64)
            else:
                used = np.full(n, alloc, dtype=np.int64)
            util = np.rint(u).astype(np.int64)  # round() is half-to-even, as rint
            gpu_util[g.index] = util
            s["gpu_utilization_ratio"].append(_Series(dev, values=util, fmt=_percent_ratio))
        else:
            u = np.zeros(n)
            used = np.zeros(n, dtype=np.int64)
            for inst in g.mig:
                gi = inst.gpu_instance_id
                isig = fleet._signal(node.name, g.index, gi)
                iu, ispell = _activity(isig, ts)
                iw = inst.workload
                ialloc = _alloc_bytes(
                    inst.key, iw.memory, inst.profile.memory_size_mb - _MIG_RESERVED_MIB
                )
                if iw.memory <= 0:
                    iused = np.zeros(n, dtype=np.int64)
                elif iw.release_memory_when_idle:
                    iused = np.where(ispell, 0, ialloc).astype(np.int64)
                else:
                    iused = np.full(n, ialloc, dtype=np.int64)
                u = u + iu * inst.profile.slice_count
                used = used + (iused + _MIG_RESERVED_MIB * _MIB)
                mig_mem[(g.index, gi)] = iused
                mig = _labels([*_mig_pairs(node, g, inst), *target])
                total = inst.profile.memory_size_mb * _MIB
                s["gpu_mig_info"].append(_Series(mig, const="1"))
                s["gpu_mig_memory_used_bytes"].append(_Series(mig, values=iused, fmt=_ints))
                s["gpu_mig_memory_total_bytes"].append(_Series(mig, const=str(total)))
                if m.gpm:
                    mean = _gpm_mean(isig, ts, gpm_interval)
                    ratio = mean * iw.sm_ratio / 100.0
                    s["gpu_mig_sm_activity_ratio"].append(_Series(mig, values=ratio, fmt=_floats))
            u = u / MIG_COMPUTE_SLICES
        gpu_mem[g.index] = used
        s["gpu_memory_used_bytes"].append(_Series(dev, values=used, fmt=_ints))
        s["gpu_memory_total_bytes"].append(_Series(dev, const=str(m.memory_mib * _MIB)))
        power_w = np.minimum(
            m.idle_power_w + (m.peak_power_w - m.idle_power_w) * u / 100.0, float(m.power_limit_w)
        )
        power_mw = (power_w * 1000).astype(np.int64)
        s["gpu_power_watts"].append(_Series(dev, values=power_mw, fmt=_milli))
        heat = (power_w - m.idle_power_w) / (m.peak_power_w - m.idle_power_w)
        temp = (
            m.idle_temp_c
            + (m.load_temp_c - m.idle_temp_c) * heat
            + 4.0 * (_mix(g.key, 0, 31) - 0.5)
        )
        s["gpu_temperature_celsius"].append(
            _Series(dev, values=np.rint(temp).astype(np.int64), fmt=_ints)
        )
    _pods_history(fleet, node, ts, pod_labels, target, out, gpu_mem, gpu_util, mig_mem)
    return out


def _command(process: ProcessSpec) -> str:
    """The `command` label the exporter derives from the simulated /proc/<pid>/comm and
    cmdline (`exporter.procfs.process_name`): comm, or argv[0]'s longer base name."""
    comm = process.command.rsplit("/", 1)[-1].encode()[:COMM_MAX_BYTES]
    if len(comm) >= COMM_MAX_BYTES:
        base = re.split(rb"[\s\x00]", process.command.encode(), maxsplit=1)[0].rsplit(b"/", 1)[-1]
        if base.startswith(comm):
            comm = base
    return bounded_label(sanitize_command(comm.decode("utf-8", errors="ignore")))


def _window_mask(window: Window | None, ts: np.ndarray) -> np.ndarray:
    if window is None:
        return np.ones(len(ts), dtype=bool)
    return np.mod(ts - window.offset, window.every) < window.duration


def _started(pod: PodSpec, process: ProcessSpec, ts: np.ndarray) -> np.ndarray:
    """`pods._start_time` for each t."""
    window = process.runs if process.runs is not None else pod.present
    if window is None:
        return np.zeros(len(ts))
    return ts - np.mod(ts - window.offset, window.every)


def _pods_history(
    fleet: Fleet,
    node: SimNode,
    ts: np.ndarray,
    pod_labels: Sequence[str],
    target: Sequence[tuple[str, str]],
    out: _NodeHistory,
    gpu_mem: Mapping[int, np.ndarray],
    gpu_util: Mapping[int, np.ndarray],
    mig_mem: Mapping[tuple[int, int | None], np.ndarray],
) -> None:
    """Allocation and process series, as `allocations_at` and `processes_at` give them."""
    s = out.series
    names = [pod_label_metric_name(label) for label in pod_labels]

    def device(claim: DeviceClaim) -> list[tuple[str, str]]:
        g = node.gpus[claim.gpu]
        inst = g.instance(claim.gpu_instance) if claim.gpu_instance is not None else None
        return _mig_pairs(node, g, inst)

    def who(pod: PodSpec) -> list[tuple[str, str]]:
        return [
            (name, bounded_label(pod.labels.get(label, "")))
            for name, label in zip(names, pod_labels, strict=True)
        ]

    # (pod, container, process number, process, claim, running mask), in processes_at order.
    running: list[tuple[PodSpec, ContainerSpec, int, ProcessSpec, DeviceClaim, np.ndarray]] = []
    for pod in node.pods:
        if pod.phase != "Running":
            continue  # the exporter credits only Running pods, and only they run processes
        present = _window_mask(pod.present, ts)
        if not present.any():
            continue
        for container in pod.containers:
            for claim in container.devices:
                resource = resource_name(fleet, node.name, claim)
                pairs = [
                    *device(claim),
                    ("namespace", pod.namespace),
                    ("pod", pod.name),
                    ("container", container.name),
                    ("resource", resource),
                    *who(pod),
                    *target,
                ]
                index = None if present.all() else np.flatnonzero(present)
                s["gpu_allocation_info"].append(_Series(_labels(pairs), const="1", index=index))
            for number, process in enumerate(container.processes):
                mask = present & _window_mask(process.runs, ts)
                for claim in container.devices:
                    running.append((pod, container, number, process, claim, mask))
    if not running:
        return
    weights: dict[tuple[int, int | None], np.ndarray] = {}
    for _, _, _, process, claim, mask in running:
        key = (claim.gpu, claim.gpu_instance)
        weights[key] = weights.get(key, np.zeros(len(ts))) + np.where(mask, process.weight, 0.0)
    for pod, container, number, process, claim, mask in running:
        active = np.flatnonzero(mask)
        if not len(active):
            continue
        key = (claim.gpu, claim.gpu_instance)
        share = process.weight / weights[key][active]
        if claim.gpu_instance is None:
            used = gpu_mem[claim.gpu][active]
            util: np.ndarray | None = gpu_util[claim.gpu][active]
        else:
            used = mig_mem[key][active]
            util = None
        memory = (used * share).astype(np.int64)  # int(used * share)
        sm = np.floor(util * share).astype(np.int64) if util is not None else None
        started = _started(pod, process, ts[active])
        # A new pid each time the process restarts: one series per run.
        starts, run_of = np.unique(started, return_inverse=True)
        for r, start in enumerate(starts.tolist()):
            pid = _pid(fleet.seed, node.name, pod, container, number, claim, start)
            sel = np.flatnonzero(run_of == r)
            pairs = [
                *device(claim),
                ("pid", str(pid)),
                ("command", _command(process)),
                ("namespace", pod.namespace),
                ("pod", pod.name),
                ("container", container.name),
                *who(pod),
                *target,
            ]
            labels = _labels(pairs)
            s["gpu_process_memory_used_bytes"].append(
                _Series(labels, values=memory[sel], fmt=_ints, index=active[sel])
            )
            if sm is not None:
                s["gpu_process_sm_utilization_ratio"].append(
                    _Series(labels, values=sm[sel], fmt=_percent_ratio, index=active[sel])
                )


# ---------------------------------------------------------------------------------------------
# Writing


def _types() -> dict[str, str]:
    from exporter import catalogue

    return {name: catalogue.CATALOGUE[name].type for name in HISTORY_METRICS}


def _timestamps(start: float, end: float, step: float) -> np.ndarray:
    if step <= 0:
        raise ValueError(f"step must be positive, got {step!r}")
    if end <= start:
        return np.zeros(0)
    count = math.ceil((end - start) / step)
    ts = start + step * np.arange(count, dtype=np.float64)
    return ts[ts < end]


def _ts_text(ts: np.ndarray) -> list[str]:
    """' <seconds>\\n' per timestamp: integers where they are whole, else the shortest float."""
    return [f" {int(t)}\n" if t == int(t) else f" {t!r}\n" for t in ts.tolist()]


def _target_map(
    fleet: Fleet,
    nodes: Sequence[str],
    target_labels: Callable[[str], Mapping[str, str]] | None,
) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for name in nodes:
        if name not in fleet.nodes:
            raise KeyError(f"no node {name!r} in {fleet.source} (has {', '.join(fleet.nodes)})")
        labels = (
            {"job": "gpu-exporter", "instance": name}
            if target_labels is None
            else target_labels(name)
        )
        out[name] = sorted(labels.items())
    return out


def _write_ts(
    fleet: Fleet,
    out: TextIO,
    ts: np.ndarray,
    targets: Mapping[str, Sequence[tuple[str, str]]],
    pod_labels: Sequence[str],
    gpm_interval: float,
    shape: str = "exporter",
) -> int:
    histories = [
        _node_history(fleet, fleet.nodes[name], ts, pod_labels, target, gpm_interval)
        for name, target in targets.items()
    ]
    ts_text = _ts_text(ts)
    if shape != "exporter":
        return _write_dcgm(out, histories, list(targets.values()), ts_text, shape)
    types = _types()
    count = 0
    for metric in HISTORY_METRICS:
        out.write(f"# TYPE {metric} {types[metric]}\n")
        for history in histories:
            for series in history.series[metric]:
                count += _write_series(out, metric, series, ts_text)
    out.write("# EOF\n")
    return count


def _write_dcgm(
    out: TextIO,
    histories: Sequence[_NodeHistory],
    targets: Sequence[Sequence[tuple[str, str]]],
    ts_text: list[str],
    shape: str,
) -> int:
    """The histories as dcgm-exporter publishes them (`shape` dcgm, or dcgm-exported for
    pod labels renamed exported_* by a scrape with honorLabels false)."""
    from .dcgm import DCGM_METRICS, dcgm_series

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    converted = [
        dcgm_series(history, len(ts_text), target, exported=shape == "dcgm-exported")
        for history, target in zip(histories, targets, strict=True)
    ]
    count = 0
    for metric, kind in DCGM_METRICS.items():
        out.write(f"# TYPE {metric} {kind}\n")
        for node in converted:
            for series in node[metric]:
                head = f"{metric}{_labels(series.labels)} "
                stamps = [ts_text[i] for i in series.index.tolist()]
                out.write("".join(head + v + t for v, t in zip(series.values, stamps, strict=True)))
                count += len(stamps)
    out.write("# EOF\n")
    return count


def _write_series(out: TextIO, metric: str, series: _Series, ts_text: list[str]) -> int:
    stamps = ts_text if series.index is None else [ts_text[i] for i in series.index.tolist()]
    if not stamps:
        return 0
    head = f"{metric}{series.labels} "
    if series.const is not None:
        line = head + series.const
        out.write(line + line.join(stamps))  # line ts0 line ts1 ...: one C-level join
    else:
        assert series.values is not None and series.fmt is not None
        out.write(
            "".join([head + v + t for v, t in zip(series.fmt(series.values), stamps, strict=True)])
        )
    return len(stamps)


def write_openmetrics(
    fleet: Fleet,
    out: TextIO,
    *,
    start: float,
    end: float,
    step: float,
    nodes: Sequence[str] | None = None,
    pod_labels: Sequence[str] = ("team", "app"),
    target_labels: Callable[[str], Mapping[str, str]] | None = None,
    gpm_interval: float = DEFAULT_GPM_INTERVAL,
) -> int:
    """Write the fleet's history at start, start+step, ... < end as OpenMetrics; return the
    number of samples.

    Values are what the live exporter (fault-free, `--pod-labels` = pod_labels) publishes at
    those instants; `target_labels(node)` gives the labels the scrape adds (default job
    "gpu-exporter", instance = node). GPM activity is the mean over the `gpm_interval` before
    each instant (the exporter's collection interval).
    """
    targets = _target_map(fleet, list(fleet.nodes) if nodes is None else nodes, target_labels)
    return _write_ts(
        fleet,
        out,
        _timestamps(start, end, step),
        targets,
        pod_labels,
        gpm_interval,
    )


# ---------------------------------------------------------------------------------------------
# Backfill


def _run(command: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HistoryError(
            f"{what} failed (exit {result.returncode}): {' '.join(command)}\n"
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result


def block_hours(span: float, workers: int) -> int:
    """The block duration (hours) for a backfill of `span` seconds: the longest promtool
    accepts that still gives every worker a chunk (fewer, longer blocks mean fewer passes
    over the data and less compaction later)."""
    chosen = _BLOCK_RANGES_H[0]
    for hours in _BLOCK_RANGES_H:
        if math.ceil(span / (hours * 3600)) >= max(1, workers):
            chosen = hours
    return chosen


def backfill(
    fleet: Fleet,
    data_dir: Path,
    *,
    start: float,
    end: float,
    step: float,
    nodes: Sequence[str] | None = None,
    pod_labels: Sequence[str] = ("team", "app"),
    target_labels: Callable[[str], Mapping[str, str]] | None = None,
    promtool: str = "promtool",
    rule_files: Sequence[Path] = (),
    rules_interval: str = "1m",
    prometheus: str = "prometheus",
    workers: int | None = None,
    gpm_interval: float = DEFAULT_GPM_INTERVAL,
    shape: str = "exporter",
) -> None:
    """Backfill the fleet's history for [start, end) into `data_dir` (a Prometheus TSDB path).

    The range is cut into block-aligned chunks, each written to its own OpenMetrics file and
    turned into one block by its own `promtool tsdb create-blocks-from openmetrics`, several
    at once (`workers`, default the CPU count, at most 8): promtool re-reads a whole file once
    per block, so one file per block keeps it linear. With `rule_files`, the recorded series
    are then backfilled over the same range by `promtool tsdb create-blocks-from rules`
    against a temporary Prometheus on `data_dir`, one dependency level at a time (promtool
    cannot see rules it is still backfilling). `shape` "dcgm" writes the series as
    dcgm-exporter would publish them ("dcgm-exported": its pod labels renamed exported_*), for
    the analytics' DCGM source. Run Prometheus on `data_dir` afterwards with
    `--storage.tsdb.retention.time` longer than the history, or it deletes the oldest blocks.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ts = _timestamps(start, end, step)
    if not len(ts):
        return
    targets = _target_map(fleet, list(fleet.nodes) if nodes is None else nodes, target_labels)
    workers = workers or min(8, os.cpu_count() or 1)
    hours = block_hours(float(ts[-1] - ts[0]) + step, workers)
    block_ms = hours * 3_600_000
    ms = np.floor(ts * 1000.0).astype(np.int64)
    chunk_of = ms // block_ms
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    chunks = np.split(np.arange(len(ts)), bounds)
    with tempfile.TemporaryDirectory(prefix="gpu-history-") as tmp:
        running: list[tuple[subprocess.Popen[str], list[str], Path]] = []

        def reap(limit: int) -> None:
            while len(running) > limit:
                process, command, path = running.pop(0)
                _, stderr = process.communicate()
                path.unlink(missing_ok=True)
                if process.returncode != 0:
                    raise HistoryError(
                        f"promtool backfill failed (exit {process.returncode}): "
                        f"{' '.join(command)}\n{stderr.strip()}"
                    )

        try:
            for number, chunk in enumerate(chunks):
                path = Path(tmp) / f"chunk-{number:04d}.om"
                with path.open("w", encoding="utf-8", buffering=1 << 20) as out:
                    _write_ts(
                        fleet,
                        out,
                        ts[chunk],
                        targets,
                        pod_labels,
                        gpm_interval,
                        shape,
                    )
                command = [
                    promtool,
                    "tsdb",
                    "create-blocks-from",
                    "openmetrics",
                    "--quiet",
                    f"--max-block-duration={hours}h",
                    str(path),
                    str(data_dir),
                ]
                reap(workers - 1)
                try:
                    process = subprocess.Popen(
                        command,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                except OSError as error:
                    raise HistoryError(f"cannot run {' '.join(command)}: {error}") from error
                running.append((process, command, path))
            reap(0)
        finally:
            for process, _, _ in running:
                process.kill()
                process.wait()
    if rule_files:
        backfill_rules(
            data_dir,
            [Path(p) for p in rule_files],
            start=float(ts[0]),
            end=float(ts[-1]) + step,
            promtool=promtool,
            prometheus=prometheus,
            rules_interval=rules_interval,
        )


_RECORD_NAME = r"(?<![A-Za-z0-9_:]){}(?![A-Za-z0-9_:])"


def rule_levels(rule_files: Sequence[Path]) -> list[list[tuple[str, float | None, dict[str, str]]]]:
    """Recording rules by dependency level: level k uses only raw series and levels < k.

    Returns, per level, (group name, group interval in seconds or None, rule) entries.
    """
    rules: list[tuple[str, float | None, dict[str, str]]] = []
    for path in rule_files:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        for group in doc.get("groups", []):
            interval = group.get("interval")
            seconds = parse_duration(interval) if interval is not None else None
            for rule in group.get("rules", []):
                if "record" in rule:
                    rules.append((group["name"], seconds, rule))
    names = {rule["record"] for _, _, rule in rules}
    patterns = {name: re.compile(_RECORD_NAME.format(re.escape(name))) for name in names}
    deps = {
        rule["record"]: {
            n for n, p in patterns.items() if n != rule["record"] and p.search(rule["expr"])
        }
        for _, _, rule in rules
    }
    level: dict[str, int] = {}

    def depth(name: str, seen: frozenset[str]) -> int:
        if name in seen:
            raise HistoryError(f"recording rules depend on each other in a cycle via {name}")
        if name not in level:
            level[name] = 1 + max((depth(d, seen | {name}) for d in deps[name]), default=-1)
        return level[name]

    for name in names:
        depth(name, frozenset())
    out: list[list[tuple[str, float | None, dict[str, str]]]] = [
        [] for _ in range(max(level.values(), default=-1) + 1)
    ]
    for entry in rules:
        out[level[entry[2]["record"]]].append(entry)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _TempPrometheus:
    """A Prometheus serving `data_dir` read-only in effect (no scrapes), for promtool to query."""

    def __init__(self, binary: str, data_dir: Path, workdir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> _TempPrometheus:
        config = self.workdir / "prometheus.yml"
        config.write_text("global: {}\n")
        log = self.workdir / "prometheus.log"
        for _ in range(3):
            port = _free_port()
            with log.open("wb") as sink:
                self.process = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.data_dir}",
                        # Retention counts back from the newest block: keep all history.
                        "--storage.tsdb.retention.time=3650d",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            self.url = f"http://127.0.0.1:{port}"
            if self._ready():
                return self
            self._stop()
        raise HistoryError(
            f"temporary Prometheus ({self.binary}) on {self.data_dir} did not start:\n"
            + log.read_text(errors="replace")[-2000:]
        )

    def _ready(self) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self._stop()


def backfill_rules(
    data_dir: Path,
    rule_files: Sequence[Path],
    *,
    start: float,
    end: float,
    promtool: str = "promtool",
    prometheus: str = "prometheus",
    rules_interval: str = "1m",
) -> None:
    """Backfill recording rules over [start, end) of the data in `data_dir`, level by level.

    Each level's blocks are moved into `data_dir` before the next level is evaluated, so
    rules built on other rules see them. The blocks overlap the raw ones in time; Prometheus
    2.39+ merges overlapping blocks (vertical compaction is always on).
    """
    levels = rule_levels(rule_files)
    with tempfile.TemporaryDirectory(prefix="gpu-history-rules-") as tmp:
        work = Path(tmp)
        for number, level in enumerate(levels):
            groups: dict[str, dict[str, object]] = {}
            for name, interval, rule in level:
                group = groups.setdefault(name, {"name": name, "rules": []})
                if interval is not None:
                    group["interval"] = f"{interval:g}s"
                rules = group["rules"]
                assert isinstance(rules, list)
                rules.append({"record": rule["record"], "expr": rule["expr"]})
            # One path for every level: promtool (like Prometheus) offsets a group's evaluations
            # by a hash of its name and file, so with the same name and path each level is
            # evaluated at the very instants the level below it was recorded at, without lag.
            rule_file = work / "rules.yml"
            rule_file.write_text(yaml.safe_dump({"groups": list(groups.values())}))
            output = work / f"blocks-{number}"
            output.mkdir()
            with _TempPrometheus(prometheus, data_dir, work) as server:
                _run(
                    [
                        promtool,
                        "tsdb",
                        "create-blocks-from",
                        "rules",
                        "--quiet",
                        f"--start={math.floor(start)}",
                        # promtool's range queries include the end: stop short of it.
                        f"--end={math.ceil(end) - 1}",
                        f"--url={server.url}",
                        f"--output-dir={output}",
                        f"--eval-interval={rules_interval}",
                        str(rule_file),
                    ],
                    "promtool rules backfill",
                )
            for block in output.iterdir():
                if block.is_dir() and (block / "meta.json").exists():
                    shutil.move(str(block), str(data_dir / block.name))


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_time(value: str) -> float:
    return float(value)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m exporter.simulator.history --fleet F --days 7 --step 5m --data-dir DIR`."""
    parser = argparse.ArgumentParser(
        prog="python -m exporter.simulator.history",
        description="Backfill days of a simulated fleet's metrics into a Prometheus data dir.",
    )
    parser.add_argument("--fleet", required=True, type=Path, help="fleet YAML file")
    parser.add_argument("--days", type=float, default=7.0, help="days of history (default 7)")
    parser.add_argument("--step", default="5m", help="sample spacing (default 5m; at most 5m)")
    parser.add_argument("--data-dir", required=True, type=Path, help="Prometheus TSDB path")
    parser.add_argument(
        "--end",
        type=_parse_time,
        default=None,
        help="unix time the history ends before (default: now, rounded down to the step)",
    )
    parser.add_argument("--node", action="append", dest="nodes", help="only this node (repeat)")
    parser.add_argument(
        "--pod-labels",
        default="team,app",
        help="pod labels published as label_<name>, as the exporters' --pod-labels",
    )
    parser.add_argument(
        "--instance",
        default="{node}",
        help="the instance label, as the live scrape sets it; {node} is replaced "
        "(default {node}; e.g. gpu-exporter-{node}:9400)",
    )
    parser.add_argument(
        "--job", default="gpu-exporter", help="the job label (default gpu-exporter)"
    )
    parser.add_argument("--rules", action="append", type=Path, default=[], help="rule file")
    parser.add_argument("--rules-interval", default="1m")
    parser.add_argument("--promtool", default="promtool")
    parser.add_argument("--prometheus", default="prometheus")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    step = parse_duration(args.step)
    end = args.end if args.end is not None else math.floor(time.time() / step) * step
    start = end - args.days * 86400.0
    fleet = load_fleet(args.fleet)
    labels = tuple(p.strip() for p in args.pod_labels.split(",") if p.strip())

    def target(node: str) -> dict[str, str]:
        return {"job": args.job, "instance": args.instance.replace("{node}", node)}

    began = time.monotonic()
    try:
        backfill(
            fleet,
            args.data_dir,
            start=start,
            end=end,
            step=step,
            nodes=args.nodes,
            pod_labels=labels,
            target_labels=target,
            promtool=args.promtool,
            prometheus=args.prometheus,
            rule_files=args.rules,
            rules_interval=args.rules_interval,
            workers=args.workers,
        )
    except (HistoryError, KeyError, OSError) as error:
        print(f"history: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(
        f"history: {args.days:g} days of {args.fleet} ({start:.0f}..{end:.0f}, step {step:g}s) "
        f"in {args.data_dir} after {time.monotonic() - began:.1f}s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
