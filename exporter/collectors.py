"""Collectors: one class per metric-family group.

Each collector reads NVML for one GPU at a time (`read_gpu`, run on that GPU's own worker
thread so a wedged call blocks only that GPU) or once per node (`read_node`), and its
`collect()` yields fresh metric families built from the last cycle's samples. Nothing is kept
between cycles except what a counter needs, so series of vanished MIG instances simply stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter import catalogue as m
from exporter.attribution import Attribution
from exporter.catalogue import MetricSpec
from exporter.exposition import Sample
from exporter.nvml import (
    CLOCK_EVENT_REASONS,
    NVML_CLOCK_MEM,
    NVML_CLOCK_SM,
    NVML_FEATURE_ENABLED,
    NVML_FI_NVLINK_CRC_DATA_TOTAL,
    NVML_FI_NVLINK_CRC_FLIT_TOTAL,
    NVML_FI_NVLINK_RECOVERY_TOTAL,
    NVML_FI_NVLINK_REPLAY_TOTAL,
    NVML_FI_NVLINK_RX,
    NVML_FI_NVLINK_TX,
    NVML_GPM_GRAPHICS_UTIL,
    NVML_GPM_SM_UTIL,
    NVML_MEMORY_ERROR_TYPE_CORRECTED,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    NVML_PCIE_UTIL_RX_BYTES,
    NVML_PCIE_UTIL_TX_BYTES,
    NVML_PSTATE_UNKNOWN,
    NVML_RETIRED_DOUBLE_BIT,
    NVML_RETIRED_SINGLE_BIT,
    NVML_SUCCESS,
    NVML_TEMPERATURE_GPU,
    NVML_VOLATILE_ECC,
    ErrorKind,
    Gpu,
    MigInstance,
    Nvml,
    SystemInfo,
)
from exporter.podresources import DeviceRef
from exporter.units import kib_to_bytes, mhz_to_hertz, milli_to_base, percent_to_ratio


def build_families(samples: Iterable[Sample]) -> list[Metric]:
    """Group samples into families, in catalogue order of first appearance."""
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for spec, labels, value in samples:
        family = families.get(spec.name)
        if family is None:
            family = families[spec.name] = spec.family()
        family.add_metric(labels, value)
    return list(families.values())


class Collector:
    """A group of metric families, read per GPU and/or per node each cycle."""

    name = ""
    #: The catalogue group whose metrics this collector publishes.
    group = ""

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def read_gpu(self, nvml: Nvml, gpu: Gpu) -> list[Sample]:
        """Samples for one GPU; runs on the GPU's worker thread."""
        return []

    def read_node(self, nvml: Nvml, gpus: Sequence[Gpu]) -> list[Sample]:
        """Samples that come from the node as a whole; runs once per cycle."""
        return []

    def on_enumerate(self, nvml: Nvml, gpus: Sequence[Gpu], system: SystemInfo) -> None:
        """Called after NVML (re-)enumerated the GPUs, before the next cycle."""

    def close(self, nvml: Nvml) -> None:
        """Release NVML resources before NVML shuts down."""

    def collect(self) -> Iterator[Metric]:
        yield from build_families(self.samples)


