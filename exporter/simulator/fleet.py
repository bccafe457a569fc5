"""The fleet file (YAML) and the ground truth it defines.

A fleet describes nodes, their GPUs, MIG layouts, workloads and scheduled faults. Every
simulated reading is a pure function of (seed, fleet, device, t): the driver answers NVML
calls from it, tests compute expected metrics from it, and the backfill tool writes days of
history from it. Nothing here keeps state that changes an answer; the caches only remember
answers already computed.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .models import MIG_COMPUTE_SLICES, MODELS, GpuModel, MigProfile, Placement, place
from .pods import KubeletSpec, PodSpec, parse_kubelet, parse_pods

DEFAULT_DRIVER_VERSION = "570.124.06"
DEFAULT_CUDA_DRIVER_VERSION = 12080

IDLE_THRESHOLD = 5.0  # percent; activity inside an idle spell is below it, outside at/above 8
_BUSY_FLOOR = 8.0
_SPELL_MARGIN = 60.0  # seconds kept free at both ends of a window so spells never touch
_NOISE_STEP = 60.0  # seconds between noise knots (linear in between)
_BURST_STEP = 300.0  # a burst lasts one such bucket
_DAY = 86400.0
_ENERGY_BUCKET = 300.0  # seconds per integration bucket for energy and NVLink counters
_ENERGY_REF_DAYS = (19000, 19001, 19002)  # fixed days whose mean sets the daily energy
# Energy and NVLink counters count from the driver's load, as on a real node, not from 1970:
# every simulated node loaded its driver on 2026-01-01 UTC (day 20454 of the Unix epoch).
_DRIVER_LOADED_DAY = 20454

# GPM metric ids (NVML_GPM_METRIC_*) the simulator computes.
GPM_GRAPHICS_UTIL = 1
GPM_SM_UTIL = 2
GPM_SM_OCCUPANCY = 3
GPM_DRAM_BW_UTIL = 10

# Clock event reason bits (nvmlClocksEventReason*).
REASON_GPU_IDLE = 0x1
REASON_SW_POWER_CAP = 0x4
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40

# ---------------------------------------------------------------------------------------------
# Errors and small parsers


class FleetError(ValueError):
    """A fleet file that cannot be used; the message names the file, the key and the fix."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "90s", "30m", "6h", "1d"."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, int | float):
        if value < 0 or math.isnan(value) or math.isinf(value):
            raise ValueError("a non-negative finite number of seconds")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)]
    raise ValueError('seconds or a duration like "90s", "30m", "6h"')


def _hash64(*parts: object) -> int:
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _uuid(*parts: object) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


_M64 = (1 << 64) - 1
_INV64 = 1.0 / 18446744073709551616.0


def _mix(key: int, a: int, b: int) -> float:
    """A uniform number in [0, 1) from three integers (splitmix64 finaliser); pure and fast."""
    z = (key ^ (a * 0x9E3779B97F4A7C15) ^ (b * 0xC2B2AE3D27D4EB4F)) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) * _INV64


# ---------------------------------------------------------------------------------------------
# Workloads

PATTERNS: dict[str, dict[str, Any]] = {
    # base/amplitude/noise/burst_height in percent; idle_* in seconds; memory a fraction.
    "training": dict(
        base=86.0,
        amplitude=4.0,
        noise=4.0,
        peak_hour=15.0,
        idle_every=6 * 3600.0,
        idle_probability=0.6,
        idle_length=(20 * 60.0, 60 * 60.0),
        burst_probability=0.03,
        burst_height=12.0,
        memory=0.85,
        release_memory_when_idle=False,
        sm_ratio=0.92,
        occupancy_ratio=0.55,
        dram_ratio=0.62,
        media_ratio=0.0,
        nvlink_ratio=0.30,
        pcie_ratio=0.6,
    ),
    "inference": dict(
        base=38.0,
        amplitude=24.0,
        noise=8.0,
        peak_hour=15.0,
        idle_every=3 * 3600.0,
        idle_probability=0.5,
        idle_length=(10 * 60.0, 45 * 60.0),
        burst_probability=0.08,
        burst_height=30.0,
        memory=0.5,
        release_memory_when_idle=False,
        sm_ratio=0.8,
        occupancy_ratio=0.35,
        dram_ratio=0.45,
        media_ratio=0.35,
        nvlink_ratio=0.05,
        pcie_ratio=1.0,
    ),
    "batch": dict(
        base=72.0,
        amplitude=10.0,
        noise=6.0,
        peak_hour=15.0,
        idle_every=2 * 3600.0,
        idle_probability=0.8,
        idle_length=(15 * 60.0, 75 * 60.0),
        burst_probability=0.03,
        burst_height=15.0,
        memory=0.7,
        release_memory_when_idle=True,
        sm_ratio=0.88,
        occupancy_ratio=0.5,
        dram_ratio=0.55,
        media_ratio=0.0,
        nvlink_ratio=0.10,
        pcie_ratio=0.8,
    ),
    "idle": dict(
        base=0.0,
        amplitude=0.0,
        noise=0.0,
        peak_hour=15.0,
        idle_every=6 * 3600.0,
        idle_probability=0.0,
        idle_length=(20 * 60.0, 60 * 60.0),
        burst_probability=0.0,
        burst_height=0.0,
        memory=0.0,
        release_memory_when_idle=False,
        sm_ratio=0.9,
        occupancy_ratio=0.5,
        dram_ratio=0.5,
        media_ratio=0.0,
        nvlink_ratio=0.0,
        pcie_ratio=0.1,
    ),
}

