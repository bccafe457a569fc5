"""The metric catalogue: every metric the exporter publishes, defined once.

Name, type, unit, help text and label set live here and nowhere else. Collectors build their
families from these specs, `docs/metrics.md` is generated from them (`python -m
exporter.catalogue`), and rules, dashboards and the analytics service may only use names that
appear here (a test checks it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

MetricType = Literal["gauge", "counter"]

#: Labels every per-GPU series carries.
DEVICE_LABELS: tuple[str, ...] = ("node", "gpu", "uuid", "model", "pci_bus_id")
#: Labels every per-MIG-instance series carries: its parent's, then its own.
MIG_LABELS: tuple[str, ...] = (
    *DEVICE_LABELS,
    "gpu_instance",
    "compute_instance",
    "mig_profile",
    "mig_uuid",
)


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: what it is called, measures, and which labels it carries."""

    name: str
    type: MetricType
    unit: str
    help: str
    labels: tuple[str, ...]
    group: str

    def with_labels(self, extra: tuple[str, ...]) -> MetricSpec:
        """This metric with operator-chosen labels appended (allowlisted pod labels)."""
        return replace(self, labels=(*self.labels, *extra)) if extra else self

    def family(self) -> GaugeMetricFamily | CounterMetricFamily:
        """A fresh, empty prometheus_client family for this metric."""
        if self.type == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


CATALOGUE: dict[str, MetricSpec] = {}


def _metric(
    name: str,
    type: MetricType,
    unit: str,
    help: str,
    labels: tuple[str, ...],
    group: str,
) -> MetricSpec:
    if name in CATALOGUE:
        raise ValueError(f"metric {name} defined twice in the catalogue")
    if type == "counter" and not name.endswith("_total"):
        raise ValueError(f"counter {name} must end in _total")
    spec = MetricSpec(name, type, unit, help, labels, group)
    CATALOGUE[name] = spec
    return spec