class GpmSampler:
    """GPU Performance Monitoring: activity between this cycle's sample and the last one.

    GPM metrics are differences of two samples, so the first cycle for a GPU or GPU instance
    has no value (omitted, not zero). Samples of instances that vanish are freed.
    """

    METRICS = (NVML_GPM_SM_UTIL, NVML_GPM_GRAPHICS_UTIL)

    def __init__(self) -> None:
        self._previous: dict[tuple[str, int | None, str], Any] = {}

    def activity(
        self, nvml: Nvml, gpu: Gpu, gpu_instance: int | None, identity: str = ""
    ) -> tuple[float | None, float | None]:
        """(SM activity, graphics activity) as 0-1 ratios, or None where there is none.

        `identity` tells instances apart that reuse a GPU instance id after a MIG re-layout
        (a MIG UUID): a new instance starts without a value, never with a difference
        against the sample of the instance it replaced.
        """
        key = (gpu.uuid, gpu_instance, identity)
        sample = nvml.gpm_sample(gpu, gpu_instance)
        if sample is None:
            return None, None
        previous = self._previous.get(key)
        self._previous[key] = sample
        if previous is None:
            return None, None
        try:
            sm, graphics = nvml.gpm_metrics(previous, sample, self.METRICS)
        finally:
            nvml.gpm_free(previous)
        return (
            None if sm is None else percent_to_ratio(sm),
            None if graphics is None else percent_to_ratio(graphics),
        )

    def forget_except(self, nvml: Nvml, gpu: Gpu, keep: set[tuple[int | None, str]]) -> None:
        """Free samples of this GPU's instances that no longer exist."""
        for key in [k for k in self._previous if k[0] == gpu.uuid and k[1:] not in keep]:
            nvml.gpm_free(self._previous.pop(key))

    def clear(self, nvml: Nvml) -> None:
        """Free every sample (before NVML shuts down or is initialised anew)."""
        for sample in self._previous.values():
            nvml.gpm_free(sample)
        self._previous.clear()


#: Device readings that are one NVML call, one unit conversion and one sample each:
#: (metric, NVML function, selector arguments, conversion, extra label values).
_DEVICE_SCALARS: tuple[
    tuple[MetricSpec, str, tuple[int, ...], Callable[[float], float], tuple[str, ...]], ...
] = (
    (m.GPU_TEMPERATURE, "nvmlDeviceGetTemperature", (NVML_TEMPERATURE_GPU,), float, ()),
    (m.GPU_POWER, "nvmlDeviceGetPowerUsage", (), milli_to_base, ()),
    (m.GPU_POWER_LIMIT, "nvmlDeviceGetEnforcedPowerLimit", (), milli_to_base, ()),
    (m.GPU_ENERGY, "nvmlDeviceGetTotalEnergyConsumption", (), milli_to_base, ()),
    (m.GPU_CLOCK, "nvmlDeviceGetClockInfo", (NVML_CLOCK_SM,), mhz_to_hertz, ("sm",)),
    (m.GPU_CLOCK, "nvmlDeviceGetClockInfo", (NVML_CLOCK_MEM,), mhz_to_hertz, ("memory",)),
    (m.GPU_FAN_SPEED, "nvmlDeviceGetFanSpeed", (), percent_to_ratio, ()),
    (
        m.GPU_PCIE_THROUGHPUT,
        "nvmlDeviceGetPcieThroughput",
        (NVML_PCIE_UTIL_TX_BYTES,),
        kib_to_bytes,
        ("tx",),
    ),
    (
        m.GPU_PCIE_THROUGHPUT,
        "nvmlDeviceGetPcieThroughput",
        (NVML_PCIE_UTIL_RX_BYTES,),
        kib_to_bytes,
        ("rx",),
    ),
)


