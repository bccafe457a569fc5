"""The one module that talks to NVML.

Everything the exporter learns from the driver goes through `Nvml.read`, which classifies
each failure (not supported, no permission, GPU lost, function missing in this driver, driver
gone, unknown), counts it, and remembers calls a GPU never supports so they are not retried
every cycle. What never changes (name, UUID, PCI bus id, memory total, MIG profiles) is read
once per enumeration. Versioned functions are probed once and the working variant remembered.

The same code serves a real driver and the simulated one in `exporter.simulator`, which sits
below pynvml at the C-function boundary.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pynvml

LABEL_VALUE_MAX = 128

# NVML selectors, field ids and bit masks the collectors pass to `Nvml.read`, re-exported here
# so that no other module of the exporter imports pynvml.
NVML_TEMPERATURE_GPU: int = pynvml.NVML_TEMPERATURE_GPU
NVML_CLOCK_SM: int = pynvml.NVML_CLOCK_SM
NVML_CLOCK_MEM: int = pynvml.NVML_CLOCK_MEM
NVML_PCIE_UTIL_TX_BYTES: int = pynvml.NVML_PCIE_UTIL_TX_BYTES
NVML_PCIE_UTIL_RX_BYTES: int = pynvml.NVML_PCIE_UTIL_RX_BYTES
NVML_PSTATE_UNKNOWN: int = pynvml.NVML_PSTATE_UNKNOWN
NVML_FEATURE_ENABLED: int = pynvml.NVML_FEATURE_ENABLED
NVML_SUCCESS: int = pynvml.NVML_SUCCESS
NVML_MEMORY_ERROR_TYPE_CORRECTED: int = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
NVML_MEMORY_ERROR_TYPE_UNCORRECTED: int = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
NVML_VOLATILE_ECC: int = pynvml.NVML_VOLATILE_ECC
NVML_RETIRED_SINGLE_BIT: int = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
NVML_RETIRED_DOUBLE_BIT: int = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
NVML_FI_NVLINK_TX: int = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
NVML_FI_NVLINK_RX: int = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX
NVML_FI_NVLINK_CRC_FLIT_TOTAL: int = pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL
NVML_FI_NVLINK_CRC_DATA_TOTAL: int = pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL
NVML_FI_NVLINK_REPLAY_TOTAL: int = pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL
NVML_FI_NVLINK_RECOVERY_TOTAL: int = pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL
NVML_GPM_SM_UTIL: int = pynvml.NVML_GPM_METRIC_SM_UTIL
NVML_GPM_GRAPHICS_UTIL: int = pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL
#: Clock-event (throttle) reason bits, by the names the alert rules and dashboards use.
CLOCK_EVENT_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", pynvml.nvmlClocksEventReasonGpuIdle),
    ("applications_clocks_setting", pynvml.nvmlClocksEventReasonApplicationsClocksSetting),
    ("sw_power_cap", pynvml.nvmlClocksEventReasonSwPowerCap),
    ("hw_slowdown", pynvml.nvmlClocksEventReasonHwSlowdown),
    ("sync_boost", pynvml.nvmlClocksEventReasonSyncBoost),
    ("sw_thermal_slowdown", pynvml.nvmlClocksEventReasonSwThermalSlowdown),
    ("hw_thermal_slowdown", pynvml.nvmlClocksEventReasonHwThermalSlowdown),
    ("hw_power_brake_slowdown", pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown),
    ("display_clock_setting", pynvml.nvmlClocksEventReasonDisplayClockSetting),
)


class ErrorKind(enum.StrEnum):
    NOT_SUPPORTED = "not_supported"
    NO_PERMISSION = "no_permission"
    GPU_LOST = "gpu_lost"
    FUNCTION_NOT_FOUND = "function_not_found"
    NOT_FOUND = "not_found"
    DRIVER = "driver"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"


_KIND_BY_CODE = {
    pynvml.NVML_ERROR_NOT_SUPPORTED: ErrorKind.NOT_SUPPORTED,
    pynvml.NVML_ERROR_NO_PERMISSION: ErrorKind.NO_PERMISSION,
    pynvml.NVML_ERROR_GPU_IS_LOST: ErrorKind.GPU_LOST,
    pynvml.NVML_ERROR_RESET_REQUIRED: ErrorKind.GPU_LOST,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: ErrorKind.FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NOT_FOUND: ErrorKind.NOT_FOUND,
    pynvml.NVML_ERROR_UNINITIALIZED: ErrorKind.DRIVER,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: ErrorKind.DRIVER,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: ErrorKind.DRIVER,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: ErrorKind.DRIVER,
    pynvml.NVML_ERROR_TIMEOUT: ErrorKind.TIMEOUT,
}

#: What NVML answers for a MIG slot with no instance in it.
_EMPTY_SLOT = frozenset({ErrorKind.NOT_FOUND})
#: Kinds that will not change until the GPU is enumerated again: stop asking.
_STABLE_KINDS = frozenset({ErrorKind.NOT_SUPPORTED, ErrorKind.FUNCTION_NOT_FOUND})

_STARTUP_HINTS = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        "libnvidia-ml.so.1 was not found: check that the NVIDIA driver is installed on the "
        "node and that the container runtime mounts it (NVIDIA container toolkit, "
        "runtimeClassName: nvidia), or run with --simulate FLEET.yaml"
    ),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (
        "the NVIDIA kernel driver is not loaded: check `lsmod | grep nvidia` and dmesg on the node"
    ),
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "libnvidia-ml and the loaded kernel driver have different versions: reboot the node or "
        "reload the driver after an upgrade"
    ),
    pynvml.NVML_ERROR_NO_PERMISSION: (
        "no permission to open the GPU device files: check /dev/nvidia* permissions and the "
        "container's device access"
    ),
}


def classify(error: pynvml.NVMLError) -> ErrorKind:
    """Sort an NVML error into the kinds the exporter treats differently."""
    return _KIND_BY_CODE.get(error.value, ErrorKind.UNKNOWN)


class NvmlStartupError(RuntimeError):
    """NVML cannot be opened; the message is one line that says what to check."""


class GpuLostError(RuntimeError):
    """The GPU fell off the bus or needs a reset; skip the rest of its reads this cycle."""


class NvmlDownError(RuntimeError):
    """NVML itself stopped answering (driver unloaded, version mismatch): re-initialise."""


def bounded_label(value: object) -> str:
    """A label value safe to publish: text, printable, at most LABEL_VALUE_MAX characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return text[:LABEL_VALUE_MAX]