_WORKLOAD_KEYS = (
    "pattern",
    "base",
    "amplitude",
    "noise",
    "peak_hour",
    "idle_every",
    "idle_probability",
    "idle_length",
    "burst_probability",
    "burst_height",
    "memory",
    "release_memory_when_idle",
)


@dataclass(frozen=True)
class Workload:
    """How busy one device (a whole GPU or one MIG instance) is over time."""

    pattern: str
    base: float
    amplitude: float
    noise: float
    peak_hour: float
    idle_every: float
    idle_probability: float
    idle_min: float
    idle_max: float
    burst_probability: float
    burst_height: float
    memory: float
    release_memory_when_idle: bool
    sm_ratio: float
    occupancy_ratio: float
    dram_ratio: float
    media_ratio: float
    nvlink_ratio: float
    pcie_ratio: float

    @property
    def always_idle(self) -> bool:
        return self.pattern == "idle"


# ---------------------------------------------------------------------------------------------
# The fleet model


@dataclass(frozen=True)
class SimMigInstance:
    """One MIG device: a GPU instance with its one compute instance spanning it."""

    placement: Placement
    workload: Workload
    uuid: str  # "MIG-..."
    key: int

    @property
    def profile(self) -> MigProfile:
        return self.placement.profile

    @property
    def gpu_instance_id(self) -> int:
        return self.placement.gpu_instance_id

    @property
    def compute_instance_id(self) -> int:
        return self.placement.compute_instance_id


@dataclass(frozen=True)
class SimGpu:
    """One physical GPU on a node, with its MIG instances when MIG is enabled."""

    index: int
    model: GpuModel
    uuid: str  # "GPU-..."
    serial: str
    pci_bus: int
    workload: Workload  # used when MIG is off
    mig: tuple[SimMigInstance, ...] | None  # None: MIG disabled; (): enabled, no instances
    key: int
    replicas: int = 0  # time-slicing: the device plugin advertises this many shares (0: off)

    @property
    def mig_enabled(self) -> bool:
        return self.mig is not None

    @property
    def pci_bus_id(self) -> str:
        """The bus id as NVML writes it in nvmlPciInfo_t.busId."""
        return f"00000000:{self.pci_bus:02X}:00.0"

    def instance(self, gpu_instance_id: int) -> SimMigInstance | None:
        for m in self.mig or ():
            if m.gpu_instance_id == gpu_instance_id:
                return m
        return None


FAULT_KINDS = (
    "lost",
    "error",
    "hang",
    "xid",
    "overheat",
    "driver_not_loaded",
    "version_mismatch",
    "uninitialized",
)
#: Faults of the whole library rather than of one GPU (no `gpu` key):
#: - driver_not_loaded: the kernel module is gone; nvmlInit answers DRIVER_NOT_LOADED and
#:   every other call UNINITIALIZED until `until`;
#: - version_mismatch: the kernel module was upgraded under the process; nvmlInit answers
#:   LIB_RM_VERSION_MISMATCH and every other call UNINITIALIZED until `until`;
#: - uninitialized: at `at` the library drops its initialisation once (as when another user
#:   in the process calls nvmlShutdown once too often): calls answer UNINITIALIZED until
#:   nvmlInit is called again, which succeeds at once.
NODE_FAULT_KINDS = ("driver_not_loaded", "version_mismatch", "uninitialized")


@dataclass(frozen=True)
class Fault:
    """A scheduled fault; `at`/`until` are seconds after the driver's fault origin."""

    kind: str
    at: float
    until: float | None = None  # None: never ends (xid, uninitialized: once, at `at`)
    gpu: int | None = None  # None only for node-level faults (NODE_FAULT_KINDS)
    function: str | None = None  # error, hang
    error: int | None = None  # error: the NVML_ERROR_* code
    xid: int | None = None
    temperature: int | None = None  # overheat

    def active(self, rel: float) -> bool:
        return rel >= self.at and (self.until is None or rel < self.until)


@dataclass(frozen=True)
class SimNode:
    """One GPU node: what one exporter sees through its driver."""

    name: str
    driver_version: str
    cuda_driver_version: int
    gpus: tuple[SimGpu, ...]
    faults: tuple[Fault, ...] = ()
    pods: tuple[PodSpec, ...] = ()
    kubelet: KubeletSpec = field(default_factory=KubeletSpec)


@dataclass(frozen=True)
class GpuState:
    """What the driver answers for a whole GPU at one time, in NVML's own units.

    `memory_used` follows nvmlMemory_v2_t (reserved memory excluded); the older
    nvmlDeviceGetMemoryInfo (v1) reports `memory_used_v1`, which includes it.
    """

    index: int
    uuid: str
    name: str
    mig_enabled: bool
    activity: float  # percent, unrounded
    utilization_gpu: int  # percent
    utilization_memory: int  # percent
    memory_total: int  # bytes
    memory_reserved: int  # bytes
    memory_used: int  # bytes
    memory_free: int  # bytes
    power_mw: int
    power_limit_mw: int
    energy_mj: int
    temperature_c: int
    sm_clock_mhz: int
    graphics_clock_mhz: int
    mem_clock_mhz: int
    video_clock_mhz: int
    pstate: int
    clocks_event_reasons: int
    pcie_tx_kbps: int
    pcie_rx_kbps: int
    encoder_util: int
    decoder_util: int
    nvlink_tx_kib: int  # total over links, monotonic
    nvlink_rx_kib: int
    lost: bool = False

    @property
    def memory_used_v1(self) -> int:
        return self.memory_used + self.memory_reserved