class DeviceCollector(Collector):
    """Identity, utilization, memory, thermals, power, clocks and PCIe of each GPU."""

    name = group = "device"

    def __init__(self) -> None:
        super().__init__()
        self.system = SystemInfo("", "")
        self.gpm = GpmSampler()

    def on_enumerate(self, nvml: Nvml, gpus: Sequence[Gpu], system: SystemInfo) -> None:
        self.system = system

    def close(self, nvml: Nvml) -> None:
        self.gpm.clear(nvml)

    def read_gpu(self, nvml: Nvml, gpu: Gpu) -> list[Sample]:
        labels = gpu.labels
        read = nvml.read
        out: list[Sample] = []
        mig = nvml.mig_enabled(gpu)
        mig_mode = "enabled" if mig else ("disabled" if mig is False else "unsupported")
        info_labels = (*labels, self.system.driver_version, self.system.cuda_driver_version)
        out.append((m.GPU_INFO, (*info_labels, mig_mode), 1.0))

        utilization = read(gpu, "nvmlDeviceGetUtilizationRates")
        if utilization is not None:
            out.append((m.GPU_UTILIZATION, labels, percent_to_ratio(utilization.gpu)))
            out.append((m.GPU_MEMORY_UTILIZATION, labels, percent_to_ratio(utilization.memory)))
        memory = nvml.memory_info(gpu)
        if memory is not None:
            out.append((m.GPU_MEMORY_USED, labels, float(memory.used)))
            out.append((m.GPU_MEMORY_FREE, labels, float(memory.free)))
            out.append((m.GPU_MEMORY_TOTAL, labels, float(memory.total)))
        for spec, function, args, convert, extra_labels in _DEVICE_SCALARS:
            value = read(gpu, function, *args)
            if value is not None:
                out.append((spec, (*labels, *extra_labels), convert(value)))
        pstate = read(gpu, "nvmlDeviceGetPerformanceState")
        if pstate is not None and pstate != NVML_PSTATE_UNKNOWN:
            out.append((m.GPU_PERFORMANCE_STATE, labels, float(pstate)))
        reasons = nvml.read_first(
            gpu,
            "clock_events",
            (
                ("nvmlDeviceGetCurrentClocksEventReasons", ()),
                ("nvmlDeviceGetCurrentClocksThrottleReasons", ()),
            ),
        )
        if reasons is not None:
            for reason, bit in CLOCK_EVENT_REASONS:
                active = 1.0 if reasons & bit else 0.0
                out.append((m.GPU_CLOCK_EVENT_REASON, (*labels, reason), active))
        encoder = read(gpu, "nvmlDeviceGetEncoderUtilization")
        if encoder is not None:
            out.append((m.GPU_ENCODER_UTILIZATION, labels, percent_to_ratio(encoder[0])))
        decoder = read(gpu, "nvmlDeviceGetDecoderUtilization")
        if decoder is not None:
            out.append((m.GPU_DECODER_UTILIZATION, labels, percent_to_ratio(decoder[0])))
        if gpu.gpm_supported and not mig:
            sm_activity, graphics_activity = self.gpm.activity(nvml, gpu, None)
            if sm_activity is not None:
                out.append((m.GPU_SM_ACTIVITY, labels, sm_activity))
            if graphics_activity is not None:
                out.append((m.GPU_GRAPHICS_ACTIVITY, labels, graphics_activity))
        return out


