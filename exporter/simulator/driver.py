"""A simulated NVML shared library, installed below pynvml.

`install()` sets `pynvml.nvmlLib` to an object whose attributes are ctypes callbacks, one per
NVML C function, so pynvml's own wrappers (struct versions, byref, the two-call buffer sizing,
the NVMLError mapping) run unchanged against the simulated fleet. A function this driver does
not define raises AttributeError, which pynvml reports as NVML_ERROR_FUNCTION_NOT_FOUND, as it
would for an older libnvidia-ml.so.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from ctypes import (
    CFUNCTYPE,
    c_char,
    c_int,
    c_uint,
    c_ulonglong,
    c_void_p,
    memmove,
)
from typing import Any

import pynvml

from .clock import Clock, WallClock
from .fleet import (
    REASON_HW_THERMAL,
    REASON_SW_THERMAL,
    Fault,
    Fleet,
    GpuState,
    MigState,
    SimGpu,
    SimMigInstance,
    SimNode,
    _hash64,
    _uuid,
)
from .models import MIG_COMPUTE_SLICES, place, remaining_capacity
from .pods import ProcessState, processes_at

log = logging.getLogger(__name__)

# Return codes (nvmlReturn_t).
SUCCESS = 0
UNINITIALIZED = 1
INVALID_ARGUMENT = 2
NOT_SUPPORTED = 3
NOT_FOUND = 6
INSUFFICIENT_SIZE = 7
DRIVER_NOT_LOADED = 9
TIMEOUT = 10
GPU_IS_LOST = 15
LIB_RM_VERSION_MISMATCH = 18
ARGUMENT_VERSION_MISMATCH = 25
UNKNOWN = 999

HANG_CAP_S = 120.0  # a hanging callback never blocks longer than this, in wall time
_POLL_S = 0.005  # sleep step of hangs and event waits (Event.wait releases the GIL)

_UINT_MAX = 0xFFFFFFFF
_FI_TOTAL_ENERGY = pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION  # 83
_FI_NVLINK_LINK_COUNT = pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT  # 91
_FI_NVLINK_TX = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX  # 138
_FI_NVLINK_RX = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX  # 139
# Error totals over all lanes and links: only replays ever happen on the simulated links.
_FI_NVLINK_ERROR_TOTALS = (
    pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
    pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
    pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL,
    pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
)
_VALUE_UINT = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
_VALUE_ULL = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG

_EVENTS_SUPPORTED = (
    pynvml.nvmlEventTypeSingleBitEccError
    | pynvml.nvmlEventTypeDoubleBitEccError
    | pynvml.nvmlEventTypePState
    | pynvml.nvmlEventTypeXidCriticalError
    | pynvml.nvmlEventTypeClock
)
_EVENT_XID = pynvml.nvmlEventTypeXidCriticalError

# Struct versions the real library checks: NVML_STRUCT_VERSION(name, v) = sizeof | v << 24.
_MEMORY_V2 = pynvml.nvmlMemory_v2
_TEMPERATURE_V1 = pynvml.nvmlTemperature_v1
_GI_PROFILE_INFO_V2 = pynvml.nvmlGpuInstanceProfileInfo_v2
_GI_PROFILE_INFO_V3 = 0x03000098
_CI_PROFILE_INFO_V2 = pynvml.nvmlComputeInstanceProfileInfo_v2
_GPM_METRICS_GET_VERSION = pynvml.NVML_GPM_METRICS_GET_VERSION
_GPM_SUPPORT_VERSION = pynvml.NVML_GPM_SUPPORT_VERSION


class _GpuInstanceProfileInfoV3(ctypes.Structure):
    """nvmlGpuInstanceProfileInfo_v3_t from nvml.h (pynvml 13 only ships v2)."""

    _fields_ = [
        ("version", c_uint),
        ("id", c_uint),
        ("sliceCount", c_uint),
        ("instanceCount", c_uint),
        ("multiprocessorCount", c_uint),
        ("copyEngineCount", c_uint),
        ("decoderCount", c_uint),
        ("encoderCount", c_uint),
        ("jpegCount", c_uint),
        ("ofaCount", c_uint),
        ("memorySizeMB", c_ulonglong),
        ("name", c_char * pynvml.NVML_DEVICE_NAME_V2_BUFFER_SIZE),
        ("capabilities", c_uint),
    ]


# GPM metric names the real library puts in metricInfo (static strings there, kept alive here).
_GPM_INFO: dict[int, tuple[bytes, bytes, bytes]] = {
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: (b"GR_UTIL", b"Graphics utilization", b"%"),
    pynvml.NVML_GPM_METRIC_SM_UTIL: (b"SM_UTIL", b"SM utilization", b"%"),
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: (b"SM_OCCUP", b"SM occupancy", b"%"),
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: (b"DRAM_BW_UTIL", b"DRAM bandwidth utilization", b"%"),
}
_GPM_INFO_BUFS = {k: tuple(ctypes.create_string_buffer(s) for s in v) for k, v in _GPM_INFO.items()}

# Opaque handle values. pynvml never dereferences them; each kind gets its own range.
_GPU_BASE = 0x5E_0000_1000
_MIG_BASE = 0x5E_0001_0000
_GI_BASE = 0x5E_0002_0000
_CI_BASE = 0x5E_0003_0000
_EVT_BASE = 0x5E_0010_0000
_GPM_BASE = 0x5E_0100_0000


def _nvml(
    *argtypes: Any, restype: Any = c_int
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a method as the NVML C function of the same name, with its C signature."""

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        f._nvml_sig = (restype, argtypes)  # type: ignore[attr-defined]
        return f

    return mark


def _put_uint(p: int, v: int) -> None:
    c_uint.from_address(p).value = v


def _put_ull(p: int, v: int) -> None:
    c_ulonglong.from_address(p).value = v


def _put_ptr(p: int, v: int) -> None:
    c_void_p.from_address(p).value = v


def _put_str(p: int | None, length: int, s: str) -> int:
    data = s.encode()
    if not p:
        return INVALID_ARGUMENT
    if len(data) + 1 > length:
        return INSUFFICIENT_SIZE
    memmove(p, data + b"\0", len(data) + 1)
    return SUCCESS


class _Lib:
    """The object pynvml sees as the loaded library; attributes are added per function."""

    def __repr__(self) -> str:
        return "<simulated libnvidia-ml.so.1>"


@dataclasses.dataclass
class _EventSet:
    devices: dict[int, int] = dataclasses.field(default_factory=dict)  # gpu index -> type mask