@dataclass(frozen=True)
class MigState:
    """What the driver answers for one MIG device at one time, in NVML's own units."""

    gpu_index: int
    gpu_instance_id: int
    compute_instance_id: int
    profile: str  # "1g.10gb"
    profile_id: int  # the driver's profile id (info.id)
    uuid: str
    name: str
    activity: float  # percent
    memory_total: int  # bytes
    memory_reserved: int
    memory_used: int
    memory_free: int
    sm_util: float  # percent, instantaneous (GPM averages these over its sample interval)
    sm_occupancy: float
    dram_bw_util: float
    lost: bool = False

    @property
    def memory_used_v1(self) -> int:
        return self.memory_used + self.memory_reserved


_MIB = 1024 * 1024
_MIG_RESERVED_MIB = 13  # what an empty MIG instance shows as used


class _Signal:
    """The activity of one device (a whole GPU or a MIG instance) as a function of time."""

    __slots__ = ("_omega", "_phase", "key", "w")

    def __init__(self, key: int, w: Workload) -> None:
        self.key = key
        self.w = w
        self._omega = 2.0 * math.pi / _DAY
        self._phase = w.peak_hour * 3600.0

    def spell(self, window: int) -> tuple[float, float, float] | None:
        """The idle spell of one window: (start, end, level), or None."""
        w = self.w
        key = self.key
        if _mix(key, window, 1) >= w.idle_probability:
            return None
        length = w.idle_min + (w.idle_max - w.idle_min) * _mix(key, window, 2)
        slack = w.idle_every - length - 2 * _SPELL_MARGIN
        start = window * w.idle_every + _SPELL_MARGIN + slack * _mix(key, window, 3)
        level = 0.0 if w.release_memory_when_idle else 3.0 * _mix(key, window, 4)
        return (start, start + length, level)

    def in_spell(self, t: float) -> tuple[float, float, float] | None:
        w = self.w
        if w.always_idle:
            return (-math.inf, math.inf, 0.0)
        if w.idle_probability <= 0.0:
            return None
        sp = self.spell(math.floor(t / w.idle_every))
        if sp is not None and sp[0] <= t < sp[1]:
            return sp
        return None

    def activity(self, t: float) -> float:
        w = self.w
        if w.always_idle:
            return 0.0
        key = self.key
        if w.idle_probability > 0.0:
            window = math.floor(t / w.idle_every)
            if _mix(key, window, 1) < w.idle_probability:
                sp = self.spell(window)
                if sp is not None and sp[0] <= t < sp[1]:
                    return sp[2]
        u = w.base + w.amplitude * math.cos(self._omega * (t - self._phase))
        if w.noise:
            x = t / _NOISE_STEP
            k = math.floor(x)
            f = x - k
            n0 = _mix(key, k, 11)
            n1 = _mix(key, k + 1, 11)
            u += w.noise * (2.0 * (n0 + (n1 - n0) * f) - 1.0)
        if w.burst_probability and _mix(key, math.floor(t / _BURST_STEP), 13) < w.burst_probability:
            u += w.burst_height
        return 100.0 if u > 100.0 else (_BUSY_FLOOR if u < _BUSY_FLOOR else u)

    def spells(self, start: float, end: float) -> list[tuple[float, float]]:
        w = self.w
        if end <= start:
            return []
        if w.always_idle:
            return [(start, end)]
        if w.idle_probability <= 0.0:
            return []
        out = []
        for window in range(math.floor(start / w.idle_every), math.floor(end / w.idle_every) + 1):
            sp = self.spell(window)
            if sp is None:
                continue
            a, b = max(sp[0], start), min(sp[1], end)
            if a < b:
                out.append((a, b))
        return out