class EccCollector(Collector):
    """ECC error counters, retired pages (pre-Ampere) and remapped rows (Ampere and newer)."""

    name = group = "ecc"

    def read_gpu(self, nvml: Nvml, gpu: Gpu) -> list[Sample]:
        labels = gpu.labels
        out: list[Sample] = []
        for error_type, code in (
            ("corrected", NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ("uncorrected", NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        ):
            # Volatile counts reset with the driver, which Prometheus reads as a counter reset.
            count = nvml.read(gpu, "nvmlDeviceGetTotalEccErrors", code, NVML_VOLATILE_ECC)
            if count is not None:
                out.append((m.GPU_ECC_ERRORS, (*labels, error_type), float(count)))
        for cause, code in (
            ("single_bit", NVML_RETIRED_SINGLE_BIT),
            ("double_bit", NVML_RETIRED_DOUBLE_BIT),
        ):
            pages = nvml.read(gpu, "nvmlDeviceGetRetiredPages", code)
            if pages is not None:
                out.append((m.GPU_RETIRED_PAGES, (*labels, cause), float(len(pages))))
        rows = nvml.read(gpu, "nvmlDeviceGetRemappedRows")
        if rows is not None:
            correctable, uncorrectable, pending, failed = rows
            out.append((m.GPU_REMAPPED_ROWS, (*labels, "correctable"), float(correctable)))
            out.append((m.GPU_REMAPPED_ROWS, (*labels, "uncorrectable"), float(uncorrectable)))
            out.append((m.GPU_REMAPPED_ROWS_PENDING, labels, 1.0 if pending else 0.0))
            out.append((m.GPU_REMAPPED_ROWS_FAILED, labels, 1.0 if failed else 0.0))
        return out


NVLINK_ERROR_FIELDS = (
    ("crc_flit", NVML_FI_NVLINK_CRC_FLIT_TOTAL),
    ("crc_data", NVML_FI_NVLINK_CRC_DATA_TOTAL),
    ("replay", NVML_FI_NVLINK_REPLAY_TOTAL),
    ("recovery", NVML_FI_NVLINK_RECOVERY_TOTAL),
)


class NvLinkCollector(Collector):
    """NVLink link state, data throughput and error totals, in one field-values call per GPU."""

    name = group = "nvlink"

    def read_gpu(self, nvml: Nvml, gpu: Gpu) -> list[Sample]:
        if not gpu.nvlink_links:
            return []
        labels = gpu.labels
        active = sum(
            1
            for link in gpu.nvlink_links
            if nvml.read(gpu, "nvmlDeviceGetNvLinkState", link) == NVML_FEATURE_ENABLED
        )
        out: list[Sample] = [(m.GPU_NVLINK_LINKS_ACTIVE, labels, float(active))]
        fields: list[tuple[int, int]] = []
        for link in gpu.nvlink_links:
            fields.append((NVML_FI_NVLINK_TX, link))
            fields.append((NVML_FI_NVLINK_RX, link))
        fields.extend((field_id, 0) for _, field_id in NVLINK_ERROR_FIELDS)
        values = nvml.read(gpu, "nvmlDeviceGetFieldValues", tuple(fields))
        if values is None:
            return out
        tx = rx = 0.0
        tx_seen = rx_seen = False
        for slot, (field_id, _) in enumerate(fields[: 2 * len(gpu.nvlink_links)]):
            entry = values[slot]
            if entry.nvmlReturn != NVML_SUCCESS:
                continue
            if field_id == NVML_FI_NVLINK_TX:
                tx, tx_seen = tx + entry.value.ullVal, True
            else:
                rx, rx_seen = rx + entry.value.ullVal, True
        if tx_seen:
            out.append((m.GPU_NVLINK_TRANSMITTED, labels, kib_to_bytes(tx)))
        if rx_seen:
            out.append((m.GPU_NVLINK_RECEIVED, labels, kib_to_bytes(rx)))
        offset = 2 * len(gpu.nvlink_links)
        for slot, (error_type, _) in enumerate(NVLINK_ERROR_FIELDS):
            entry = values[offset + slot]
            if entry.nvmlReturn == NVML_SUCCESS:
                count = float(entry.value.ullVal)
                out.append((m.GPU_NVLINK_ERRORS, (*labels, error_type), count))
        return out


class MigCollector(Collector):
    """MIG instances (identity, memory, GPM activity) and MIG capacity per profile."""

    name = group = "mig"

    def __init__(self) -> None:
        super().__init__()
        self.gpm = GpmSampler()

    def close(self, nvml: Nvml) -> None:
        self.gpm.clear(nvml)

    def read_gpu(self, nvml: Nvml, gpu: Gpu) -> list[Sample]:
        if not gpu.mig_profiles or not nvml.mig_enabled(gpu):
            self.gpm.forget_except(nvml, gpu, set())
            return []
        instances = nvml.mig_instances(gpu)
        out: list[Sample] = []
        activity_by_gi: dict[int, tuple[str, tuple[float | None, float | None]]] = {}
        for instance in instances:
            out.extend(self._instance_samples(nvml, gpu, instance, activity_by_gi))
        keep: set[tuple[int | None, str]] = {
            (gi, identity) for gi, (identity, _) in activity_by_gi.items()
        }
        self.gpm.forget_except(nvml, gpu, keep)
        out.extend(self._capacity_samples(nvml, gpu, instances))
        return out

    def _instance_samples(
        self,
        nvml: Nvml,
        gpu: Gpu,
        instance: MigInstance,
        activity_by_gi: dict[int, tuple[str, tuple[float | None, float | None]]],
    ) -> list[Sample]:
        labels = instance.labels
        out: list[Sample] = [(m.GPU_MIG_INFO, labels, 1.0)]
        memory = nvml.memory_info(gpu, handle=instance.handle)
        if memory is not None:
            out.append((m.GPU_MIG_MEMORY_USED, labels, float(memory.used)))
        if instance.memory_total_bytes is not None:
            out.append((m.GPU_MIG_MEMORY_TOTAL, labels, float(instance.memory_total_bytes)))
        if gpu.gpm_supported:
            # GPM samples a whole GPU instance; compute instances inside it share its figure.
            # The GPU instance is known by the MIG UUID of its first compute instance.
            gi = instance.gpu_instance
            if gi not in activity_by_gi:
                identity = instance.uuid
                activity_by_gi[gi] = identity, self.gpm.activity(nvml, gpu, gi, identity)
            sm_activity, graphics_activity = activity_by_gi[gi][1]
            if sm_activity is not None:
                out.append((m.GPU_MIG_SM_ACTIVITY, labels, sm_activity))
            if graphics_activity is not None:
                out.append((m.GPU_MIG_GRAPHICS_ACTIVITY, labels, graphics_activity))
        return out

    def _capacity_samples(
        self, nvml: Nvml, gpu: Gpu, instances: Sequence[MigInstance]
    ) -> list[Sample]:
        existing: dict[str, set[int]] = {}
        for instance in instances:
            existing.setdefault(instance.gpu_instance_profile, set()).add(instance.gpu_instance)
        out: list[Sample] = []
        for profile in gpu.mig_profiles:
            labels = (*gpu.labels, profile.name)
            out.append((m.GPU_MIG_INSTANCE_CAPACITY, labels, float(profile.capacity)))
            out.append((m.GPU_MIG_INSTANCES, labels, float(len(existing.get(profile.name, ())))))
            remaining = nvml.read(
                gpu, "nvmlDeviceGetGpuInstanceRemainingCapacity", profile.profile_id
            )
            if remaining is not None:
                out.append((m.GPU_MIG_INSTANCES_AVAILABLE, labels, float(remaining)))
        return out


class XidCollector(Collector):
    """XID error events from NVML's event API: a counter per code and when it was last seen."""

    name = group = "xid"

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self._clock = clock
        self._event_set: Any = None
        self._counts: dict[tuple[tuple[str, ...], str], int] = {}
        self._last_seen: dict[tuple[tuple[str, ...], str], float] = {}

    def on_enumerate(self, nvml: Nvml, gpus: Sequence[Gpu], system: SystemInfo) -> None:
        self.close(nvml)
        self._event_set = nvml.open_xid_events(list(gpus))

    def close(self, nvml: Nvml) -> None:
        if self._event_set is not None:
            nvml.close_events(self._event_set)
            self._event_set = None

    def read_node(self, nvml: Nvml, gpus: Sequence[Gpu]) -> list[Sample]:
        if self._event_set is not None:
            by_address = {gpu.address: gpu for gpu in gpus}
            for address, code in nvml.pending_xids(self._event_set):
                gpu = by_address.get(address)
                if gpu is None:
                    continue
                key = (gpu.labels, str(code))
                self._counts[key] = self._counts.get(key, 0) + 1
                self._last_seen[key] = self._clock()
        out: list[Sample] = []
        for (labels, xid), count in self._counts.items():
            out.append((m.GPU_XID_ERRORS, (*labels, xid), float(count)))
            out.append((m.GPU_XID_LAST_SEEN, (*labels, xid), self._last_seen[(labels, xid)]))
        return out


_RUNNING_PROCESS_QUERIES = (
    ("compute", "nvmlDeviceGetComputeRunningProcesses"),
    ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
    ("mps", "nvmlDeviceGetMPSComputeRunningProcesses"),
)
_NOT_FOUND = frozenset({ErrorKind.NOT_FOUND})
#: NVML writes this into usedGpuMemory when it cannot tell (e.g. under WDDM).
_MEMORY_NOT_AVAILABLE = (1 << 64) - 1


class ProcessCollector(Collector):
    """Per-process GPU memory and utilization, each process with the pod that runs it.

    Processes are listed on the parent GPU, which reports each one's GPU instance on MIG.
    Series of exited processes vanish at the next cycle; a per-GPU cap bounds cardinality.
    """

    name = group = "process"

    def __init__(self, attribution: Attribution, max_series_per_gpu: int = 64) -> None:
        super().__init__()
        self.attribution = attribution
        self.max_series_per_gpu = max_series_per_gpu
        self.dropped = 0
        extra = attribution.label_names
        self.info = m.GPU_PROCESS_INFO.with_labels(extra)
        self.memory = m.GPU_PROCESS_MEMORY_USED.with_labels(extra)
        self.utilization = tuple(
            spec.with_labels(extra)
            for spec in (
                m.GPU_PROCESS_SM_UTILIZATION,
                m.GPU_PROCESS_MEMORY_UTILIZATION,
                m.GPU_PROCESS_ENCODER_UTILIZATION,
                m.GPU_PROCESS_DECODER_UTILIZATION,
            )
        )
        self._last_sample_us: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pids: set[int] = set()

    def read_gpu(self, nvml: Nvml, gpu: Gpu) -> list[Sample]:
        processes = self._running(nvml, gpu)
        utilization = self._utilization(nvml, gpu)
        out: list[Sample] = [(m.GPU_PROCESSES, gpu.labels, float(len(processes)))]
        kept = sorted(processes.values(), key=lambda p: p[1] or 0, reverse=True)
        if len(kept) > self.max_series_per_gpu:
            with self._lock:
                self.dropped += len(kept) - self.max_series_per_gpu
            kept = kept[: self.max_series_per_gpu]
        instances = {i.gpu_instance: i for i in gpu.mig_cache.values()}
        for pid, memory, gpu_instance, kinds in kept:
            name, owner = self.attribution.process(pid)
            instance = instances.get(gpu_instance) if gpu_instance is not None else None
            device = instance.labels if instance is not None else (*gpu.labels, "", "", "", "")
            who = (
                (owner.namespace, owner.pod, owner.container, *owner.pod_labels)
                if owner is not None
                else ("", "", "", *("",) * len(self.attribution.pod_labels))
            )
            command = name or "unknown"
            labels = (*device, str(pid), command, *who[:3])
            pod_labels = who[3:]
            out.append((self.info, (*labels, "+".join(kinds), *pod_labels), 1.0))
            if memory is not None:
                out.append((self.memory, (*labels, *pod_labels), float(memory)))
            if utilization is not None:
                # A process with no sample in the window did not run: 0, as the issue says.
                rates = utilization.get(pid, (0, 0, 0, 0))
                for spec, percent in zip(self.utilization, rates, strict=True):
                    out.append((spec, (*labels, *pod_labels), percent_to_ratio(percent)))
        with self._lock:
            self._pids.update(processes)
        return out

    def _running(
        self, nvml: Nvml, gpu: Gpu
    ) -> dict[int, tuple[int, int | None, int | None, list[str]]]:
        """pid → (pid, memory bytes or None, GPU instance id or None, process types)."""
        found: dict[int, tuple[int, int | None, int | None, list[str]]] = {}
        for kind, function in _RUNNING_PROCESS_QUERIES:
            for info in nvml.read(gpu, function) or ():
                pid = int(info.pid)
                memory = info.usedGpuMemory
                if memory is None or memory == _MEMORY_NOT_AVAILABLE:
                    memory = None
                gi = getattr(info, "gpuInstanceId", None)
                gpu_instance = None if gi is None or gi == 0xFFFFFFFF else int(gi)
                if pid in found:
                    found[pid][3].append(kind)
                else:
                    found[pid] = (pid, memory, gpu_instance, [kind])
        return found

    def _utilization(self, nvml: Nvml, gpu: Gpu) -> dict[int, tuple[int, int, int, int]] | None:
        """pid → (sm, memory, encoder, decoder) percent from samples since the last cycle.

        None where NVML has no per-process utilization (MIG, old boards); an empty dict when
        it answered NOT_FOUND, which means no process ran in the window.
        """
        since = self._last_sample_us.get(gpu.uuid, 0)
        samples = nvml.read(
            gpu, "nvmlDeviceGetProcessUtilization", since, expected=_NOT_FOUND, on_expected=()
        )
        if samples is None:
            return None
        latest: dict[int, tuple[int, tuple[int, int, int, int]]] = {}
        for sample in samples:
            stamp = int(sample.timeStamp)
            if stamp >= latest.get(sample.pid, (-1, ()))[0]:
                rates = (sample.smUtil, sample.memUtil, sample.encUtil, sample.decUtil)
                latest[int(sample.pid)] = (stamp, rates)
        if latest:
            self._last_sample_us[gpu.uuid] = max(stamp for stamp, _ in latest.values())
        return {pid: rates for pid, (_, rates) in latest.items()}

    def read_node(self, nvml: Nvml, gpus: Sequence[Gpu]) -> list[Sample]:
        with self._lock:
            pids, self._pids = self._pids, set()
            dropped = self.dropped
        self.attribution.end_cycle(sorted(pids))
        node = (nvml.node,)
        return [
            (m.GPU_NODE_PROCESSES, node, float(len(pids))),
            (m.EXPORTER_PROCESS_SERIES_DROPPED, node, float(dropped)),
        ]


class AllocationCollector(Collector):
    """Which Running pod's container holds each GPU, MIG instance or time-sliced share."""

    name = group = "allocation"

    def __init__(self, attribution: Attribution) -> None:
        super().__init__()
        self.attribution = attribution
        self.info = m.GPU_ALLOCATION_INFO.with_labels(attribution.label_names)

    def read_node(self, nvml: Nvml, gpus: Sequence[Gpu]) -> list[Sample]:
        self.attribution.refresh()
        by_uuid = {gpu.uuid: gpu for gpu in gpus}
        by_mig_uuid = {i.uuid: i for gpu in gpus for i in gpu.mig_cache.values()}
        out: list[Sample] = []
        for assignment, owner in self.attribution.running_assignments():
            device = _device_labels(assignment.device, by_uuid, by_mig_uuid)
            if device is None:
                continue  # a device this exporter does not see (another driver, stale id)
            who = (owner.namespace, owner.pod, owner.container, assignment.resource)
            out.append((self.info, (*device, *who, *owner.pod_labels), 1.0))
        node = nvml.node
        for resource, count in sorted(self.attribution.allocatable.items()):
            out.append((m.GPU_ALLOCATABLE_DEVICES, (node, resource), float(count)))
        return out


def _device_labels(
    device: DeviceRef, by_uuid: Mapping[str, Gpu], by_mig_uuid: Mapping[str, MigInstance]
) -> tuple[str, ...] | None:
    """MIG labels of the device an assignment names (MIG labels empty for whole GPUs)."""
    if device.mig_uuid is not None:
        instance = by_mig_uuid.get(device.mig_uuid)
        return instance.labels if instance is not None else None
    gpu = by_uuid.get(device.gpu_uuid or "")
    if gpu is None:
        return None
    if device.gpu_instance is not None:  # legacy MIG-GPU-<uuid>/<gi>/<ci>
        for instance in gpu.mig_cache.values():
            if (instance.gpu_instance, instance.compute_instance) == (
                device.gpu_instance,
                device.compute_instance or 0,
            ):
                return instance.labels
        return None
    return (*gpu.labels, "", "", "", "")


#: Collectors a user can switch on or off by name (`--collectors`).
OPTIONAL_COLLECTORS = ("device", "ecc", "nvlink", "mig", "xid", "process", "allocation")