# --- device: one series per GPU ------------------------------------------------------------
GPU_INFO = _metric(
    "gpu_info",
    "gauge",
    "",
    "Always 1; labels identify the GPU, its driver, CUDA driver version and MIG mode.",
    (*DEVICE_LABELS, "driver_version", "cuda_driver_version", "mig_mode"),
    "device",
)
GPU_UTILIZATION = _metric(
    "gpu_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction of the last sample period (0-1) in which a kernel ran on the GPU; "
    "absent on MIG-enabled GPUs, where NVML does not report it.",
    DEVICE_LABELS,
    "device",
)
GPU_MEMORY_UTILIZATION = _metric(
    "gpu_memory_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction of the last sample period (0-1) in which device memory was read or written.",
    DEVICE_LABELS,
    "device",
)
GPU_MEMORY_USED = _metric(
    "gpu_memory_used_bytes",
    "gauge",
    "bytes",
    "Device memory allocated by processes and the driver, in bytes.",
    DEVICE_LABELS,
    "device",
)
GPU_MEMORY_FREE = _metric(
    "gpu_memory_free_bytes",
    "gauge",
    "bytes",
    "Device memory free for allocation, in bytes.",
    DEVICE_LABELS,
    "device",
)
GPU_MEMORY_TOTAL = _metric(
    "gpu_memory_total_bytes",
    "gauge",
    "bytes",
    "Total device memory, in bytes.",
    DEVICE_LABELS,
    "device",
)
GPU_TEMPERATURE = _metric(
    "gpu_temperature_celsius",
    "gauge",
    "celsius",
    "GPU core temperature, in degrees Celsius.",
    DEVICE_LABELS,
    "device",
)
GPU_POWER = _metric(
    "gpu_power_watts",
    "gauge",
    "watts",
    "Power drawn by the GPU board, in watts.",
    DEVICE_LABELS,
    "device",
)
GPU_POWER_LIMIT = _metric(
    "gpu_power_limit_watts",
    "gauge",
    "watts",
    "Power limit the driver enforces, in watts.",
    DEVICE_LABELS,
    "device",
)
GPU_ENERGY = _metric(
    "gpu_energy_joules_total",
    "counter",
    "joules",
    "Energy consumed by the GPU since the driver was loaded, in joules.",
    DEVICE_LABELS,
    "device",
)
GPU_CLOCK = _metric(
    "gpu_clock_hertz",
    "gauge",
    "hertz",
    "Current clock frequency of a clock domain (sm or memory), in hertz.",
    (*DEVICE_LABELS, "clock"),
    "device",
)
GPU_FAN_SPEED = _metric(
    "gpu_fan_speed_ratio",
    "gauge",
    "ratio",
    "Intended fan speed as a fraction (0-1) of maximum; absent on passively cooled boards.",
    DEVICE_LABELS,
    "device",
)
GPU_PCIE_THROUGHPUT = _metric(
    "gpu_pcie_throughput_bytes_per_second",
    "gauge",
    "bytes per second",
    "PCIe throughput over NVML's last 20 ms sample, in bytes per second, by direction (tx, rx).",
    (*DEVICE_LABELS, "direction"),
    "device",
)
GPU_PERFORMANCE_STATE = _metric(
    "gpu_performance_state",
    "gauge",
    "",
    "Current performance state: 0 (P0, maximum performance) to 15 (P15, minimum).",
    DEVICE_LABELS,
    "device",
)
GPU_CLOCK_EVENT_REASON = _metric(
    "gpu_clock_event_reason_active",
    "gauge",
    "",
    "1 while this reason is holding clocks down (throttling), else 0.",
    (*DEVICE_LABELS, "reason"),
    "device",
)
GPU_ENCODER_UTILIZATION = _metric(
    "gpu_encoder_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of the last sample period in which the video encoders were busy.",
    DEVICE_LABELS,
    "device",
)
GPU_DECODER_UTILIZATION = _metric(
    "gpu_decoder_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of the last sample period in which the video decoders were busy.",
    DEVICE_LABELS,
    "device",
)
GPU_SM_ACTIVITY = _metric(
    "gpu_sm_activity_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of SMs busy between the last two GPM samples; only on GPUs with GPM "
    "(Hopper and newer) and not in MIG mode.",
    DEVICE_LABELS,
    "device",
)
GPU_GRAPHICS_ACTIVITY = _metric(
    "gpu_graphics_activity_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of time a compute or graphics engine was active between the last two "
    "GPM samples; only on GPUs with GPM and not in MIG mode.",
    DEVICE_LABELS,
    "device",
)

# --- ecc: memory errors --------------------------------------------------------------------
GPU_ECC_ERRORS = _metric(
    "gpu_ecc_errors_total",
    "counter",
    "errors",
    "ECC memory errors since the driver was loaded, by error_type (corrected, uncorrected).",
    (*DEVICE_LABELS, "error_type"),
    "ecc",
)
GPU_RETIRED_PAGES = _metric(
    "gpu_retired_pages",
    "gauge",
    "pages",
    "Device memory pages retired by the driver, by cause (single_bit, double_bit); "
    "pre-Ampere GPUs only (newer GPUs remap rows instead).",
    (*DEVICE_LABELS, "cause"),
    "ecc",
)
GPU_REMAPPED_ROWS = _metric(
    "gpu_remapped_rows",
    "gauge",
    "rows",
    "Memory rows remapped by the driver, by cause (correctable, uncorrectable).",
    (*DEVICE_LABELS, "cause"),
    "ecc",
)
GPU_REMAPPED_ROWS_PENDING = _metric(
    "gpu_remapped_rows_pending",
    "gauge",
    "",
    "1 when a row remapping is pending and the GPU needs a reset to apply it, else 0.",
    DEVICE_LABELS,
    "ecc",
)
GPU_REMAPPED_ROWS_FAILED = _metric(
    "gpu_remapped_rows_failed",
    "gauge",
    "",
    "1 when a row remapping has failed (the GPU should be serviced), else 0.",
    DEVICE_LABELS,
    "ecc",
)