class SimulatedDriver:
    """One node's simulated NVML library: its devices, init state, faults and events."""

    def __init__(
        self,
        fleet: Fleet,
        node: str,
        clock: Clock,
        fault_origin: float | None = None,
        resolution: float = 0.0,
    ) -> None:
        if node not in fleet.nodes:
            raise KeyError(f"no node {node!r} in {fleet.source}; nodes: {', '.join(fleet.nodes)}")
        self.fleet = fleet
        self.node: SimNode = fleet.nodes[node]
        self.clock = clock
        self.resolution = resolution
        self.fault_origin = clock.now() if fault_origin is None else float(fault_origin)
        self._lock = threading.Lock()
        self._refcount = 0
        self._released = threading.Event()
        self._closed = threading.Event()
        self._gpu_cache: dict[int, tuple[float, GpuState]] = {}
        self._mig_cache: dict[tuple[int, int], tuple[float, MigState]] = {}
        self._event_sets: dict[int, _EventSet] = {}
        self._xid_delivered: set[int] = set()
        self._gpm_samples: dict[int, tuple[int, int | None, float, int] | None] = {}
        self._process_cache: tuple[float, list[ProcessState]] | None = None
        self._next_handle = 0
        self._err_bufs: dict[int, ctypes.Array[c_char]] = {}
        name = self.node.name
        # Handle tables: value -> (gpu, mig instance or None).
        self._devs: dict[int, tuple[SimGpu, SimMigInstance | None]] = {}
        self._gis: dict[int, tuple[SimGpu, SimMigInstance]] = {}
        self._cis: dict[int, tuple[SimGpu, SimMigInstance]] = {}
        self._build_handle_tables()
        self._mig_generation: dict[int, int] = {}
        # Faults by GPU, and node-level ones.
        self._gpu_faults: dict[int, list[Fault]] = {}
        self._node_faults = [
            f for f in self.node.faults if f.kind in ("driver_not_loaded", "version_mismatch")
        ]
        #: One-shot losses of initialisation, with whether each has happened yet.
        self._init_drops: list[list[Any]] = [
            [f, False] for f in self.node.faults if f.kind == "uninitialized"
        ]
        self._xids = [(i, f) for i, f in enumerate(self.node.faults) if f.kind == "xid"]
        for f in self.node.faults:
            if f.gpu is not None and f.kind != "xid":
                self._gpu_faults.setdefault(f.gpu, []).append(f)
        self.lib = self._build_lib()
        log.debug("simulated NVML for node %s ready", name)

    def _build_handle_tables(self) -> None:
        devs: dict[int, tuple[SimGpu, SimMigInstance | None]] = {}
        gis: dict[int, tuple[SimGpu, SimMigInstance]] = {}
        cis: dict[int, tuple[SimGpu, SimMigInstance]] = {}
        for g in self.node.gpus:
            devs[self.gpu_handle(g.index)] = (g, None)
            for m in g.mig or ():
                devs[self.mig_handle(g.index, m.gpu_instance_id)] = (g, m)
                gis[_GI_BASE + g.index * 256 + m.gpu_instance_id] = (g, m)
                cis[_CI_BASE + g.index * 256 + m.gpu_instance_id] = (g, m)
        # Whole tables are swapped, so a call on another thread sees the old or the new one.
        self._devs, self._gis, self._cis = devs, gis, cis

    # -- runtime reconfiguration ---------------------------------------------------------------

    def set_mig_layout(self, index: int, profiles: list[str] | None) -> SimGpu:
        """Re-lay out GPU `index` now, as an operator's `nvidia-smi mig -dci -dgi` and
        `-cgi ... -C` (or the MIG manager) would: `profiles` like ["3g.40gb", "1g.10gb"],
        [] for MIG enabled with no instances, None for MIG disabled.

        Every instance created gets a new MIG UUID, as on a real GPU, even where it takes a
        GPU instance id that an instance destroyed here had. Handles of destroyed instances
        stop resolving (INVALID_ARGUMENT). Returns the GPU as it is now; the fleet's ground
        truth (`fleet.gpu`, `mig_state`, ...) follows. GPUs that the node's pods claim
        cannot be re-laid out here (their claims would dangle).
        """
        with self._lock:
            g = self.node.gpus[index]
            if not g.model.mig_capable:
                raise ValueError(f"GPU {index} ({g.model.key}) does not support MIG")
            for pod in self.node.pods:
                for container in pod.containers:
                    if any(claim.gpu == index for claim in container.devices):
                        raise ValueError(f"pod {pod.name} claims GPU {index}; cannot re-lay it out")
            mig: tuple[SimMigInstance, ...] | None = None
            if profiles is not None:
                placements = place(g.model, list(profiles))
                if placements is None:
                    raise ValueError(f"layout {profiles} does not fit on one {g.model.key}")
                generation = self._mig_generation.get(index, 0) + 1
                self._mig_generation[index] = generation
                seed, node = self.fleet.seed, self.node.name
                mig = tuple(
                    SimMigInstance(
                        placement=pl,
                        workload=g.workload,
                        uuid="MIG-"
                        + _uuid(seed, node, index, "gi", pl.gpu_instance_id, generation),
                        key=_hash64(seed, node, index, "gi", pl.gpu_instance_id, generation),
                    )
                    for pl in placements
                )
            new_gpu = dataclasses.replace(g, mig=mig)
            gpus = tuple(new_gpu if other.index == index else other for other in self.node.gpus)
            self.node = dataclasses.replace(self.node, gpus=gpus)
            self.fleet.nodes[self.node.name] = self.node
            # Forget the signals and answers computed for the old layout (energy integrals
            # are kept, so the energy counter stays monotonic across the change).
            for signal in [k for k in self.fleet._signals if k[:2] == (self.node.name, index)]:
                del self.fleet._signals[signal]
            self._gpu_cache.pop(index, None)
            for cached in [k for k in self._mig_cache if k[0] == index]:
                del self._mig_cache[cached]
            self._process_cache = None
            self._build_handle_tables()
        return new_gpu

    # -- public ground truth -------------------------------------------------------------------

    @staticmethod
    def gpu_handle(index: int) -> int:
        """The opaque nvmlDevice_t value of GPU `index` (stable across installs)."""
        return _GPU_BASE + index * 16

    @staticmethod
    def mig_handle(index: int, gpu_instance: int) -> int:
        return _MIG_BASE + index * 256 + gpu_instance

    def release_hangs(self) -> None:
        """Make every hanging callback return now, and disable hang faults from here on."""
        self._released.set()

    def _now(self) -> float:
        """The time every answer is computed for: the clock, floored to `resolution`.

        With a resolution (the demo's wall clock uses 50 ms) all calls of one collection
        cycle see the same instant and share one cached state per device.
        """
        t = self.clock.now()
        r = self.resolution
        return t if r <= 0 else (t // r) * r

    def _active(self, gpu: int, kind: str, t: float) -> Fault | None:
        rel = t - self.fault_origin
        for f in self._gpu_faults.get(gpu, ()):
            if f.kind == kind and f.active(rel):
                return f
        return None

    def gpu_state(self, index: int, t: float | None = None) -> GpuState:
        """What the driver answers for GPU `index` at t (default: now), faults applied."""
        t = self._now() if t is None else t
        hit = self._gpu_cache.get(index)
        if hit is not None and hit[0] == t:
            return hit[1]
        st = self.fleet.gpu_state(self.node.name, index, t)
        if self._gpu_faults:
            if self._active(index, "lost", t):
                st = dataclasses.replace(st, lost=True)
            hot = self._active(index, "overheat", t)
            if hot is not None and hot.temperature is not None:
                reasons = st.clocks_event_reasons | REASON_SW_THERMAL
                if hot.temperature >= 90:
                    reasons |= REASON_HW_THERMAL
                m = self.node.gpus[index].model
                sm = min(st.sm_clock_mhz, int(m.max_sm_mhz * 0.7) // 15 * 15)
                st = dataclasses.replace(
                    st,
                    temperature_c=hot.temperature,
                    clocks_event_reasons=reasons,
                    sm_clock_mhz=sm,
                    graphics_clock_mhz=sm,
                )
        self._gpu_cache[index] = (t, st)
        return st

    def mig_state(self, index: int, gpu_instance: int, t: float | None = None) -> MigState:
        """What the driver answers for one MIG device (by GPU instance id) at t."""
        t = self._now() if t is None else t
        k = (index, gpu_instance)
        hit = self._mig_cache.get(k)
        if hit is not None and hit[0] == t:
            return hit[1]
        st = self.fleet.mig_state(self.node.name, index, gpu_instance, t)
        if self._gpu_faults and self._active(index, "lost", t):
            st = dataclasses.replace(st, lost=True)
        self._mig_cache[k] = (t, st)
        return st

    # -- plumbing ------------------------------------------------------------------------------

    def _build_lib(self) -> _Lib:
        lib = _Lib()
        for name in FUNCTION_NAMES:
            method = getattr(self, _ALIASES.get(name, name))
            restype, argtypes = method._nvml_sig
            fail = None if restype is c_void_p else UNKNOWN
            proto = CFUNCTYPE(restype, *argtypes)
            setattr(lib, name, proto(self._guard(name, method, fail)))
        return lib

    @staticmethod
    def _guard(name: str, method: Callable[..., Any], fail: Any) -> Callable[..., Any]:
        # An exception escaping a ctypes callback would be printed and read as 0 (SUCCESS).
        def call(*args: Any) -> Any:
            try:
                return method(*args)
            except Exception:
                log.exception("simulated %s failed", name)
                return fail

        return call

    def _new_handle(self, base: int) -> int:
        with self._lock:
            self._next_handle += 1
            return base + self._next_handle

    def _initialised(self, t: float) -> int:
        """SUCCESS, or why a call cannot run: not initialised, or the driver went away.

        While a driver_not_loaded or version_mismatch fault is active the library loses its
        initialisation (the kernel module is gone or changed), so calls answer UNINITIALIZED
        until nvmlInit succeeds again; an uninitialized fault drops it once, at its time.
        """
        if self._node_faults:
            rel = t - self.fault_origin
            if any(f.active(rel) for f in self._node_faults):
                self._refcount = 0
                return UNINITIALIZED
        if self._init_drops:
            rel = t - self.fault_origin
            for drop in self._init_drops:
                if not drop[1] and rel >= drop[0].at:
                    drop[1] = True
                    self._refcount = 0
        return SUCCESS if self._refcount > 0 else UNINITIALIZED

    def _device(
        self, fn: str, handle: int | None, t: float
    ) -> tuple[SimGpu, SimMigInstance | None] | int:
        """Resolve a device handle for function `fn`, applying the GPU's faults."""
        rc = self._initialised(t)
        if rc:
            return rc
        dev = self._devs.get(handle) if handle else None
        if dev is None:
            return INVALID_ARGUMENT
        rc = self._faults(fn, dev[0].index, t)
        return rc if rc else dev

    def _faults(self, fn: str, gpu: int, t: float) -> int:
        faults = self._gpu_faults.get(gpu)
        if not faults:
            return SUCCESS
        rel = t - self.fault_origin
        for f in faults:
            if not f.active(rel):
                continue
            if f.kind == "lost":
                return GPU_IS_LOST
            if f.function == fn:
                if f.kind == "error" and f.error is not None:
                    return f.error
                if f.kind == "hang":
                    self._hang(f)
        return SUCCESS

    def _call_faults(self, fn: str, gpu: int, t: float) -> int:
        """Only the error and hang faults of one function (not a lost GPU's failures)."""
        rel = t - self.fault_origin
        for f in self._gpu_faults.get(gpu, ()):
            if f.function == fn and f.active(rel):
                if f.kind == "error" and f.error is not None:
                    return f.error
                if f.kind == "hang":
                    self._hang(f)
        return SUCCESS

    def _hang(self, f: Fault) -> None:
        """Block like a wedged ioctl: until the window ends, release_hangs(), or the cap."""
        deadline = time.monotonic() + HANG_CAP_S
        while not self._released.is_set() and time.monotonic() < deadline:
            if f.until is not None and self._now() - self.fault_origin >= f.until:
                return
            self._released.wait(_POLL_S)

    def _gpu_only(self, fn: str, handle: int | None) -> tuple[SimGpu, float] | int:
        """Resolve a handle for a query MIG devices do not answer (NOT_SUPPORTED on them)."""
        t = self._now()
        dev = self._device(fn, handle, t)
        if isinstance(dev, int):
            return dev
        if dev[1] is not None:
            return NOT_SUPPORTED
        return dev[0], t

    # -- init, system --------------------------------------------------------------------------

    def _init(self) -> int:
        if self._node_faults:
            rel = self._now() - self.fault_origin
            for f in self._node_faults:
                if f.active(rel) and f.kind == "driver_not_loaded":
                    return DRIVER_NOT_LOADED
                if f.active(rel):  # version_mismatch: the module was upgraded under us
                    return LIB_RM_VERSION_MISMATCH
        if self._init_drops:
            self._initialised(self._now())  # a drop due now happens before this init counts
        with self._lock:
            self._refcount += 1  # nvmlInit and nvmlShutdown are reference counted
        return SUCCESS

    @_nvml()
    def nvmlInit_v2(self) -> int:
        return self._init()

    @_nvml(c_uint)
    def nvmlInitWithFlags(self, flags: int) -> int:
        return self._init()

    @_nvml()
    def nvmlShutdown(self) -> int:
        with self._lock:
            if self._refcount <= 0:
                return UNINITIALIZED
            self._refcount -= 1
        return SUCCESS

    @_nvml(c_int, restype=c_void_p)
    def nvmlErrorString(self, code: int) -> int:
        # pynvml sets restype = c_char_p on this function; we return the address of a buffer
        # that lives as long as the driver, as the real library returns a static string.
        buf = self._err_bufs.get(code)
        if buf is None:
            text = pynvml.NVMLError._errcode_to_string.get(code, "Unknown Error")
            buf = ctypes.create_string_buffer(text.encode())
            self._err_bufs[code] = buf
        return ctypes.addressof(buf)

    @_nvml(c_void_p, c_uint)
    def nvmlSystemGetDriverVersion(self, buf: int | None, length: int) -> int:
        rc = self._initialised(self._now())
        return rc or _put_str(buf, length, self.node.driver_version)

    @_nvml(c_void_p, c_uint)
    def nvmlSystemGetNVMLVersion(self, buf: int | None, length: int) -> int:
        rc = self._initialised(self._now())
        major = self.node.cuda_driver_version // 1000
        return rc or _put_str(buf, length, f"{major}.{self.node.driver_version}")

    @_nvml(c_void_p)
    def nvmlSystemGetCudaDriverVersion(self, p: int | None) -> int:
        rc = self._initialised(self._now())
        if rc:
            return rc
        if not p:
            return INVALID_ARGUMENT
        c_int.from_address(p).value = self.node.cuda_driver_version
        return SUCCESS

    @_nvml(c_void_p)
    def nvmlSystemGetCudaDriverVersion_v2(self, p: int | None) -> int:
        return self.nvmlSystemGetCudaDriverVersion(p)

    # -- device identity -----------------------------------------------------------------------

    @_nvml(c_void_p)
    def nvmlDeviceGetCount_v2(self, p: int | None) -> int:
        rc = self._initialised(self._now())
        if rc:
            return rc
        if not p:
            return INVALID_ARGUMENT
        _put_uint(p, len(self.node.gpus))
        return SUCCESS

    @_nvml(c_uint, c_void_p)
    def nvmlDeviceGetHandleByIndex_v2(self, index: int, p: int | None) -> int:
        t = self._now()
        rc = self._initialised(t)
        if rc:
            return rc
        if index >= len(self.node.gpus) or not p:
            return INVALID_ARGUMENT
        # A lost GPU fails here already: nvidia-smi's "Unable to determine the device handle".
        rc = self._faults("nvmlDeviceGetHandleByIndex_v2", index, t)
        if rc:
            return rc
        _put_ptr(p, self.gpu_handle(index))
        return SUCCESS

    @_nvml(c_void_p, c_void_p, c_uint)
    def nvmlDeviceGetName(self, h: int | None, buf: int | None, length: int) -> int:
        dev = self._device("nvmlDeviceGetName", h, self._now())
        if isinstance(dev, int):
            return dev
        g, m = dev
        name = g.model.name if m is None else f"{g.model.name} {m.profile.name}"
        return _put_str(buf, length, name)

    @_nvml(c_void_p, c_void_p, c_uint)
    def nvmlDeviceGetUUID(self, h: int | None, buf: int | None, length: int) -> int:
        dev = self._device("nvmlDeviceGetUUID", h, self._now())
        if isinstance(dev, int):
            return dev
        g, m = dev
        return _put_str(buf, length, g.uuid if m is None else m.uuid)

    @_nvml(c_void_p, c_void_p, c_uint)
    def nvmlDeviceGetSerial(self, h: int | None, buf: int | None, length: int) -> int:
        r = self._gpu_only("nvmlDeviceGetSerial", h)
        return r if isinstance(r, int) else _put_str(buf, length, r[0].serial)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetPciInfo_v3(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetPciInfo_v3", h)
        if isinstance(r, int):
            return r
        if not p:
            return INVALID_ARGUMENT
        g = r[0]
        info = pynvml.nvmlPciInfo_t.from_address(p)
        info.busIdLegacy = f"0000:{g.pci_bus:02X}:00.0".encode()
        info.domain = 0
        info.bus = g.pci_bus
        info.device = 0
        info.pciDeviceId = g.model.pci_device_id
        info.pciSubSystemId = g.model.pci_subsystem_id
        info.busId = g.pci_bus_id.encode()
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetMinorNumber(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetMinorNumber", h)
        return r if isinstance(r, int) else self._out_uint(p, r[0].index)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetIndex(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetIndex", h)
        return r if isinstance(r, int) else self._out_uint(p, r[0].index)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetArchitecture(self, h: int | None, p: int | None) -> int:
        dev = self._device("nvmlDeviceGetArchitecture", h, self._now())
        return dev if isinstance(dev, int) else self._out_uint(p, dev[0].model.architecture)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetBrand(self, h: int | None, p: int | None) -> int:
        dev = self._device("nvmlDeviceGetBrand", h, self._now())
        return dev if isinstance(dev, int) else self._out_uint(p, dev[0].model.brand)

    @staticmethod
    def _out_uint(p: int | None, v: int) -> int:
        if not p:
            return INVALID_ARGUMENT
        _put_uint(p, v)
        return SUCCESS

    @staticmethod
    def _out_ull(p: int | None, v: int) -> int:
        if not p:
            return INVALID_ARGUMENT
        _put_ull(p, v)
        return SUCCESS

    # -- memory and utilization ----------------------------------------------------------------

    def _memory(self, fn: str, h: int | None, t: float) -> tuple[int, int, int, int] | int:
        """(total, reserved, used excluding reserved, free) in bytes for a GPU or MIG handle."""
        dev = self._device(fn, h, t)
        if isinstance(dev, int):
            return dev
        g, m = dev
        s: GpuState | MigState
        s = (
            self.gpu_state(g.index, t)
            if m is None
            else self.mig_state(g.index, m.gpu_instance_id, t)
        )
        return s.memory_total, s.memory_reserved, s.memory_used, s.memory_free

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetMemoryInfo(self, h: int | None, p: int | None) -> int:
        r = self._memory("nvmlDeviceGetMemoryInfo", h, self._now())
        if isinstance(r, int):
            return r
        if not p:
            return INVALID_ARGUMENT
        total, reserved, used, free = r
        mem = pynvml.c_nvmlMemory_t.from_address(p)
        # The v1 struct has no `reserved`: it is counted as used.
        mem.total, mem.free, mem.used = total, free, used + reserved
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetMemoryInfo_v2(self, h: int | None, p: int | None) -> int:
        r = self._memory("nvmlDeviceGetMemoryInfo_v2", h, self._now())
        if isinstance(r, int):
            return r
        if not p:
            return INVALID_ARGUMENT
        mem = pynvml.c_nvmlMemory_v2_t.from_address(p)
        if mem.version != _MEMORY_V2:
            return ARGUMENT_VERSION_MISMATCH
        mem.total, mem.reserved, mem.used, mem.free = r
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetUtilizationRates(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetUtilizationRates", h)
        if isinstance(r, int):
            return r
        g, t = r
        if g.mig_enabled:
            return NOT_SUPPORTED  # with MIG on, the driver has no whole-GPU utilization
        if not p:
            return INVALID_ARGUMENT
        s = self.gpu_state(g.index, t)
        u = pynvml.c_nvmlUtilization_t.from_address(p)
        u.gpu, u.memory = s.utilization_gpu, s.utilization_memory
        return SUCCESS

    def _codec(self, fn: str, h: int | None, p: int | None, period: int | None, enc: bool) -> int:
        r = self._gpu_only(fn, h)
        if isinstance(r, int):
            return r
        if r[0].mig_enabled:
            return NOT_SUPPORTED  # nvidia-smi shows N/A: media engines belong to the instances
        if not p or not period:
            return INVALID_ARGUMENT
        s = self.gpu_state(r[0].index, r[1])
        _put_uint(p, s.encoder_util if enc else s.decoder_util)
        _put_uint(period, 167000)  # microseconds, as current drivers report
        return SUCCESS

    @_nvml(c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetEncoderUtilization(self, h: int | None, p: int | None, per: int | None) -> int:
        return self._codec("nvmlDeviceGetEncoderUtilization", h, p, per, True)

    @_nvml(c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetDecoderUtilization(self, h: int | None, p: int | None, per: int | None) -> int:
        return self._codec("nvmlDeviceGetDecoderUtilization", h, p, per, False)

    # -- thermal, power, clocks ----------------------------------------------------------------

    def _state(self, fn: str, h: int | None) -> GpuState | int:
        r = self._gpu_only(fn, h)
        return r if isinstance(r, int) else self.gpu_state(r[0].index, r[1])

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetTemperature(self, h: int | None, sensor: int, p: int | None) -> int:
        s = self._state("nvmlDeviceGetTemperature", h)
        if isinstance(s, int):
            return s
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            return INVALID_ARGUMENT
        return self._out_uint(p, s.temperature_c)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetTemperatureV(self, h: int | None, p: int | None) -> int:
        s = self._state("nvmlDeviceGetTemperatureV", h)
        if isinstance(s, int):
            return s
        if not p:
            return INVALID_ARGUMENT
        st = pynvml.c_nvmlTemperature_v1_t.from_address(p)
        if st.version != _TEMPERATURE_V1:
            return ARGUMENT_VERSION_MISMATCH
        if st.sensorType != pynvml.NVML_TEMPERATURE_GPU:
            return INVALID_ARGUMENT
        st.temperature = s.temperature_c
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetPowerUsage(self, h: int | None, p: int | None) -> int:
        s = self._state("nvmlDeviceGetPowerUsage", h)
        return s if isinstance(s, int) else self._out_uint(p, s.power_mw)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetEnforcedPowerLimit(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetEnforcedPowerLimit", h)
        return r if isinstance(r, int) else self._out_uint(p, r[0].model.power_limit_w * 1000)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetPowerManagementLimit(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetPowerManagementLimit", h)
        return r if isinstance(r, int) else self._out_uint(p, r[0].model.power_limit_w * 1000)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetTotalEnergyConsumption(self, h: int | None, p: int | None) -> int:
        s = self._state("nvmlDeviceGetTotalEnergyConsumption", h)
        return s if isinstance(s, int) else self._out_ull(p, s.energy_mj)

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetClockInfo(self, h: int | None, kind: int, p: int | None) -> int:
        s = self._state("nvmlDeviceGetClockInfo", h)
        if isinstance(s, int):
            return s
        clocks = (s.graphics_clock_mhz, s.sm_clock_mhz, s.mem_clock_mhz, s.video_clock_mhz)
        return self._out_uint(p, clocks[kind]) if kind < 4 else INVALID_ARGUMENT

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetMaxClockInfo(self, h: int | None, kind: int, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetMaxClockInfo", h)
        if isinstance(r, int):
            return r
        m = r[0].model
        clocks = (m.max_sm_mhz, m.max_sm_mhz, m.max_mem_mhz, m.max_video_mhz)
        return self._out_uint(p, clocks[kind]) if kind < 4 else INVALID_ARGUMENT

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetFanSpeed(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetFanSpeed", h)
        if isinstance(r, int):
            return r
        # SXM modules and passive PCIe cards have no fan of their own.
        return NOT_SUPPORTED if not r[0].model.has_fan else self._out_uint(p, 30)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetNumFans(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetNumFans", h)
        return r if isinstance(r, int) else self._out_uint(p, 1 if r[0].model.has_fan else 0)

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetPcieThroughput(self, h: int | None, counter: int, p: int | None) -> int:
        s = self._state("nvmlDeviceGetPcieThroughput", h)
        if isinstance(s, int):
            return s
        if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES:
            return self._out_uint(p, s.pcie_tx_kbps)
        if counter == pynvml.NVML_PCIE_UTIL_RX_BYTES:
            return self._out_uint(p, s.pcie_rx_kbps)
        return INVALID_ARGUMENT

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetPcieReplayCounter(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetPcieReplayCounter", h)
        return r if isinstance(r, int) else self._out_uint(p, r[0].key % 3)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetPerformanceState(self, h: int | None, p: int | None) -> int:
        s = self._state("nvmlDeviceGetPerformanceState", h)
        return s if isinstance(s, int) else self._out_uint(p, s.pstate)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int | None, p: int | None) -> int:
        s = self._state("nvmlDeviceGetCurrentClocksEventReasons", h)
        return s if isinstance(s, int) else self._out_ull(p, s.clocks_event_reasons)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: int | None, p: int | None) -> int:
        s = self._state("nvmlDeviceGetCurrentClocksThrottleReasons", h)
        return s if isinstance(s, int) else self._out_ull(p, s.clocks_event_reasons)

    # -- ECC, retired pages, row remapping -----------------------------------------------------

    @_nvml(c_void_p, c_uint, c_uint, c_void_p)
    def nvmlDeviceGetTotalEccErrors(
        self, h: int | None, err: int, counter: int, p: int | None
    ) -> int:
        r = self._gpu_only("nvmlDeviceGetTotalEccErrors", h)
        if isinstance(r, int):
            return r
        if err > 1 or counter > 1:
            return INVALID_ARGUMENT
        key = r[0].key
        volatile = (key >> 8) % 4 if err == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else 0
        aggregate = volatile + ((key >> 16) % 21 if err == 0 else 0)
        return self._out_ull(p, volatile if counter == pynvml.NVML_VOLATILE_ECC else aggregate)

    @_nvml(c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetEccMode(self, h: int | None, cur: int | None, pend: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetEccMode", h)
        if isinstance(r, int):
            return r
        if not cur or not pend:
            return INVALID_ARGUMENT
        _put_uint(cur, pynvml.NVML_FEATURE_ENABLED)
        _put_uint(pend, pynvml.NVML_FEATURE_ENABLED)
        return SUCCESS

    # Ampere and later replace page retirement with row remapping.
    @_nvml(c_void_p, c_uint, c_void_p, c_void_p)
    def nvmlDeviceGetRetiredPages(self, h, cause, count, addrs) -> int:
        r = self._gpu_only("nvmlDeviceGetRetiredPages", h)
        return r if isinstance(r, int) else NOT_SUPPORTED

    @_nvml(c_void_p, c_uint, c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetRetiredPages_v2(self, h, cause, count, addrs, times) -> int:
        r = self._gpu_only("nvmlDeviceGetRetiredPages_v2", h)
        return r if isinstance(r, int) else NOT_SUPPORTED

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetRetiredPagesPendingStatus(self, h, p) -> int:
        r = self._gpu_only("nvmlDeviceGetRetiredPagesPendingStatus", h)
        return r if isinstance(r, int) else NOT_SUPPORTED

    @_nvml(c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetRemappedRows(self, h, corr, unc, pending, failure) -> int:
        r = self._gpu_only("nvmlDeviceGetRemappedRows", h)
        if isinstance(r, int):
            return r
        if not (corr and unc and pending and failure):
            return INVALID_ARGUMENT
        _put_uint(corr, (r[0].key >> 24) % 3)
        _put_uint(unc, 0)
        _put_uint(pending, 0)
        _put_uint(failure, 0)
        return SUCCESS

    # -- NVLink and field values ---------------------------------------------------------------

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetNvLinkState(self, h: int | None, link: int, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetNvLinkState", h)
        if isinstance(r, int):
            return r
        links = r[0].model.nvlink_links
        if links == 0:
            return NOT_SUPPORTED
        if link >= links:
            return INVALID_ARGUMENT
        return self._out_uint(p, pynvml.NVML_FEATURE_ENABLED)

    @_nvml(c_void_p, c_uint, c_uint, c_void_p)
    def nvmlDeviceGetNvLinkErrorCounter(
        self, h: int | None, link: int, counter: int, p: int | None
    ) -> int:
        r = self._gpu_only("nvmlDeviceGetNvLinkErrorCounter", h)
        if isinstance(r, int):
            return r
        links = r[0].model.nvlink_links
        if links == 0:
            return NOT_SUPPORTED
        if link >= links or counter >= pynvml.NVML_NVLINK_ERROR_COUNT:
            return INVALID_ARGUMENT
        replay = (
            _replay_errors(r[0].key, link) if counter == pynvml.NVML_NVLINK_ERROR_DL_REPLAY else 0
        )
        return self._out_ull(p, replay)

    @_nvml(c_void_p, c_int, c_void_p)
    def nvmlDeviceGetFieldValues(self, h: int | None, count: int, p: int | None) -> int:
        t = self._now()
        dev = self._device("nvmlDeviceGetFieldValues", h, t)
        if isinstance(dev, int):
            return dev
        if count < 0 or (count and not p):
            return INVALID_ARGUMENT
        g, m = dev
        values = (pynvml.c_nvmlFieldValue_t * count).from_address(p) if count else ()
        s = self.gpu_state(g.index, t) if m is None else None
        links = g.model.nvlink_links
        stamp = int(t * 1_000_000)
        for v in values:
            v.timestamp = stamp
            v.latencyUsec = 0
            fid = v.fieldId
            v.nvmlReturn = SUCCESS
            if s is None:
                v.nvmlReturn = NOT_SUPPORTED  # field values are per physical GPU
            elif fid == _FI_TOTAL_ENERGY:
                v.valueType = _VALUE_ULL
                v.value.ullVal = s.energy_mj
            elif fid == _FI_NVLINK_LINK_COUNT and links:
                v.valueType = _VALUE_UINT
                v.value.uiVal = links
            elif fid in (_FI_NVLINK_TX, _FI_NVLINK_RX) and links:
                total = s.nvlink_tx_kib if fid == _FI_NVLINK_TX else s.nvlink_rx_kib
                scope = v.scopeId
                v.valueType = _VALUE_ULL
                if scope == _UINT_MAX:
                    v.value.ullVal = total
                elif scope < links:
                    # Per-link shares that add up to the total exactly and never decrease.
                    v.value.ullVal = (total + scope) // links
                else:
                    v.nvmlReturn = INVALID_ARGUMENT
            elif fid in _FI_NVLINK_ERROR_TOTALS and links:
                v.valueType = _VALUE_ULL
                replays = sum(_replay_errors(g.key, link) for link in range(links))
                is_replay = fid == pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL
                v.value.ullVal = replays if is_replay else 0
            else:
                v.nvmlReturn = NOT_SUPPORTED
        return SUCCESS

    # -- MIG -----------------------------------------------------------------------------------

    @_nvml(c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetMigMode(self, h: int | None, cur: int | None, pend: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetMigMode", h)
        if isinstance(r, int):
            return r
        g = r[0]
        if not g.model.mig_capable:
            return NOT_SUPPORTED
        if not cur or not pend:
            return INVALID_ARGUMENT
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if g.mig_enabled else pynvml.NVML_DEVICE_MIG_DISABLE
        _put_uint(cur, mode)
        _put_uint(pend, mode)
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetMaxMigDeviceCount(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetMaxMigDeviceCount", h)
        if isinstance(r, int):
            return r
        # Zero when MIG is unsupported or disabled, as the real call documents.
        return self._out_uint(p, MIG_COMPUTE_SLICES if r[0].mig_enabled else 0)

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: int | None, index: int, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetMigDeviceHandleByIndex", h)
        if isinstance(r, int):
            return r
        g = r[0]
        if g.mig is None:
            return NOT_SUPPORTED if not g.model.mig_capable else INVALID_ARGUMENT
        if index >= MIG_COMPUTE_SLICES or not p:
            return INVALID_ARGUMENT
        if index >= len(g.mig):
            return NOT_FOUND
        _put_ptr(p, self.mig_handle(g.index, g.mig[index].gpu_instance_id))
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceIsMigDeviceHandle(self, h: int | None, p: int | None) -> int:
        dev = self._device("nvmlDeviceIsMigDeviceHandle", h, self._now())
        return dev if isinstance(dev, int) else self._out_uint(p, int(dev[1] is not None))

    def _mig_only(self, fn: str, h: int | None) -> tuple[SimGpu, SimMigInstance] | int:
        dev = self._device(fn, h, self._now())
        if isinstance(dev, int):
            return dev
        g, m = dev
        return NOT_SUPPORTED if m is None else (g, m)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: int | None, p: int | None) -> int:
        r = self._mig_only("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", h)
        if isinstance(r, int):
            return r
        if not p:
            return INVALID_ARGUMENT
        _put_ptr(p, self.gpu_handle(r[0].index))
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetGpuInstanceId(self, h: int | None, p: int | None) -> int:
        r = self._mig_only("nvmlDeviceGetGpuInstanceId", h)
        return r if isinstance(r, int) else self._out_uint(p, r[1].gpu_instance_id)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetComputeInstanceId(self, h: int | None, p: int | None) -> int:
        r = self._mig_only("nvmlDeviceGetComputeInstanceId", h)
        return r if isinstance(r, int) else self._out_uint(p, r[1].compute_instance_id)

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetAttributes_v2(self, h: int | None, p: int | None) -> int:
        r = self._mig_only("nvmlDeviceGetAttributes_v2", h)  # MIG device handles only
        if isinstance(r, int):
            return r
        if not p:
            return INVALID_ARGUMENT
        prof = r[1].profile
        a = pynvml.c_nvmlDeviceAttributes.from_address(p)
        a.multiprocessorCount = prof.multiprocessor_count
        a.sharedCopyEngineCount = prof.copy_engine_count
        a.sharedDecoderCount = prof.decoder_count
        a.sharedEncoderCount = prof.encoder_count
        a.sharedJpegCount = prof.jpeg_count
        a.sharedOfaCount = prof.ofa_count
        a.gpuInstanceSliceCount = prof.slice_count
        a.computeInstanceSliceCount = prof.slice_count
        a.memorySizeMB = prof.memory_size_mb
        return SUCCESS

    def _mig_gpu(self, fn: str, h: int | None) -> SimGpu | int:
        r = self._gpu_only(fn, h)
        if isinstance(r, int):
            return r
        return r[0] if r[0].model.mig_capable else NOT_SUPPORTED

    def _fill_profile(self, info: Any, prof: Any) -> None:
        info.id = prof.profile_id
        info.sliceCount = prof.slice_count
        info.instanceCount = prof.instance_count
        info.multiprocessorCount = prof.multiprocessor_count
        info.copyEngineCount = prof.copy_engine_count
        info.decoderCount = prof.decoder_count
        info.encoderCount = prof.encoder_count
        info.jpegCount = prof.jpeg_count
        info.ofaCount = prof.ofa_count
        info.memorySizeMB = prof.memory_size_mb

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetGpuInstanceProfileInfo(self, h: int | None, index: int, p: int | None) -> int:
        g = self._mig_gpu("nvmlDeviceGetGpuInstanceProfileInfo", h)
        if isinstance(g, int):
            return g
        prof = g.model.profile_by_index(index)
        if prof is None:
            return (
                NOT_SUPPORTED
                if index < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT
                else INVALID_ARGUMENT
            )
        if not p:
            return INVALID_ARGUMENT
        info = pynvml.c_nvmlGpuInstanceProfileInfo_t.from_address(p)
        self._fill_profile(info, prof)
        info.isP2pSupported = 0
        return SUCCESS

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetGpuInstanceProfileInfoV(self, h: int | None, index: int, p: int | None) -> int:
        g = self._mig_gpu("nvmlDeviceGetGpuInstanceProfileInfoV", h)
        if isinstance(g, int):
            return g
        if not p:
            return INVALID_ARGUMENT
        version = c_uint.from_address(p).value
        info: Any
        if version == _GI_PROFILE_INFO_V2:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t.from_address(p)
        elif version == _GI_PROFILE_INFO_V3:
            info = _GpuInstanceProfileInfoV3.from_address(p)
        else:
            return ARGUMENT_VERSION_MISMATCH
        prof = g.model.profile_by_index(index)
        if prof is None:
            return (
                NOT_SUPPORTED
                if index < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT
                else INVALID_ARGUMENT
            )
        self._fill_profile(info, prof)
        if version == _GI_PROFILE_INFO_V2:
            info.isP2pSupported = 0
        else:
            info.capabilities = 0
        info.name = prof.name.encode()
        return SUCCESS

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetGpuInstanceRemainingCapacity(
        self, h: int | None, profile_id: int, p: int | None
    ) -> int:
        g = self._mig_gpu("nvmlDeviceGetGpuInstanceRemainingCapacity", h)
        if isinstance(g, int):
            return g
        if g.mig is None:
            return NOT_SUPPORTED
        prof = g.model.profile_by_id(profile_id)
        if prof is None:
            return INVALID_ARGUMENT
        return self._out_uint(p, remaining_capacity(prof, [m.placement for m in g.mig]))

    @_nvml(c_void_p, c_uint, c_void_p, c_void_p)
    def nvmlDeviceGetGpuInstances(
        self, h: int | None, profile_id: int, arr: int | None, p_count: int | None
    ) -> int:
        g = self._mig_gpu("nvmlDeviceGetGpuInstances", h)
        if isinstance(g, int):
            return g
        if g.mig is None:
            return NOT_SUPPORTED
        prof = g.model.profile_by_id(profile_id)
        if prof is None or not p_count:
            return INVALID_ARGUMENT
        # The caller sizes the array for the profile's instanceCount; we write that many at most.
        found = [m for m in g.mig if m.profile.profile_id == profile_id]
        if found and not arr:
            return INVALID_ARGUMENT
        base = arr or 0
        for i, m in enumerate(found):
            _put_ptr(
                base + i * ctypes.sizeof(c_void_p), _GI_BASE + g.index * 256 + m.gpu_instance_id
            )
        _put_uint(p_count, len(found))
        return SUCCESS

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlDeviceGetGpuInstanceById(self, h: int | None, gi_id: int, p: int | None) -> int:
        g = self._mig_gpu("nvmlDeviceGetGpuInstanceById", h)
        if isinstance(g, int):
            return g
        if g.mig is None:
            return NOT_SUPPORTED
        if not p:
            return INVALID_ARGUMENT
        if g.instance(gi_id) is None:
            return NOT_FOUND
        _put_ptr(p, _GI_BASE + g.index * 256 + gi_id)
        return SUCCESS

    def _gi(self, fn: str, gi: int | None) -> tuple[SimGpu, SimMigInstance] | int:
        t = self._now()
        rc = self._initialised(t)
        if rc:
            return rc
        r = self._gis.get(gi) if gi else None
        if r is None:
            return INVALID_ARGUMENT
        rc = self._faults(fn, r[0].index, t)
        return rc if rc else r

    @_nvml(c_void_p, c_void_p)
    def nvmlGpuInstanceGetInfo(self, gi: int | None, p: int | None) -> int:
        r = self._gi("nvmlGpuInstanceGetInfo", gi)
        if isinstance(r, int):
            return r
        if not p:
            return INVALID_ARGUMENT
        g, m = r
        cls = pynvml.c_nvmlGpuInstanceInfo_t
        _put_ptr(p + cls.device.offset, self.gpu_handle(g.index))
        info = cls.from_address(p)
        info.id = m.gpu_instance_id
        info.profileId = m.profile.profile_id
        info.placement.start = m.placement.start
        info.placement.size = m.profile.memory_slices
        return SUCCESS

    def _ci_profile_fill(self, info: Any, m: SimMigInstance) -> None:
        prof = m.profile
        info.id = prof.compute_profile_index
        info.sliceCount = prof.slice_count
        info.instanceCount = 1
        info.multiprocessorCount = prof.multiprocessor_count
        info.sharedCopyEngineCount = prof.copy_engine_count
        info.sharedDecoderCount = prof.decoder_count
        info.sharedEncoderCount = prof.encoder_count
        info.sharedJpegCount = prof.jpeg_count
        info.sharedOfaCount = prof.ofa_count

    def _ci_profile(self, fn: str, gi: int | None, profile: int, eng: int) -> SimMigInstance | int:
        r = self._gi(fn, gi)
        if isinstance(r, int):
            return r
        if eng != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
            return INVALID_ARGUMENT
        # Only the compute profile spanning the whole GPU instance is modelled.
        if profile != r[1].profile.compute_profile_index:
            return NOT_SUPPORTED
        return r[1]

    @_nvml(c_void_p, c_uint, c_uint, c_void_p)
    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self, gi: int | None, profile: int, eng: int, p: int | None
    ) -> int:
        m = self._ci_profile("nvmlGpuInstanceGetComputeInstanceProfileInfo", gi, profile, eng)
        if isinstance(m, int):
            return m
        if not p:
            return INVALID_ARGUMENT
        self._ci_profile_fill(pynvml.c_nvmlComputeInstanceProfileInfo_t.from_address(p), m)
        return SUCCESS

    @_nvml(c_void_p, c_uint, c_uint, c_void_p)
    def nvmlGpuInstanceGetComputeInstanceProfileInfoV(
        self, gi: int | None, profile: int, eng: int, p: int | None
    ) -> int:
        m = self._ci_profile("nvmlGpuInstanceGetComputeInstanceProfileInfoV", gi, profile, eng)
        if isinstance(m, int):
            return m
        if not p:
            return INVALID_ARGUMENT
        info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t.from_address(p)
        if info.version != _CI_PROFILE_INFO_V2:
            return ARGUMENT_VERSION_MISMATCH
        self._ci_profile_fill(info, m)
        # The compute profile spanning the whole GI carries the GI's own name.
        info.name = m.profile.name.encode()
        return SUCCESS

    @_nvml(c_void_p, c_uint, c_void_p, c_void_p)
    def nvmlGpuInstanceGetComputeInstances(
        self, gi: int | None, profile: int, arr: int | None, p_count: int | None
    ) -> int:
        r = self._gi("nvmlGpuInstanceGetComputeInstances", gi)
        if isinstance(r, int):
            return r
        if not p_count:
            return INVALID_ARGUMENT
        g, m = r
        n = 1 if profile == m.profile.compute_profile_index else 0
        if n:
            if not arr:
                return INVALID_ARGUMENT
            _put_ptr(arr, _CI_BASE + g.index * 256 + m.gpu_instance_id)
        _put_uint(p_count, n)
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlComputeInstanceGetInfo_v2(self, ci: int | None, p: int | None) -> int:
        t = self._now()
        rc = self._initialised(t)
        if rc:
            return rc
        r = self._cis.get(ci) if ci else None
        if r is None or not p:
            return INVALID_ARGUMENT
        g, m = r
        rc = self._faults("nvmlComputeInstanceGetInfo_v2", g.index, t)
        if rc:
            return rc
        cls = pynvml.c_nvmlComputeInstanceInfo_t
        _put_ptr(p + cls.device.offset, self.gpu_handle(g.index))
        _put_ptr(p + cls.gpuInstance.offset, _GI_BASE + g.index * 256 + m.gpu_instance_id)
        info = cls.from_address(p)
        info.id = m.compute_instance_id
        info.profileId = m.profile.compute_profile_index
        info.placement.start = 0
        info.placement.size = m.profile.slice_count
        return SUCCESS

    # -- processes -----------------------------------------------------------------------------

    def running_processes(self, t: float | None = None) -> list[ProcessState]:
        """The node's GPU processes at t (default: now), from the fleet's pods; cached per t."""
        t = self._now() if t is None else t
        hit = self._process_cache
        if hit is not None and hit[0] == t:
            return hit[1]
        procs = processes_at(
            self.fleet,
            self.node.name,
            t,
            gpu_state=lambda index, at: self.gpu_state(index, at),
            mig_state=lambda index, gi, at: self.mig_state(index, gi, at),
        )
        self._process_cache = (t, procs)
        return procs

    def _processes(
        self, fn: str, h: int | None, p_count: int | None, arr: int | None, kind: str
    ) -> int:
        t = self._now()
        dev = self._device(fn, h, t)
        if isinstance(dev, int):
            return dev
        if not p_count:
            return INVALID_ARGUMENT
        g, m = dev
        # A MIG handle lists its instance's processes; the parent lists all, with GI/CI ids
        # (UINT_MAX for processes on a GPU without MIG).
        procs = [
            (
                p.pid,
                p.memory_bytes,
                _UINT_MAX if p.gpu_instance is None else p.gpu_instance,
                _UINT_MAX if p.gpu_instance is None else 0,
            )
            for p in self.running_processes(t)
            if p.kind == kind
            and p.gpu == g.index
            and (m is None or p.gpu_instance == m.gpu_instance_id)
        ]
        capacity = c_uint.from_address(p_count).value
        _put_uint(p_count, len(procs))
        if not procs:
            return SUCCESS  # no array needed: the size query answers SUCCESS with 0
        if not arr or capacity < len(procs):
            return INSUFFICIENT_SIZE
        out = (pynvml.c_nvmlProcessInfo_v3_t * len(procs)).from_address(arr)
        for slot, (pid, mem, gi, ci) in zip(out, procs, strict=False):
            slot.pid, slot.usedGpuMemory, slot.gpuInstanceId, slot.computeInstanceId = (
                pid,
                mem,
                gi,
                ci,
            )
        return SUCCESS

    @_nvml(c_void_p, c_void_p, c_void_p, c_ulonglong)
    def nvmlDeviceGetProcessUtilization(
        self, h: int | None, arr: int | None, p_count: int | None, last_seen: int
    ) -> int:
        """Per-process utilization samples newer than `last_seen` (microseconds).

        Like the real driver: NOT_SUPPORTED on MIG, NOT_FOUND when no process was active in
        the window, INSUFFICIENT_SIZE with the count when asked without a buffer.
        """
        t = self._now()
        r = self._gpu_only("nvmlDeviceGetProcessUtilization", h)
        if isinstance(r, int):
            return r
        g = r[0]
        if g.mig_enabled:
            return NOT_SUPPORTED
        if not p_count:
            return INVALID_ARGUMENT
        stamp = int(t * 1_000_000)
        samples = [p for p in self.running_processes(t) if p.gpu == g.index and stamp > last_seen]
        if not samples:
            return NOT_FOUND
        capacity = c_uint.from_address(p_count).value
        _put_uint(p_count, len(samples))
        if not arr or capacity < len(samples):
            return INSUFFICIENT_SIZE
        out = (pynvml.c_nvmlProcessUtilizationSample_t * len(samples)).from_address(arr)
        for slot, p in zip(out, samples, strict=False):
            slot.pid, slot.timeStamp = p.pid, stamp
            slot.smUtil, slot.memUtil = p.sm_util, p.memory_util
            slot.encUtil, slot.decUtil = p.encoder_util, p.decoder_util
        return SUCCESS

    @_nvml(c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetComputeRunningProcesses_v3(self, h, p_count, arr) -> int:
        return self._processes(
            "nvmlDeviceGetComputeRunningProcesses_v3", h, p_count, arr, "compute"
        )

    @_nvml(c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, h, p_count, arr) -> int:
        return self._processes(
            "nvmlDeviceGetGraphicsRunningProcesses_v3", h, p_count, arr, "graphics"
        )

    @_nvml(c_void_p, c_void_p, c_void_p)
    def nvmlDeviceGetMPSComputeRunningProcesses_v3(self, h, p_count, arr) -> int:
        return self._processes("nvmlDeviceGetMPSComputeRunningProcesses_v3", h, p_count, arr, "mps")

    # -- events --------------------------------------------------------------------------------

    @_nvml(c_void_p, c_void_p)
    def nvmlDeviceGetSupportedEventTypes(self, h: int | None, p: int | None) -> int:
        r = self._gpu_only("nvmlDeviceGetSupportedEventTypes", h)
        return r if isinstance(r, int) else self._out_ull(p, _EVENTS_SUPPORTED)

    @_nvml(c_void_p)
    def nvmlEventSetCreate(self, p: int | None) -> int:
        rc = self._initialised(self._now())
        if rc:
            return rc
        if not p:
            return INVALID_ARGUMENT
        handle = self._new_handle(_EVT_BASE)
        with self._lock:
            self._event_sets[handle] = _EventSet()
        _put_ptr(p, handle)
        return SUCCESS

    @_nvml(c_void_p, c_ulonglong, c_void_p)
    def nvmlDeviceRegisterEvents(self, h: int | None, types: int, es: int | None) -> int:
        r = self._gpu_only("nvmlDeviceRegisterEvents", h)
        if isinstance(r, int):
            return r
        s = self._event_sets.get(es) if es else None
        if s is None:
            return INVALID_ARGUMENT
        if types & ~_EVENTS_SUPPORTED:
            return NOT_SUPPORTED
        with self._lock:
            s.devices[r[0].index] = s.devices.get(r[0].index, 0) | types
        return SUCCESS

    def _next_event(self, s: _EventSet, t: float) -> tuple[int, Fault] | None:
        rel = t - self.fault_origin
        with self._lock:
            for i, f in self._xids:
                if i in self._xid_delivered or f.gpu is None or rel < f.at:
                    continue
                if s.devices.get(f.gpu, 0) & _EVENT_XID:
                    self._xid_delivered.add(i)  # each XID is delivered once
                    return i, f
        return None

    @_nvml(c_void_p, c_void_p, c_uint)
    def nvmlEventSetWait_v2(self, es: int | None, p: int | None, timeout_ms: int) -> int:
        rc = self._initialised(self._now())
        if rc:
            return rc
        s = self._event_sets.get(es) if es else None
        if s is None or not p:
            return INVALID_ARGUMENT
        if self._gpu_faults:
            # error and hang faults on nvmlEventSetWait_v2 apply to sets their GPU is in
            t = self._now()
            for gpu in list(s.devices):
                rc = self._call_faults("nvmlEventSetWait_v2", gpu, t)
                if rc:
                    return rc
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            ev = self._next_event(s, self._now())
            if ev is not None:
                f = ev[1]
                assert f.gpu is not None and f.xid is not None
                cls = pynvml.c_nvmlEventData_t
                _put_ptr(p + cls.device.offset, self.gpu_handle(f.gpu))
                data = cls.from_address(p)
                data.eventType = _EVENT_XID
                data.eventData = f.xid
                data.gpuInstanceId = _UINT_MAX  # not specific to a MIG instance
                data.computeInstanceId = _UINT_MAX
                return SUCCESS
            if time.monotonic() >= deadline or self._closed.is_set():
                return TIMEOUT
            self._closed.wait(min(_POLL_S, max(0.0, deadline - time.monotonic())))

    @_nvml(c_void_p)
    def nvmlEventSetFree(self, es: int | None) -> int:
        rc = self._initialised(self._now())
        if rc:
            return rc
        with self._lock:
            if not es or self._event_sets.pop(es, None) is None:
                return INVALID_ARGUMENT
        return SUCCESS

    # -- GPM -----------------------------------------------------------------------------------

    @_nvml(c_void_p, c_void_p)
    def nvmlGpmQueryDeviceSupport(self, h: int | None, p: int | None) -> int:
        dev = self._device("nvmlGpmQueryDeviceSupport", h, self._now())
        if isinstance(dev, int):
            return dev
        if not p:
            return INVALID_ARGUMENT
        sup = pynvml.c_nvmlGpmSupport_t.from_address(p)
        if sup.version != _GPM_SUPPORT_VERSION:
            return ARGUMENT_VERSION_MISMATCH
        sup.isSupportedDevice = int(dev[0].model.gpm)  # Hopper and later (Ada here too)
        return SUCCESS

    @_nvml(c_void_p)
    def nvmlGpmSampleAlloc(self, p: int | None) -> int:
        rc = self._initialised(self._now())
        if rc:
            return rc
        if not p:
            return INVALID_ARGUMENT
        handle = self._new_handle(_GPM_BASE)
        with self._lock:
            self._gpm_samples[handle] = None
        _put_ptr(p, handle)
        return SUCCESS

    @_nvml(c_void_p)
    def nvmlGpmSampleFree(self, sample: int | None) -> int:
        with self._lock:
            if not sample or sample not in self._gpm_samples:
                return INVALID_ARGUMENT
            del self._gpm_samples[sample]
        return SUCCESS

    def _gpm_take(self, fn: str, h: int | None, gi: int | None, sample: int | None) -> int:
        t = self._now()
        dev = self._device(fn, h, t)
        if isinstance(dev, int):
            return dev
        g, m = dev
        if not g.model.gpm:
            return NOT_SUPPORTED
        if not sample or sample not in self._gpm_samples:
            return INVALID_ARGUMENT
        if m is not None:
            gi = m.gpu_instance_id  # a MIG device handle samples its own instance
        instance = g.instance(gi) if gi is not None else None
        if gi is not None and instance is None:
            return INVALID_ARGUMENT
        with self._lock:
            # The instance's key tells a re-created GPU instance from the one it replaced.
            self._gpm_samples[sample] = (
                g.index,
                gi,
                t,
                g.key if instance is None else instance.key,
            )
        return SUCCESS

    @_nvml(c_void_p, c_void_p)
    def nvmlGpmSampleGet(self, h: int | None, sample: int | None) -> int:
        return self._gpm_take("nvmlGpmSampleGet", h, None, sample)

    @_nvml(c_void_p, c_uint, c_void_p)
    def nvmlGpmMigSampleGet(self, h: int | None, gi: int, sample: int | None) -> int:
        r = self._gpu_only("nvmlGpmMigSampleGet", h)
        if isinstance(r, int):
            return r
        if not r[0].model.gpm:
            return NOT_SUPPORTED
        if r[0].mig is None:
            return NOT_SUPPORTED
        return self._gpm_take("nvmlGpmMigSampleGet", h, gi, sample)

    @_nvml(c_void_p)
    def nvmlGpmMetricsGet(self, p: int | None) -> int:
        t = self._now()
        rc = self._initialised(t)
        if rc:
            return rc
        if not p:
            return INVALID_ARGUMENT
        cls = pynvml.c_nvmlGpmMetricsGet_t
        mg = cls.from_address(p)
        if mg.version != _GPM_METRICS_GET_VERSION:
            return ARGUMENT_VERSION_MISMATCH
        if mg.numMetrics > pynvml.NVML_GPM_METRIC_MAX:
            return INVALID_ARGUMENT
        s1 = c_void_p.from_address(p + cls.sample1.offset).value
        s2 = c_void_p.from_address(p + cls.sample2.offset).value
        a = self._gpm_samples.get(s1) if s1 else None
        b = self._gpm_samples.get(s2) if s2 else None
        # Both samples must be filled, from the same device or instance, sample1 first.
        if a is None or b is None or a[:2] != b[:2] or a[3] != b[3] or b[2] < a[2]:
            return INVALID_ARGUMENT
        if a[1] is not None:
            instance = self.node.gpus[a[0]].instance(a[1])
            if instance is None or instance.key != a[3]:
                return NOT_FOUND  # the GPU instance was destroyed since the samples were taken
        rc = self._faults("nvmlGpmMetricsGet", a[0], t)
        if rc:
            return rc
        values = self.fleet.gpm_metrics(self.node.name, a[0], a[1], a[2], b[2])
        info_off = pynvml.c_nvmlGpmMetric_t.metricInfo.offset
        for i in range(mg.numMetrics):
            metric = mg.metrics[i]
            v = values.get(metric.metricId)
            if v is None:
                metric.nvmlReturn = NOT_SUPPORTED
                continue
            metric.nvmlReturn = SUCCESS
            metric.value = v
            base = ctypes.addressof(metric) + info_off
            for j, buf in enumerate(_GPM_INFO_BUFS[metric.metricId]):
                _put_ptr(base + j * ctypes.sizeof(c_void_p), ctypes.addressof(buf))
        return SUCCESS


# Functions that answer like another one (the deprecated "throttle" name is the same call).
_ALIASES: dict[str, str] = {}

FUNCTION_NAMES: frozenset[str] = frozenset(
    name
    for name in dir(SimulatedDriver)
    if name.startswith("nvml") and hasattr(getattr(SimulatedDriver, name), "_nvml_sig")
) | frozenset(_ALIASES)

_current: SimulatedDriver | None = None
_install_lock = threading.Lock()


def install(
    fleet: Fleet,
    node: str,
    clock: Clock | None = None,
    *,
    fault_origin: float | None = None,
    resolution: float | None = None,
) -> SimulatedDriver:
    """Make pynvml talk to a simulated driver for one node of the fleet.

    Fault times count from `fault_origin` (default: the clock's time now). `resolution`
    floors the times answers are computed for (default: 0.05 s on a WallClock, exact on any
    other clock). A driver already installed is uninstalled first. Returns the driver, which
    also answers ground truth.
    """
    global _current
    clock = clock or WallClock()
    if resolution is None:
        resolution = 0.05 if isinstance(clock, WallClock) else 0.0
    driver = SimulatedDriver(fleet, node, clock, fault_origin, resolution)
    fleet.warm(node, clock.now())
    with _install_lock:
        if _current is not None:
            _current._released.set()
            _current._closed.set()
        with pynvml.libLoadLock:
            pynvml.nvmlLib = driver.lib
            pynvml._nvmlGetFunctionPointer_cache.clear()
        _current = driver
    return driver


def uninstall() -> None:
    """Detach the simulated driver: pynvml is left as if no library were loaded."""
    global _current
    with _install_lock:
        if _current is not None:
            _current._released.set()  # nothing may stay blocked in a callback
            _current._closed.set()
        _current = None
        with pynvml.libLoadLock:
            pynvml.nvmlLib = None
            pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml._nvmlLib_refcount = 0


def _replay_errors(gpu_key: int, link: int) -> int:
    """The (constant, small) replay error count of one simulated NVLink link."""
    return (gpu_key >> (link % 48)) % 2