def handle_address(handle: Any) -> int:
    """The C pointer value of an NVML handle, to recognise it in event data."""
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


@dataclass
class MigInstance:
    """A MIG device (one compute instance in one GPU instance) as NVML enumerates it."""

    handle: Any
    parent: Gpu
    uuid: str
    gpu_instance: int
    compute_instance: int
    #: As nvidia-smi shows it, compute-instance share included ("1c.3g.40gb").
    profile: str
    #: The GPU-instance profile alone ("3g.40gb"), what MIG capacity is counted in.
    gpu_instance_profile: str
    memory_total_bytes: int | None
    labels: tuple[str, ...]


@dataclass(frozen=True)
class MigProfile:
    """A GPU-instance profile the GPU offers: its driver id, short name and capacity."""

    profile_id: int
    name: str
    capacity: int
    slices: int


@dataclass
class Gpu:
    """A physical GPU and what never changes about it while it stays enumerated."""

    index: int
    handle: Any
    uuid: str
    model: str
    pci_bus_id: str
    labels: tuple[str, ...]
    gpm_supported: bool
    nvlink_links: tuple[int, ...]
    mig_profiles: tuple[MigProfile, ...]
    unsupported: set[tuple[str, tuple[Any, ...]]] = field(default_factory=set)  # _support_key
    #: MIG identities by MIG UUID, so a stable layout costs one call per instance per cycle.
    mig_cache: dict[str, MigInstance] = field(default_factory=dict)
    #: The MIG mode last read; when it changes, what "not supported" meant changes too.
    mig_mode: bool | None = None

    @property
    def address(self) -> int:
        return handle_address(self.handle)


@dataclass(frozen=True)
class SystemInfo:
    driver_version: str
    cuda_driver_version: str