# --- nvlink --------------------------------------------------------------------------------
GPU_NVLINK_LINKS_ACTIVE = _metric(
    "gpu_nvlink_links_active",
    "gauge",
    "links",
    "NVLink links currently active on the GPU.",
    DEVICE_LABELS,
    "nvlink",
)
GPU_NVLINK_TRANSMITTED = _metric(
    "gpu_nvlink_transmitted_bytes_total",
    "counter",
    "bytes",
    "Data bytes sent over all NVLink links of the GPU.",
    DEVICE_LABELS,
    "nvlink",
)
GPU_NVLINK_RECEIVED = _metric(
    "gpu_nvlink_received_bytes_total",
    "counter",
    "bytes",
    "Data bytes received over all NVLink links of the GPU.",
    DEVICE_LABELS,
    "nvlink",
)
GPU_NVLINK_ERRORS = _metric(
    "gpu_nvlink_errors_total",
    "counter",
    "errors",
    "NVLink errors summed over links, by error_type (crc_flit, crc_data, replay, recovery).",
    (*DEVICE_LABELS, "error_type"),
    "nvlink",
)

# --- mig: one series per MIG instance, and capacity per GPU and profile --------------------
GPU_MIG_INFO = _metric(
    "gpu_mig_info",
    "gauge",
    "",
    "Always 1; labels identify a MIG instance (profile, GPU and compute instance ids, UUID) "
    "and its parent GPU.",
    MIG_LABELS,
    "mig",
)
GPU_MIG_MEMORY_USED = _metric(
    "gpu_mig_memory_used_bytes",
    "gauge",
    "bytes",
    "Memory allocated in the MIG instance, in bytes.",
    MIG_LABELS,
    "mig",
)
GPU_MIG_MEMORY_TOTAL = _metric(
    "gpu_mig_memory_total_bytes",
    "gauge",
    "bytes",
    "Memory of the MIG instance, in bytes.",
    MIG_LABELS,
    "mig",
)
GPU_MIG_SM_ACTIVITY = _metric(
    "gpu_mig_sm_activity_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of the instance's SMs busy between the last two GPM samples; only where "
    "the GPU supports GPM (Hopper and newer), never estimated elsewhere.",
    MIG_LABELS,
    "mig",
)
GPU_MIG_GRAPHICS_ACTIVITY = _metric(
    "gpu_mig_graphics_activity_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of time a compute or graphics engine of the instance was active between "
    "the last two GPM samples; only where the GPU supports GPM.",
    MIG_LABELS,
    "mig",
)
GPU_MIG_INSTANCES = _metric(
    "gpu_mig_instances",
    "gauge",
    "instances",
    "GPU instances of this MIG profile that exist on the GPU.",
    (*DEVICE_LABELS, "mig_profile"),
    "mig",
)
GPU_MIG_INSTANCE_CAPACITY = _metric(
    "gpu_mig_instance_capacity",
    "gauge",
    "instances",
    "Most GPU instances of this MIG profile the GPU can hold when empty.",
    (*DEVICE_LABELS, "mig_profile"),
    "mig",
)
GPU_MIG_INSTANCES_AVAILABLE = _metric(
    "gpu_mig_instances_available",
    "gauge",
    "instances",
    "GPU instances of this MIG profile that could still be created beside the current layout.",
    (*DEVICE_LABELS, "mig_profile"),
    "mig",
)

# --- xid: driver error events ---------------------------------------------------------------
GPU_XID_ERRORS = _metric(
    "gpu_xid_errors_total",
    "counter",
    "events",
    "XID error events reported by the driver since the exporter started, by XID code.",
    (*DEVICE_LABELS, "xid"),
    "xid",
)
GPU_XID_LAST_SEEN = _metric(
    "gpu_xid_last_seen_timestamp_seconds",
    "gauge",
    "seconds",
    "Unix time at which this XID code was last reported for the GPU, in seconds.",
    (*DEVICE_LABELS, "xid"),
    "xid",
)