def _intersect(
    a: list[tuple[float, float]], b: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _sample_points(t1: float, t2: float) -> list[float]:
    """Where a time-average over [t1, t2] samples the activity (midpoint rule).

    n = min(32, max(1, ceil(t2 - t1))) equal sub-intervals, one sample at each midpoint;
    for t2 <= t1 the single point t1.
    """
    if t2 <= t1:
        return [t1]
    n = min(32, max(1, math.ceil(t2 - t1)))
    step = (t2 - t1) / n
    return [t1 + (k + 0.5) * step for k in range(n)]


@dataclass
class Fleet:
    """A loaded fleet file: nodes with their GPUs, plus the ground-truth signal functions."""

    seed: int
    nodes: dict[str, SimNode]
    source: str = "<fleet>"
    _signals: dict[tuple[str, int, int | None], _Signal] = field(
        default_factory=dict, repr=False, compare=False
    )
    _days: dict[tuple[str, int, int], tuple[list[float], list[float]]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _daily_ref: dict[tuple[str, int], tuple[float, float]] = field(
        default_factory=dict, repr=False, compare=False
    )

    # -- lookup --------------------------------------------------------------------------------

    def gpu(self, node: str, gpu_index: int) -> SimGpu:
        try:
            n = self.nodes[node]
        except KeyError:
            raise KeyError(f"no node {node!r} in {self.source}") from None
        if not 0 <= gpu_index < len(n.gpus):
            raise KeyError(f"node {node!r} has no GPU {gpu_index}")
        return n.gpus[gpu_index]

    def _signal(self, node: str, gpu_index: int, gpu_instance: int | None) -> _Signal:
        k = (node, gpu_index, gpu_instance)
        sig = self._signals.get(k)
        if sig is None:
            g = self.gpu(node, gpu_index)
            if gpu_instance is None:
                if g.mig_enabled:
                    raise KeyError("a MIG-enabled GPU has no signal of its own")
                sig = _Signal(g.key, g.workload)
            else:
                inst = g.instance(gpu_instance)
                if inst is None:
                    raise KeyError(
                        f"node {node!r} GPU {gpu_index} has no GPU instance {gpu_instance}"
                    )
                sig = _Signal(inst.key, inst.workload)
            self._signals[k] = sig
        return sig

    # -- ground truth --------------------------------------------------------------------------

    def activity(self, node: str, gpu_index: int, gpu_instance: int | None, t: float) -> float:
        """How busy a device is at t, in percent (0-100).

        For a MIG-enabled GPU with gpu_instance None: the compute-slice weighted mean of its
        instances (sum of activity x slices / 7).
        """
        g = self.gpu(node, gpu_index)
        if gpu_instance is None and g.mig is not None:
            total = 0.0
            for inst in g.mig:
                total += (
                    self._signal(node, gpu_index, inst.gpu_instance_id).activity(t)
                    * inst.profile.slice_count
                )
            return total / MIG_COMPUTE_SLICES
        return self._signal(node, gpu_index, gpu_instance).activity(t)

    def idle_spells(
        self, node: str, gpu_index: int, gpu_instance: int | None, start: float, end: float
    ) -> list[tuple[float, float]]:
        """The spells in [start, end) where the device's activity is below 5 %, in order.

        Outside the spells activity is at least 8 %. For a MIG-enabled GPU with gpu_instance
        None, the spells where all its instances are idle at once (none for a GPU without
        instances would be wrong: such a GPU is idle throughout).
        """
        g = self.gpu(node, gpu_index)
        if gpu_instance is None and g.mig is not None:
            acc: list[tuple[float, float]] = [(start, end)] if end > start else []
            for inst in g.mig:
                acc = _intersect(
                    acc, self._signal(node, gpu_index, inst.gpu_instance_id).spells(start, end)
                )
            return acc
        return self._signal(node, gpu_index, gpu_instance).spells(start, end)

    def mean_activity(
        self, node: str, gpu_index: int, gpu_instance: int | None, t1: float, t2: float
    ) -> float:
        """The time-average of activity over [t1, t2], as GPM reports it (see _sample_points)."""
        pts = _sample_points(t1, t2)
        return sum(self.activity(node, gpu_index, gpu_instance, t) for t in pts) / len(pts)

    def gpm_metrics(
        self, node: str, gpu_index: int, gpu_instance: int | None, t1: float, t2: float
    ) -> dict[int, float]:
        """The values nvmlGpmMetricsGet returns for two samples taken at t1 and t2.

        GRAPHICS_UTIL is the mean activity a; SM_UTIL, SM_OCCUPANCY and DRAM_BW_UTIL are a
        times the workload's sm_ratio, occupancy_ratio and dram_ratio. A MIG-enabled GPU
        sampled as a whole reports the slice-weighted mean of its instances' metrics.
        """
        g = self.gpu(node, gpu_index)
        if gpu_instance is None and g.mig is not None:
            out = {GPM_GRAPHICS_UTIL: 0.0, GPM_SM_UTIL: 0.0, GPM_SM_OCCUPANCY: 0.0}
            out[GPM_DRAM_BW_UTIL] = 0.0
            for inst in g.mig:
                part = self.gpm_metrics(node, gpu_index, inst.gpu_instance_id, t1, t2)
                for k, v in part.items():
                    out[k] += v * inst.profile.slice_count / MIG_COMPUTE_SLICES
            return out
        w = self._signal(node, gpu_index, gpu_instance).w
        a = self.mean_activity(node, gpu_index, gpu_instance, t1, t2)
        return {
            GPM_GRAPHICS_UTIL: a,
            GPM_SM_UTIL: a * w.sm_ratio,
            GPM_SM_OCCUPANCY: a * w.occupancy_ratio,
            GPM_DRAM_BW_UTIL: a * w.dram_ratio,
        }

    # -- power, energy and counters ------------------------------------------------------------

    @staticmethod
    def _power_w(model: GpuModel, u: float) -> float:
        p = model.idle_power_w + (model.peak_power_w - model.idle_power_w) * u / 100.0
        return min(p, float(model.power_limit_w))

    def _day(self, node: str, gpu_index: int, day: int) -> tuple[list[float], list[float]]:
        """Prefix integrals over one UTC day in 5-minute buckets: energy (J) and activity (%s)."""
        k = (node, gpu_index, day)
        got = self._days.get(k)
        if got is not None:
            return got
        model = self.gpu(node, gpu_index).model
        n = int(_DAY / _ENERGY_BUCKET)
        pe = [0.0] * (n + 1)
        pu = [0.0] * (n + 1)
        t0 = day * _DAY
        for i in range(n):
            u = self.activity(node, gpu_index, None, t0 + (i + 0.5) * _ENERGY_BUCKET)
            pe[i + 1] = pe[i] + self._power_w(model, u) * _ENERGY_BUCKET
            pu[i + 1] = pu[i] + u * _ENERGY_BUCKET
        if len(self._days) > 4096:
            self._days.clear()
        self._days[k] = (pe, pu)
        return pe, pu

    def _reference(self, node: str, gpu_index: int) -> tuple[float, float]:
        """The energy (J) and activity integral (%s) every simulated day is normalised to."""
        k = (node, gpu_index)
        got = self._daily_ref.get(k)
        if got is None:
            e = u = 0.0
            for d in _ENERGY_REF_DAYS:
                pe, pu = self._day(node, gpu_index, d)
                e += pe[-1]
                u += pu[-1]
            got = (e / len(_ENERGY_REF_DAYS), u / len(_ENERGY_REF_DAYS))
            self._daily_ref[k] = got
        return got

    def _integrals(self, node: str, gpu_index: int, t: float) -> tuple[float, float]:
        """Energy (J) and activity integral (%s) since the epoch: continuous and monotonic.

        Day d contributes exactly the reference amount; inside the day the amount accrues in
        proportion to the day's own power curve, so the counter's rate follows the reported
        power within a few percent while staying a closed form in t.
        """
        day = math.floor(t / _DAY)
        ref_e, ref_u = self._reference(node, gpu_index)
        pe, pu = self._day(node, gpu_index, day)
        x = (t - day * _DAY) / _ENERGY_BUCKET
        i = min(int(x), len(pe) - 2)
        f = x - i
        e_in = pe[i] + (pe[i + 1] - pe[i]) * f
        u_in = pu[i] + (pu[i + 1] - pu[i]) * f
        days = max(0, day - _DRIVER_LOADED_DAY)
        e = days * ref_e + (ref_e * e_in / pe[-1] if pe[-1] > 0 else 0.0)
        u = days * ref_u + (ref_u * u_in / pu[-1] if pu[-1] > 0 else 0.0)
        return e, u

    def energy_mj(self, node: str, gpu_index: int, t: float) -> int:
        """nvmlDeviceGetTotalEnergyConsumption at t: millijoules, monotonic in t."""
        return int(self._integrals(node, gpu_index, t)[0] * 1000.0)

    def warm(self, node: str, t: float) -> None:
        """Compute the day caches a node's first NVML calls at t would need."""
        for g in self.nodes[node].gpus:
            self._integrals(node, g.index, t)

    # -- states --------------------------------------------------------------------------------

    def gpu_state(self, node: str, gpu_index: int, t: float) -> GpuState:
        """The fault-free reading of a whole GPU at t."""
        g = self.gpu(node, gpu_index)
        m = g.model
        w: Workload | None
        if g.mig is not None:
            # Same summation order as activity(), so both give the very same float.
            u = dram = 0.0
            alloc = 0
            for inst in g.mig:
                s = self.mig_state(node, gpu_index, inst.gpu_instance_id, t)
                u += s.activity * inst.profile.slice_count
                dram += s.dram_bw_util * inst.profile.slice_count
                alloc += s.memory_used + s.memory_reserved
            u /= MIG_COMPUTE_SLICES
            dram /= MIG_COMPUTE_SLICES
            w = None
        else:
            u = self.activity(node, gpu_index, None, t)
            w = g.workload
            held = w.memory > 0 and not (
                w.release_memory_when_idle and self._signal(node, gpu_index, None).in_spell(t)
            )
            alloc = _alloc_bytes(g.key, w.memory, m.memory_mib - m.reserved_mib) if held else 0
            dram = u * w.dram_ratio
        total = m.memory_mib * _MIB
        reserved = m.reserved_mib * _MIB
        busy = u >= IDLE_THRESHOLD
        power_w = self._power_w(m, u)
        heat = (power_w - m.idle_power_w) / (m.peak_power_w - m.idle_power_w)
        temp = (
            m.idle_temp_c
            + (m.load_temp_c - m.idle_temp_c) * heat
            + 4.0 * (_mix(g.key, 0, 31) - 0.5)
        )
        reasons = 0 if busy else REASON_GPU_IDLE
        sm = m.max_sm_mhz if busy else m.idle_sm_mhz
        if power_w >= 0.92 * m.power_limit_w:
            reasons |= REASON_SW_POWER_CAP
            sm = int(m.max_sm_mhz * 0.9) // 15 * 15
        e_j, u_int = self._integrals(node, gpu_index, t)
        nv_ratio = 0.0 if (w is None or m.nvlink_links == 0) else w.nvlink_ratio
        nv_tx = int(u_int / 100.0 * nv_ratio * m.nvlink_links * m.nvlink_link_kib_per_s)
        pcie_ratio = 0.5 if w is None else w.pcie_ratio
        jitter = 0.9 + 0.2 * _mix(g.key, math.floor(t), 41)
        media = 0.0 if (w is None or not m.media_engines) else w.media_ratio
        return GpuState(
            index=g.index,
            uuid=g.uuid,
            name=m.name,
            mig_enabled=g.mig_enabled,
            activity=u,
            utilization_gpu=round(u),
            utilization_memory=round(dram),
            memory_total=total,
            memory_reserved=reserved,
            memory_used=alloc,
            memory_free=total - reserved - alloc,
            power_mw=int(power_w * 1000),
            power_limit_mw=m.power_limit_w * 1000,
            energy_mj=int(e_j * 1000.0),
            temperature_c=round(temp),
            sm_clock_mhz=sm,
            graphics_clock_mhz=sm,
            mem_clock_mhz=m.max_mem_mhz if busy else m.idle_mem_mhz,
            video_clock_mhz=m.max_video_mhz if busy else m.idle_video_mhz,
            pstate=0 if busy else 8,
            clocks_event_reasons=reasons,
            pcie_tx_kbps=int((8_000 + u * 6_000 * pcie_ratio) * jitter),
            pcie_rx_kbps=int((15_000 + u * 18_000 * pcie_ratio) * jitter),
            encoder_util=round(u * media * 0.3),
            decoder_util=round(u * media),
            nvlink_tx_kib=nv_tx,
            nvlink_rx_kib=int(nv_tx * 0.97),
        )

    def mig_state(self, node: str, gpu_index: int, gpu_instance: int, t: float) -> MigState:
        """The fault-free reading of one MIG device (by GPU instance id) at t."""
        g = self.gpu(node, gpu_index)
        inst = g.instance(gpu_instance)
        if inst is None:
            raise KeyError(f"node {node!r} GPU {gpu_index} has no GPU instance {gpu_instance}")
        sig = self._signal(node, gpu_index, gpu_instance)
        w = inst.workload
        u = sig.activity(t)
        total = inst.profile.memory_size_mb * _MIB
        reserved = _MIG_RESERVED_MIB * _MIB
        held = w.memory > 0 and not (w.release_memory_when_idle and sig.in_spell(t))
        alloc = (
            _alloc_bytes(inst.key, w.memory, inst.profile.memory_size_mb - _MIG_RESERVED_MIB)
            if held
            else 0
        )
        return MigState(
            gpu_index=gpu_index,
            gpu_instance_id=inst.gpu_instance_id,
            compute_instance_id=inst.compute_instance_id,
            profile=inst.profile.key,
            profile_id=inst.profile.profile_id,
            uuid=inst.uuid,
            name=f"{g.model.name} {inst.profile.name}",
            activity=u,
            memory_total=total,
            memory_reserved=reserved,
            memory_used=alloc,
            memory_free=total - reserved - alloc,
            sm_util=u * w.sm_ratio,
            sm_occupancy=u * w.occupancy_ratio,
            dram_bw_util=u * w.dram_ratio,
        )


def _alloc_bytes(key: int, fraction: float, capacity_mib: int) -> int:
    """Memory a device's job holds: the workload's fraction +-4 %, whole MiB."""
    f = fraction * (0.96 + 0.08 * _mix(key, 0, 21))
    f = min(max(f, 0.0), 0.98)
    return int(capacity_mib * f) * _MIB


# ---------------------------------------------------------------------------------------------
# Loading and validation


class _Ctx:
    """Builds error messages that name the file, the key path and what to do."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str) -> FleetError:
        return FleetError(f"{self.source}: {where}: {msg}")

    def mapping(self, value: object, where: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping with keys {', '.join(allowed)}")
        for k in value:
            if k not in allowed:
                raise self.fail(
                    f"{where}.{k}" if where else str(k),
                    f"unknown key {k!r}; allowed keys: {', '.join(allowed)}",
                )
        return value

    def number(
        self, value: object, where: str, lo: float | None = None, hi: float | None = None
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.fail(where, f"expected a number, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(where, f"{value!r} is out of range; use a value in [{lo}, {hi}]")
        return float(value)

    def integer(
        self, value: object, where: str, lo: int | None = None, hi: int | None = None
    ) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(where, f"{value!r} is out of range; use an integer in [{lo}, {hi}]")
        return value

    def duration(self, value: object, where: str) -> float:
        try:
            return parse_duration(value)
        except ValueError as e:
            raise self.fail(where, f"{value!r} is not a duration; use {e}") from None

    def string(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"expected a non-empty string, got {value!r}")
        return value


def _workload(ctx: _Ctx, value: object, where: str) -> Workload:
    if value is None:
        value = "inference"
    if isinstance(value, str):
        value = {"pattern": value}
    spec = ctx.mapping(value, where, _WORKLOAD_KEYS)
    pattern = spec.get("pattern", "inference")
    if pattern not in PATTERNS:
        raise ctx.fail(
            f"{where}.pattern", f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}"
        )
    p = dict(PATTERNS[pattern])
    for k in ("base", "amplitude", "noise", "burst_height"):
        if k in spec:
            p[k] = ctx.number(spec[k], f"{where}.{k}", 0, 100)
    if "peak_hour" in spec:
        p["peak_hour"] = ctx.number(spec["peak_hour"], f"{where}.peak_hour", 0, 24)
    for k in ("idle_probability", "burst_probability", "memory"):
        if k in spec:
            p[k] = ctx.number(spec[k], f"{where}.{k}", 0, 1)
    if "idle_every" in spec:
        p["idle_every"] = ctx.duration(spec["idle_every"], f"{where}.idle_every")
    if "idle_length" in spec:
        v = spec["idle_length"]
        if isinstance(v, list):
            if len(v) != 2:
                raise ctx.fail(f"{where}.idle_length", "give one duration or [min, max]")
            lo = ctx.duration(v[0], f"{where}.idle_length[0]")
            hi = ctx.duration(v[1], f"{where}.idle_length[1]")
        else:
            lo = hi = ctx.duration(v, f"{where}.idle_length")
        if hi < lo:
            raise ctx.fail(f"{where}.idle_length", "min is larger than max; swap them")
        p["idle_length"] = (lo, hi)
    if "release_memory_when_idle" in spec:
        v = spec["release_memory_when_idle"]
        if not isinstance(v, bool):
            raise ctx.fail(f"{where}.release_memory_when_idle", "expected true or false")
        p["release_memory_when_idle"] = v
    lo, hi = p.pop("idle_length")
    if p["idle_probability"] > 0 and (hi <= 0 or p["idle_every"] < hi + 2 * _SPELL_MARGIN):
        raise ctx.fail(
            f"{where}.idle_every",
            f"{p['idle_every']:g}s cannot hold an idle spell of up to {hi:g}s plus 2 minutes;"
            " make idle_every longer or idle_length shorter (and idle_length > 0)",
        )
    return Workload(pattern=pattern, idle_min=lo, idle_max=hi, **p)


def _mig_items(ctx: _Ctx, value: object, where: str) -> list[tuple[str, object, str]]:
    """(profile key, workload spec or None, where) for each requested instance."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\S+)\s*", value)
        if m:
            return [(m.group(2), None, where)] * int(m.group(1))
        return [(value.strip(), None, where)]
    if not isinstance(value, list):
        raise ctx.fail(where, 'expected "7x1g.10gb", a profile name, or a list of profiles')
    out: list[tuple[str, object, str]] = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            out.append((item.strip(), None, w))
        else:
            spec = ctx.mapping(item, w, ("profile", "workload"))
            if "profile" not in spec:
                raise ctx.fail(w, "missing key 'profile' (e.g. profile: 3g.40gb)")
            out.append((ctx.string(spec["profile"], f"{w}.profile"), spec.get("workload"), w))
    return out


def _error_code(ctx: _Ctx, value: object, where: str) -> int:
    import pynvml

    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("NVML_ERROR_"):
            name = "NVML_ERROR_" + name
        code = getattr(pynvml, name, None)
        if isinstance(code, int):
            return code
    names = sorted(n[len("NVML_ERROR_") :] for n in dir(pynvml) if n.startswith("NVML_ERROR_"))
    raise ctx.fail(where, f"unknown NVML error {value!r}; use one of {', '.join(names)}")


_FAULT_KEYS = {
    "lost": ("kind", "gpu", "at", "until"),
    "error": ("kind", "gpu", "function", "error", "at", "until"),
    "hang": ("kind", "gpu", "function", "at", "until"),
    "xid": ("kind", "gpu", "xid", "at"),
    "overheat": ("kind", "gpu", "at", "until", "temperature"),
    "driver_not_loaded": ("kind", "at", "until"),
    "version_mismatch": ("kind", "at", "until"),
    "uninitialized": ("kind", "at"),
}


def _fault(ctx: _Ctx, value: object, where: str, n_gpus: int) -> Fault:
    from .driver import FUNCTION_NAMES

    if not isinstance(value, Mapping) or "kind" not in value:
        raise ctx.fail(where, f"expected a mapping with 'kind' (one of {', '.join(FAULT_KINDS)})")
    kind = value["kind"]
    if kind not in _FAULT_KEYS:
        raise ctx.fail(
            f"{where}.kind", f"unknown fault kind {kind!r}; use one of {', '.join(FAULT_KINDS)}"
        )
    spec = ctx.mapping(value, where, _FAULT_KEYS[kind])
    if "at" not in spec:
        raise ctx.fail(where, "missing key 'at' (seconds after the driver is installed)")
    at = ctx.duration(spec["at"], f"{where}.at")
    until = None
    if "until" in spec:
        until = ctx.duration(spec["until"], f"{where}.until")
        if until <= at:
            raise ctx.fail(f"{where}.until", f"{until:g} is not after at={at:g}; make it later")
    gpu = None
    if kind not in NODE_FAULT_KINDS:
        if "gpu" not in spec:
            raise ctx.fail(where, "missing key 'gpu' (the GPU index on this node)")
        gpu = ctx.integer(spec["gpu"], f"{where}.gpu", 0, n_gpus - 1)
    function = None
    if kind in ("error", "hang"):
        if "function" not in spec:
            raise ctx.fail(
                where, "missing key 'function' (an NVML C function, e.g. nvmlDeviceGetPowerUsage)"
            )
        function = ctx.string(spec["function"], f"{where}.function")
        if function not in FUNCTION_NAMES:
            raise ctx.fail(
                f"{where}.function",
                f"{function!r} is not a function the simulated driver has; use an NVML C "
                "function name such as nvmlDeviceGetPowerUsage",
            )
    error = None
    if kind == "error":
        if "error" not in spec:
            raise ctx.fail(
                where, "missing key 'error' (e.g. UNKNOWN, NO_PERMISSION, NOT_SUPPORTED)"
            )
        error = _error_code(ctx, spec["error"], f"{where}.error")
    xid = None
    if kind == "xid":
        if "xid" not in spec:
            raise ctx.fail(where, "missing key 'xid' (the XID code, e.g. 79)")
        xid = ctx.integer(spec["xid"], f"{where}.xid", 1, 1_000_000)
    temperature = None
    if kind == "overheat":
        temperature = ctx.integer(spec.get("temperature", 92), f"{where}.temperature", 0, 150)
    return Fault(kind, at, until, gpu, function, error, xid, temperature)


_NODE_KEYS = ("name", "driver_version", "cuda_driver_version", "gpus", "faults", "pods", "kubelet")
_GROUP_KEYS = ("model", "count", "mig", "workload", "time_slicing")
_TOP_KEYS = ("seed", "driver_version", "cuda_driver_version", "nodes")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_DRIVER = re.compile(r"^\d+\.\d+(\.\d+)?$")


def parse_fleet(data: object, source: str = "<fleet>") -> Fleet:
    """Validate a fleet document (already parsed from YAML) and build the fleet."""
    ctx = _Ctx(source)
    top = ctx.mapping(data, "", _TOP_KEYS)
    if "seed" not in top:
        raise ctx.fail("seed", "missing; add e.g. `seed: 42` (all signals derive from it)")
    seed = ctx.integer(top["seed"], "seed", 0)
    dflt_driver = top.get("driver_version", DEFAULT_DRIVER_VERSION)
    dflt_cuda = top.get("cuda_driver_version", DEFAULT_CUDA_DRIVER_VERSION)
    nodes_v = top.get("nodes")
    if not isinstance(nodes_v, list) or not nodes_v:
        raise ctx.fail("nodes", "expected a non-empty list of nodes")
    nodes: dict[str, SimNode] = {}
    for ni, nv in enumerate(nodes_v):
        nw = f"nodes[{ni}]"
        ns = ctx.mapping(nv, nw, _NODE_KEYS)
        name = ctx.string(ns.get("name"), f"{nw}.name")
        if not _NAME.match(name) or len(name) > 63:
            raise ctx.fail(
                f"{nw}.name",
                f"{name!r} is not a Kubernetes node name (lower-case, digits, '-', '.')",
            )
        if name in nodes:
            raise ctx.fail(f"{nw}.name", f"duplicate node name {name!r}; names must be unique")
        driver = ns.get("driver_version", dflt_driver)
        if not isinstance(driver, str) or not _DRIVER.match(driver):
            raise ctx.fail(
                f"{nw}.driver_version",
                f'{driver!r} is not a driver version; quote it, e.g. "570.124.06"',
            )
        cuda = ctx.integer(
            ns.get("cuda_driver_version", dflt_cuda), f"{nw}.cuda_driver_version", 1000, 99999
        )
        groups = ns.get("gpus")
        if not isinstance(groups, list) or not groups:
            raise ctx.fail(
                f"{nw}.gpus", "expected a non-empty list of GPU groups (model, count, ...)"
            )
        gpus: list[SimGpu] = []
        for gi, gv in enumerate(groups):
            gw = f"{nw}.gpus[{gi}]"
            gs = ctx.mapping(gv, gw, _GROUP_KEYS)
            mkey = gs.get("model")
            if mkey not in MODELS:
                raise ctx.fail(
                    f"{gw}.model", f"unknown model {mkey!r}; use one of {', '.join(MODELS)}"
                )
            model = MODELS[mkey]
            count = ctx.integer(gs.get("count", 1), f"{gw}.count", 1, 16)
            replicas = ctx.integer(gs.get("time_slicing", 0), f"{gw}.time_slicing", 0, 64)
            if replicas and gs.get("mig") is not None:
                raise ctx.fail(f"{gw}.time_slicing", "time-slicing applies to whole GPUs, not MIG")
            workload = _workload(ctx, gs.get("workload"), f"{gw}.workload")
            mig_spec = gs.get("mig")
            items: list[tuple[str, object, str]] | None = None
            placements: list[Placement] | None = None
            if mig_spec is not None:
                if not model.mig_capable:
                    raise ctx.fail(
                        f"{gw}.mig", f"{model.key} does not support MIG; remove the mig key"
                    )
                items = _mig_items(ctx, mig_spec, f"{gw}.mig")
                for key, _, w in items:
                    if model.profile(key) is None:
                        raise ctx.fail(
                            w,
                            f"unknown MIG profile {key!r} for {model.key}; use one of "
                            + ", ".join(p.key for p in model.mig_profiles),
                        )
                placements = place(model, [k for k, _, _ in items])
                if placements is None:
                    raise ctx.fail(
                        f"{gw}.mig",
                        f"layout {[k for k, _, _ in items]} does not fit on one {model.key} "
                        "(7 compute and 8 memory slices); remove or shrink an instance",
                    )
            for _ in range(count):
                index = len(gpus)
                if index >= 16:
                    raise ctx.fail(f"{nw}.gpus", "more than 16 GPUs on one node; split the node")
                gkey = _hash64(seed, name, index)
                mig: tuple[SimMigInstance, ...] | None = None
                if items is not None and placements is not None:
                    # place() sorted by GI id; map each placement back to its request.
                    pending = list(items)
                    insts = []
                    for pl in placements:
                        j = next(j for j, it in enumerate(pending) if it[0] == pl.profile.key)
                        _, wspec, w = pending.pop(j)
                        inst_w = (
                            workload if wspec is None else _workload(ctx, wspec, f"{w}.workload")
                        )
                        insts.append(
                            SimMigInstance(
                                placement=pl,
                                workload=inst_w,
                                uuid="MIG-" + _uuid(seed, name, index, "gi", pl.gpu_instance_id),
                                key=_hash64(seed, name, index, "gi", pl.gpu_instance_id),
                            )
                        )
                    mig = tuple(insts)
                buses = model.pci_buses
                bus = buses[index] if index < len(buses) else (0x10 + 0x10 * index) & 0xFF
                gpus.append(
                    SimGpu(
                        index=index,
                        model=model,
                        uuid="GPU-" + _uuid(seed, name, index),
                        serial=model.serial_prefix + f"{gkey % 10**9:09d}",
                        pci_bus=bus,
                        workload=workload,
                        mig=mig,
                        key=gkey,
                        replicas=replicas,
                    )
                )
        faults_v = ns.get("faults", [])
        if not isinstance(faults_v, list):
            raise ctx.fail(f"{nw}.faults", "expected a list of faults")
        faults = tuple(
            _fault(ctx, fv, f"{nw}.faults[{fi}]", len(gpus)) for fi, fv in enumerate(faults_v)
        )
        kubelet = parse_kubelet(ctx, ns.get("kubelet"), f"{nw}.kubelet")
        pods = parse_pods(
            ctx,
            ns.get("pods"),
            f"{nw}.pods",
            seed=seed,
            node=name,
            gpus=gpus,
            hash64=_hash64,
            uuid=_uuid,
        )
        nodes[name] = SimNode(name, driver, cuda, tuple(gpus), faults, pods, kubelet)
    return Fleet(seed=seed, nodes=nodes, source=source)


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a fleet YAML file; raises FleetError naming the file and the key."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise FleetError(f"{p}: cannot read the fleet file: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FleetError(f"{p}: not valid YAML: {e}") from None
    return parse_fleet(data, str(p))