class Nvml:
    """An open NVML session: enumeration, guarded reads, and the error tally."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.initialised = False
        self._errors: Counter[tuple[str, str]] = Counter()
        self._errors_lock = threading.Lock()
        self._variant: dict[str, str] = {}
        #: The NVML function each thread is inside right now (removed when the call returns),
        #: to name the call when one hangs.
        self.in_flight: dict[int, str] = {}
        #: GPU indices NVML counts but could not hand out a handle for at the last
        #: enumeration (lost at start-up): probed again every cycle, see `missing_came_back`.
        self.missing: tuple[int, ...] = ()

    # -- lifecycle ---------------------------------------------------------------------------
    def init(self) -> None:
        """Open NVML, or raise NvmlStartupError with a one-line hint."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            hint = _STARTUP_HINTS.get(error.value, "check the NVIDIA driver on this node")
            raise NvmlStartupError(f"cannot initialise NVML ({error}): {hint}") from error
        self.initialised = True

    def shutdown(self) -> bool:
        """Close NVML so a driver upgrade or GPU reset is not blocked by this process.

        True when nvmlShutdown succeeded (it is reference counted: one per successful init).
        """
        if not self.initialised:
            return False
        self.initialised = False
        try:
            self._call("nvmlShutdown", pynvml.nvmlShutdown)
        except pynvml.NVMLError:
            return False
        return True

    def reset(self) -> None:
        """Drop our reference after NVML stopped answering, before initialising again.

        A library that lost its initialisation (driver unloaded) answers UNINITIALIZED, which
        is ignored; one that only failed a call still holds our reference, which nvmlInit
        would otherwise count twice, and then nvmlShutdown at exit would not close it.
        """
        self.initialised = False
        with contextlib.suppress(pynvml.NVMLError):
            self._call("nvmlShutdown", pynvml.nvmlShutdown)

    def _call(self, function: str, call: Any, *args: Any) -> Any:
        """Run one NVML call with `in_flight` naming it while it runs."""
        ident = threading.get_ident()
        self.in_flight[ident] = function
        try:
            return call(*args)
        finally:
            self.in_flight.pop(ident, None)

    def system_info(self) -> SystemInfo:
        driver = self._system_call("nvmlSystemGetDriverVersion")
        cuda = self._system_call("nvmlSystemGetCudaDriverVersion_v2")
        if cuda is None:
            cuda = self._system_call("nvmlSystemGetCudaDriverVersion")
        cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else ""
        return SystemInfo(bounded_label(driver or ""), cuda_text)

    # -- error accounting --------------------------------------------------------------------
    def count_error(self, function: str, kind: ErrorKind) -> None:
        with self._errors_lock:
            self._errors[(function, kind.value)] += 1

    def error_counts(self) -> dict[tuple[str, str], int]:
        with self._errors_lock:
            return dict(self._errors)

    def _system_call(self, function: str, *args: Any) -> Any:
        try:
            return self._call(function, getattr(pynvml, function), *args)
        except pynvml.NVMLError as error:
            kind = classify(error)
            self.count_error(function, kind)
            if kind is ErrorKind.DRIVER:
                raise NvmlDownError(str(error)) from error
            return None

    # -- guarded reads -----------------------------------------------------------------------
    def read(
        self,
        gpu: Gpu,
        function: str,
        *args: Any,
        handle: Any = None,
        expected: frozenset[ErrorKind] = frozenset(),
        on_expected: Any = None,
    ) -> Any:
        """Call `pynvml.<function>(handle, *args)`; None when NVML cannot give the value.

        Raises GpuLostError or NvmlDownError for failures that end this GPU's (or every
        GPU's) cycle; everything else is counted and answered with None, never a fake value.
        Kinds in `expected` are answers, not errors (NOT_FOUND for an empty MIG slot, or from
        process utilization when no process ran): `on_expected` is returned, uncounted.
        """
        key = _support_key(function, args)
        if key in gpu.unsupported:
            return None
        ident = threading.get_ident()
        self.in_flight[ident] = function
        try:
            return getattr(pynvml, function)(gpu.handle if handle is None else handle, *args)
        except pynvml.NVMLError as error:
            kind = classify(error)
            if kind in expected:
                return on_expected
            self.count_error(function, kind)
            if kind in _STABLE_KINDS:
                gpu.unsupported.add(key)
            elif kind is ErrorKind.GPU_LOST:
                raise GpuLostError(f"GPU {gpu.index} ({gpu.uuid}) is lost: {error}") from error
            elif kind is ErrorKind.DRIVER:
                raise NvmlDownError(str(error)) from error
            return None
        finally:
            self.in_flight.pop(ident, None)

    def read_first(
        self,
        gpu: Gpu,
        purpose: str,
        variants: tuple[tuple[str, tuple[Any, ...]], ...],
        handle: Any = None,
    ) -> Any:
        """Read through the first variant this driver has (e.g. a `_v2` before its `_v1`).

        The working variant is remembered per purpose, so probing happens once per process.
        """
        chosen = self._variant.get(purpose)
        for function, args in variants:
            if chosen is not None and function != chosen:
                continue
            value = self.read(gpu, function, *args, handle=handle)
            if value is not None or _support_key(function, args) not in gpu.unsupported:
                self._variant.setdefault(purpose, function)
                return value
        return None

    def memory_info(self, gpu: Gpu, handle: Any = None) -> Any:
        """Memory info, v2 (which separates driver-reserved memory) where the driver has it."""
        return self.read_first(
            gpu,
            "memory",
            (("nvmlDeviceGetMemoryInfo", (pynvml.nvmlMemory_v2,)), ("nvmlDeviceGetMemoryInfo", ())),
            handle=handle,
        )

    # -- enumeration -------------------------------------------------------------------------
    def enumerate_gpus(self) -> list[Gpu]:
        """Every GPU NVML sees, with its never-changing identity read once."""
        count = self._system_call("nvmlDeviceGetCount") or 0
        gpus = []
        missing = []
        for index in range(count):
            handle = self._system_call("nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                missing.append(index)  # lost at start-up: NVML counts it, cannot open it
                continue
            gpus.append(self._describe_gpu(index, handle))
        self.missing = tuple(missing)
        return gpus

    def missing_came_back(self) -> bool:
        """True when a GPU that could not be opened at enumeration answers now (one cheap
        handle call per missing GPU; failures are not counted again)."""
        for index in self.missing:
            try:
                self._call("nvmlDeviceGetHandleByIndex", pynvml.nvmlDeviceGetHandleByIndex, index)
            except pynvml.NVMLError as error:
                if classify(error) is ErrorKind.DRIVER:
                    raise NvmlDownError(str(error)) from error
                continue
            return True
        return False

    def _describe_gpu(self, index: int, handle: Any) -> Gpu:
        def probe(function: str, *args: Any) -> Any:
            """Ask once, silently: boards differ, and absence here is not an error."""
            try:
                return self._call(function, getattr(pynvml, function), handle, *args)
            except pynvml.NVMLError:
                return None

        uuid = bounded_label(probe("nvmlDeviceGetUUID") or f"unknown-{index}")
        model = bounded_label(probe("nvmlDeviceGetName") or "unknown")
        pci = probe("nvmlDeviceGetPciInfo")
        pci_bus_id = bounded_label(pci.busId if pci is not None else "")
        gpm = probe("nvmlGpmQueryDeviceSupport")
        links: tuple[int, ...] = ()
        if probe("nvmlDeviceGetNvLinkState", 0) is not None:
            links = tuple(
                link
                for link in range(pynvml.NVML_NVLINK_MAX_LINKS)
                if probe("nvmlDeviceGetNvLinkState", link) is not None
            )
        gpu = Gpu(
            index=index,
            handle=handle,
            uuid=uuid,
            model=model,
            pci_bus_id=pci_bus_id,
            labels=(self.node, str(index), uuid, model, pci_bus_id),
            gpm_supported=bool(gpm is not None and gpm.isSupportedDevice),
            nvlink_links=links,
            mig_profiles=(),
        )
        if probe("nvmlDeviceGetMigMode") is not None:
            gpu.mig_profiles = self._mig_profiles(gpu)
        return gpu

    def _mig_profiles(self, gpu: Gpu) -> tuple[MigProfile, ...]:
        """The GPU-instance profiles this MIG-capable GPU offers."""
        profiles = []
        for profile_index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            info = self._profile_info(gpu, profile_index)
            if info is None or info.instanceCount == 0:
                continue
            name = _profile_name(info)
            profiles.append(MigProfile(info.id, name, info.instanceCount, info.sliceCount))
        return tuple(profiles)

    def _profile_info(self, gpu: Gpu, profile_index: int) -> Any:
        try:
            return self._call(
                "nvmlDeviceGetGpuInstanceProfileInfoV",
                pynvml.nvmlDeviceGetGpuInstanceProfileInfo,
                gpu.handle,
                profile_index,
                2,
            )
        except pynvml.NVMLError as error:
            kind = classify(error)
            if error.value == pynvml.NVML_ERROR_INVALID_ARGUMENT or kind in _STABLE_KINDS:
                return None  # this profile does not exist on this GPU: not an error
            self.count_error("nvmlDeviceGetGpuInstanceProfileInfoV", kind)
            return None

    def mig_enabled(self, gpu: Gpu) -> bool | None:
        """The GPU's current MIG mode (None: not MIG-capable or unreadable).

        Many calls answer NOT_SUPPORTED in one mode and work in the other (utilization, GPU
        instance capacity, ...), so a mode change forgets what was found unsupported.
        """
        mode = self.read(gpu, "nvmlDeviceGetMigMode")
        enabled = None if mode is None else mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE
        if enabled is not None and enabled != gpu.mig_mode:
            if gpu.mig_mode is not None:
                gpu.unsupported.clear()
            gpu.mig_mode = enabled
        return enabled

    def mig_instances(self, gpu: Gpu) -> list[MigInstance]:
        """The MIG devices on the GPU now; re-read every cycle so layout changes show at once."""
        slots = self.read(gpu, "nvmlDeviceGetMaxMigDeviceCount") or 0
        found: list[MigInstance] = []
        for slot in range(slots):
            handle = self.read(
                gpu, "nvmlDeviceGetMigDeviceHandleByIndex", slot, expected=_EMPTY_SLOT
            )
            if handle is None:
                continue  # NOT_FOUND: an empty slot, not an error
            uuid = self.read(gpu, "nvmlDeviceGetUUID", handle=handle)
            if uuid is None:
                continue
            uuid = bounded_label(uuid)
            cached = gpu.mig_cache.get(uuid)
            if cached is not None:
                cached.handle = handle
                found.append(cached)
                continue
            instance = self._describe_mig(gpu, handle, uuid)
            if instance is not None:
                gpu.mig_cache[uuid] = instance
                found.append(instance)
        present = {instance.uuid for instance in found}
        for gone in set(gpu.mig_cache) - present:
            del gpu.mig_cache[gone]
        return found

    def _describe_mig(self, gpu: Gpu, handle: Any, uuid: str) -> MigInstance | None:
        gi = self.read(gpu, "nvmlDeviceGetGpuInstanceId", handle=handle)
        ci = self.read(gpu, "nvmlDeviceGetComputeInstanceId", handle=handle)
        if gi is None or ci is None:
            return None
        profile, gi_profile = self._mig_profile_names(gpu, handle, gi)
        memory = self.memory_info(gpu, handle=handle)
        total = int(memory.total) if memory is not None else None
        labels = (*gpu.labels, str(gi), str(ci), profile, uuid)
        return MigInstance(handle, gpu, uuid, gi, ci, profile, gi_profile, total, labels)

    def _mig_profile_names(self, gpu: Gpu, handle: Any, gpu_instance: int) -> tuple[str, str]:
        """(profile as nvidia-smi names it, e.g. "1c.3g.40gb"; its GPU-instance profile)."""
        attributes = self.read(gpu, "nvmlDeviceGetAttributes_v2", handle=handle)
        gi_handle = self.read(gpu, "nvmlDeviceGetGpuInstanceById", gpu_instance)
        gi_info = (
            self.read(gpu, "nvmlGpuInstanceGetInfo", handle=gi_handle)
            if gi_handle is not None
            else None
        )
        name = ""
        if gi_info is not None:
            name = next((p.name for p in gpu.mig_profiles if p.profile_id == gi_info.profileId), "")
        if not name and attributes is not None:
            gigabytes = round(attributes.memorySizeMB / 1024)
            name = f"{attributes.gpuInstanceSliceCount}g.{gigabytes}gb"
        gi_profile = bounded_label(name or "unknown")
        if (
            name
            and attributes is not None
            and 0 < attributes.computeInstanceSliceCount < attributes.gpuInstanceSliceCount
        ):
            return bounded_label(f"{attributes.computeInstanceSliceCount}c.{name}"), gi_profile
        return gi_profile, gi_profile

    # -- GPU performance monitoring ----------------------------------------------------------
    def gpm_sample(self, gpu: Gpu, gpu_instance: int | None) -> Any:
        """A GPM sample of the whole GPU or of one GPU instance, taken now; None if unavailable.

        The caller owns the sample and frees it with `gpm_free`.
        """
        try:
            sample = self._call("nvmlGpmSampleAlloc", pynvml.nvmlGpmSampleAlloc)
        except pynvml.NVMLError as error:
            self.count_error("nvmlGpmSampleAlloc", classify(error))
            return None
        if gpu_instance is None:
            taken = self.read(gpu, "nvmlGpmSampleGet", sample)
        else:
            taken = self.read(gpu, "nvmlGpmMigSampleGet", gpu_instance, sample)
        if taken is None:
            self.gpm_free(sample)
        return taken

    def gpm_metrics(
        self, first: Any, second: Any, metric_ids: tuple[int, ...]
    ) -> list[float | None]:
        """GPM metrics (percent) between two samples; None for a metric NVML cannot give."""
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(metric_ids)
        request.sample1, request.sample2 = first, second
        for slot, metric_id in enumerate(metric_ids):
            request.metrics[slot].metricId = metric_id
        try:
            self._call("nvmlGpmMetricsGet", pynvml.nvmlGpmMetricsGet, request)
        except pynvml.NVMLError as error:
            self.count_error("nvmlGpmMetricsGet", classify(error))
            return [None] * len(metric_ids)
        metrics = [request.metrics[slot] for slot in range(len(metric_ids))]
        return [m.value if m.nvmlReturn == pynvml.NVML_SUCCESS else None for m in metrics]

    def gpm_free(self, sample: Any) -> None:
        with contextlib.suppress(pynvml.NVMLError):
            self._call("nvmlGpmSampleFree", pynvml.nvmlGpmSampleFree, sample)

    # -- events ------------------------------------------------------------------------------
    def open_xid_events(self, gpus: list[Gpu]) -> Any:
        """An event set that receives XID events of every GPU that supports them, or None."""
        try:
            event_set = self._call("nvmlEventSetCreate", pynvml.nvmlEventSetCreate)
        except pynvml.NVMLError as error:
            self.count_error("nvmlEventSetCreate", classify(error))
            return None
        for gpu in gpus:
            supported = self.read(gpu, "nvmlDeviceGetSupportedEventTypes")
            if supported is None or not supported & pynvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                self._call(
                    "nvmlDeviceRegisterEvents",
                    pynvml.nvmlDeviceRegisterEvents,
                    gpu.handle,
                    pynvml.nvmlEventTypeXidCriticalError,
                    event_set,
                )
            except pynvml.NVMLError as error:
                self.count_error("nvmlDeviceRegisterEvents", classify(error))
        return event_set

    def pending_xids(self, event_set: Any, limit: int = 256) -> Iterator[tuple[int, int]]:
        """Drain waiting XID events without blocking: (device handle address, XID code)."""
        for _ in range(limit):
            try:
                data = self._call("nvmlEventSetWait_v2", pynvml.nvmlEventSetWait_v2, event_set, 0)
            except pynvml.NVMLError as error:
                kind = classify(error)
                if kind is not ErrorKind.TIMEOUT:
                    self.count_error("nvmlEventSetWait_v2", kind)
                    if kind is ErrorKind.DRIVER:
                        raise NvmlDownError(str(error)) from error
                return
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                yield handle_address(data.device), int(data.eventData)

    def close_events(self, event_set: Any) -> None:
        with contextlib.suppress(pynvml.NVMLError):
            self._call("nvmlEventSetFree", pynvml.nvmlEventSetFree, event_set)


def _support_key(function: str, args: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """What "this GPU does not support that" is remembered under: the function and its
    selector arguments (sensor, clock, link ids); buffers and sample handles do not count."""
    return function, tuple(a if isinstance(a, int | str | tuple) else None for a in args)


def _profile_name(info: Any) -> str:
    raw = info.name.decode() if isinstance(info.name, bytes) else str(info.name)
    return bounded_label(raw.removeprefix("MIG ").strip() or f"{info.sliceCount}g")


def nvml_bindings_version() -> str:
    """The installed nvidia-ml-py version, for build info."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-ml-py")
    except PackageNotFoundError:
        return "unknown"