# --- process: one series per GPU process, with the pod that runs it ---------------------------
#: Labels of per-process series: the device (MIG labels empty on whole GPUs), the process, and
#: the pod that runs it when known; allowlisted pod labels follow as label_<name>.
PROCESS_LABELS: tuple[str, ...] = (*MIG_LABELS, "pid", "command", "namespace", "pod", "container")
#: Labels of allocation series: the device and the pod's container that holds it.
ALLOCATION_LABELS: tuple[str, ...] = (*MIG_LABELS, "namespace", "pod", "container", "resource")

GPU_PROCESS_INFO = _metric(
    "gpu_process_info",
    "gauge",
    "",
    "Always 1; one series per process using a GPU or MIG instance, with its process name "
    "(never its arguments), type (compute, graphics, mps) and the pod that runs it.",
    (*PROCESS_LABELS, "type"),
    "process",
)
GPU_PROCESS_MEMORY_USED = _metric(
    "gpu_process_memory_used_bytes",
    "gauge",
    "bytes",
    "Device memory the process has allocated, in bytes.",
    PROCESS_LABELS,
    "process",
)
GPU_PROCESS_SM_UTILIZATION = _metric(
    "gpu_process_sm_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of the last sample period in which the process ran kernels on the GPU; "
    "0 when it had no sample; absent on MIG, where NVML has no per-process utilization.",
    PROCESS_LABELS,
    "process",
)
GPU_PROCESS_MEMORY_UTILIZATION = _metric(
    "gpu_process_memory_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of the last sample period in which the process read or wrote memory.",
    PROCESS_LABELS,
    "process",
)
GPU_PROCESS_ENCODER_UTILIZATION = _metric(
    "gpu_process_encoder_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of the last sample period in which the process used the video encoders.",
    PROCESS_LABELS,
    "process",
)
GPU_PROCESS_DECODER_UTILIZATION = _metric(
    "gpu_process_decoder_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction (0-1) of the last sample period in which the process used the video decoders.",
    PROCESS_LABELS,
    "process",
)
GPU_PROCESSES = _metric(
    "gpu_processes",
    "gauge",
    "processes",
    "Processes using the GPU or its MIG instances now (a GPU session count).",
    DEVICE_LABELS,
    "process",
)
GPU_NODE_PROCESSES = _metric(
    "gpu_node_processes",
    "gauge",
    "processes",
    "Processes using any GPU of the node now.",
    ("node",),
    "process",
)

# --- allocation: which pod holds which device (kubelet pod-resources) ------------------------
GPU_ALLOCATION_INFO = _metric(
    "gpu_allocation_info",
    "gauge",
    "",
    "Always 1; the GPU or MIG instance is assigned to this Running pod's container (several "
    "series for one device when it is time-sliced or shared).",
    ALLOCATION_LABELS,
    "allocation",
)
GPU_ALLOCATABLE_DEVICES = _metric(
    "gpu_allocatable_devices",
    "gauge",
    "devices",
    "Devices of this extended resource the kubelet can assign to pods (GPUs, MIG instances or "
    "time-sliced shares).",
    ("node", "resource"),
    "allocation",
)

# --- exporter: health of the GPUs and of the exporter itself (always on) --------------------
GPU_UP = _metric(
    "gpu_up",
    "gauge",
    "",
    "1 when the last collection read the GPU, 0 when it is lost, hung or failing.",
    DEVICE_LABELS,
    "exporter",
)
EXPORTER_BUILD_INFO = _metric(
    "gpu_exporter_build_info",
    "gauge",
    "",
    "Always 1; labels give the exporter version, the NVML bindings and Python versions.",
    ("node", "version", "nvml_bindings_version", "python_version"),
    "exporter",
)
EXPORTER_NVML_UP = _metric(
    "gpu_exporter_nvml_up",
    "gauge",
    "",
    "1 when NVML is initialised and answering, 0 while the exporter retries it.",
    ("node",),
    "exporter",
)
EXPORTER_COLLECTOR_DURATION = _metric(
    "gpu_exporter_collector_duration_seconds",
    "gauge",
    "seconds",
    "Wall time the collector took in the last collection cycle, in seconds.",
    ("node", "collector"),
    "exporter",
)
EXPORTER_COLLECTOR_SUCCESS = _metric(
    "gpu_exporter_collector_success",
    "gauge",
    "",
    "1 when the collector completed the last cycle without an exporter fault, else 0.",
    ("node", "collector"),
    "exporter",
)
EXPORTER_NVML_ERRORS = _metric(
    "gpu_exporter_nvml_errors_total",
    "counter",
    "errors",
    "NVML calls that failed, by function and kind (not_supported, no_permission, gpu_lost, "
    "function_not_found, driver, timeout, unknown); not_supported is counted once per GPU.",
    ("node", "function", "kind"),
    "exporter",
)
EXPORTER_PROCESS_SERIES_DROPPED = _metric(
    "gpu_exporter_process_series_dropped_total",
    "counter",
    "series",
    "Per-process series not published because a GPU had more processes than the per-GPU cap.",
    ("node",),
    "exporter",
)
EXPORTER_ATTRIBUTION_UP = _metric(
    "gpu_exporter_attribution_up",
    "gauge",
    "",
    "1 when the attribution source (kubelet, apiserver) answered in the last cycle, else 0; "
    "absent when the source is not configured.",
    ("node", "source"),
    "exporter",
)
EXPORTER_ATTRIBUTION_ERRORS = _metric(
    "gpu_exporter_attribution_errors_total",
    "counter",
    "errors",
    "Failed attempts to read an attribution source (kubelet, apiserver).",
    ("node", "source"),
    "exporter",
)
EXPORTER_SAMPLES_DROPPED = _metric(
    "gpu_exporter_samples_dropped_total",
    "counter",
    "samples",
    "Samples left out of /metrics because they duplicated another series or were not finite.",
    ("node",),
    "exporter",
)
EXPORTER_COLLECTION_DURATION = _metric(
    "gpu_exporter_collection_duration_seconds",
    "gauge",
    "seconds",
    "Wall time of the last whole collection cycle, in seconds.",
    ("node",),
    "exporter",
)
EXPORTER_LAST_COLLECTION = _metric(
    "gpu_exporter_last_collection_timestamp_seconds",
    "gauge",
    "seconds",
    "Unix time at which the last collection cycle finished, in seconds.",
    ("node",),
    "exporter",
)


def markdown() -> str:
    """The catalogue as the Markdown page `docs/metrics.md`."""
    lines = [
        "# Metrics",
        "",
        "Generated from `exporter/catalogue.py` by `make docs`; do not edit by hand.",
        "",
        "Every per-GPU series carries the labels `" + "`, `".join(DEVICE_LABELS) + "`; every "
        "per-MIG-instance series adds `"
        + "`, `".join(MIG_LABELS[len(DEVICE_LABELS) :])
        + "`. Per-process and allocation series carry the MIG labels too (empty, so absent, "
        "on whole GPUs) and one `label_<name>` per pod label the operator allowlists "
        "(`--pod-labels`). A value NVML cannot give is omitted, never reported as 0.",
        "",
    ]
    groups: dict[str, list[MetricSpec]] = {}
    for spec in CATALOGUE.values():
        groups.setdefault(spec.group, []).append(spec)
    for group, specs in groups.items():
        lines += [f"## Collector `{group}`", "", "| metric | type | unit | labels | meaning |"]
        lines.append("|---|---|---|---|---|")
        for spec in specs:
            extra = [label for label in spec.labels if label not in MIG_LABELS]
            if spec.labels[: len(MIG_LABELS)] == MIG_LABELS:
                shown = ["(MIG labels)", *extra]
            elif spec.labels[: len(DEVICE_LABELS)] == DEVICE_LABELS:
                shown = ["(device labels)", *spec.labels[len(DEVICE_LABELS) :]]
            else:
                shown = list(spec.labels)
            lines.append(
                f"| `{spec.name}` | {spec.type} | {spec.unit or '-'} | "
                f"{', '.join(shown)} | {spec.help} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
