"""Where the cost rules find devices, MIG instances, pod allocations and activity, per source.

The pricing rules are written once, over our exporter's label names (`node`, `gpu`, `uuid`,
`model`, `mig_uuid`, `mig_profile`, `namespace`, `pod`, the team label). When the data comes
from elsewhere, adapter recording rules normalise it into those names first:

- dcgm-exporter (`source: dcgm`) publishes no info series; every `DCGM_FI_*` device series
  carries `UUID`, `modelName`, `Hostname`, MIG instances add `GPU_I_ID`/`GPU_I_PROFILE`, and the
  pod holding the device adds `namespace`/`pod`/`container`. DCGM has no MIG UUID, so an
  instance is keyed as `<parent UUID>/<GPU instance id>`. Activity is
  `DCGM_FI_PROF_GR_ENGINE_ACTIVE` (never `DCGM_FI_DEV_GPU_UTIL`, which reads 0 on MIG).
- With `honor_labels: false` Prometheus renames the exporter's pod labels to `exported_*`.
- With `team_source: kube_pod_labels` the team comes from kube-state-metrics' pod labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Source = Literal["exporter", "dcgm"]
SOURCES: tuple[Source, ...] = ("exporter", "dcgm")
TeamSource = Literal["pod_label", "kube_pod_labels"]
TEAM_SOURCES: tuple[TeamSource, ...] = ("pod_label", "kube_pod_labels")

#: A device series dcgm-exporter publishes for every GPU and every MIG instance by default.
DCGM_PRESENCE = "DCGM_FI_DEV_FB_USED"
#: The graphics-engine activity (0-1) of a GPU or a MIG instance, from DCGM profiling.
DCGM_ACTIVITY = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
#: dcgm-exporter's label names for the facts our exporter labels node, uuid, model, ...
DCGM_LABELS = {
    "node": "Hostname",
    "uuid": "UUID",
    "model": "modelName",
    "gpu_instance": "GPU_I_ID",
    "mig_profile": "GPU_I_PROFILE",
}

#: `cluster` is set by the scrape (or external labels) when one store holds several clusters;
#: a single cluster without it gets the same series, since an absent label groups as empty.
DEVICE_LABELS = "cluster, node, gpu, uuid, model"
MIG_LABELS = f"{DEVICE_LABELS}, gpu_instance, compute_instance, mig_profile, mig_uuid"
POD_LABELS = "namespace, pod, container"

#: Adapter records (what each normalises is in its rule's comment).
DCGM_DEVICES = "device:gpu_info:dcgm"
DCGM_MIG = "mig:gpu_mig_info:dcgm"
DCGM_ALLOCATIONS = "pod:gpu_allocation_info:dcgm"
NORMALIZED_ALLOCATIONS = "pod:gpu_allocation_info:normalized"

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w|y)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_UNIT_MS |= {"w": 7 * _UNIT_MS["d"], "y": 365 * _UNIT_MS["d"]}


#: Per source: the activity (0-1) and memory-used series of whole GPUs and MIG instances, with
#: the matchers that pick each kind (see `RuleInputs.activity` and `RuleInputs.memory`).
_ACTIVITY = {
    "exporter": {
        "whole": ("gpu_utilization_ratio", ""),
        "mig": ("gpu_mig_sm_activity_ratio", ""),
    },
    "dcgm": {
        "whole": (DCGM_ACTIVITY, 'GPU_I_PROFILE=""'),
        "mig": (DCGM_ACTIVITY, 'GPU_I_PROFILE!=""'),
    },
}
_MEMORY = {
    "exporter": {
        "whole": ("gpu_memory_used_bytes", "", 1),
        "mig": ("gpu_mig_memory_used_bytes", "", 1),
    },
    "dcgm": {  # dcgm-exporter reports framebuffer memory in MiB
        "whole": (DCGM_PRESENCE, 'GPU_I_PROFILE=""', 1024 * 1024),
        "mig": (DCGM_PRESENCE, 'GPU_I_PROFILE!=""', 1024 * 1024),
    },
}


@dataclass(frozen=True)
class RuleInputs:
    """The series the pricing rules and the idle queries read, in our label names.

    `devices`, `mig_instances` and `allocations` are series names selectors can be added to;
    activity and memory are built per source by `activity` and `memory`.
    """

    source: str
    devices: str
    mig_instances: str
    allocations: str
    #: Per-process SM use of whole GPUs by (uuid, namespace, pod), averaged; None: not published.
    process_use: str | None
    #: The rule interval as a range one millisecond short of it.
    interval_range: str = "59999ms"
    #: (record, expr) adapter rules the pricing rules depend on, recorded first.
    adapters: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def key(kind: str) -> str:
        """The label naming a device of `kind` ("whole" or "mig"): uuid or mig_uuid."""
        return "mig_uuid" if kind == "mig" else "uuid"

    def _keyed(self, expr: str, kind: str) -> str:
        """`expr` over the source's series, relabelled to carry our uuid / mig_uuid."""
        if self.source != "dcgm":
            return expr
        return _mig_uuid(expr) if kind == "mig" else _rename(expr, "uuid", "UUID")

    def activity(
        self, kind: str, function: str = "avg_over_time", window: str = "", param: str = ""
    ) -> str:
        """`max by (key) (function([param,] activity[window]))` (0-1) of whole GPUs or MIG
        instances: GPU utilization or GPM SM activity from our exporter, graphics-engine
        activity from DCGM (never DCGM_FI_DEV_GPU_UTIL, which reads 0 on MIG). Window: one
        rule interval by default."""
        series, matchers = _ACTIVITY[self.source][kind]
        head = f"{param}, " if param else ""
        selected = f"{_select(series, matchers)}[{window or self.interval_range}]"
        return f"max by ({self.key(kind)}) ({self._keyed(f'{function}({head}{selected})', kind)})"

    def memory(self, kind: str, function: str = "", window: str = "") -> str:
        """`max by (key)` of the memory used, in bytes, of whole GPUs or MIG instances, or of
        `function(memory[window])` (e.g. its peak with max_over_time)."""
        series, matchers, scale = _MEMORY[self.source][kind]
        inner = _select(series, matchers)
        if function:
            inner = f"{function}({inner}[{window}])"
        inner += f" * {scale}" if scale != 1 else ""
        return f"max by ({self.key(kind)}) ({self._keyed(inner, kind)})"

    def memory_total(self) -> str:
        """Each whole GPU's memory size in bytes, by uuid (DCGM: used plus free)."""
        if self.source == "dcgm":
            used, free = DCGM_PRESENCE, "DCGM_FI_DEV_FB_FREE"
            inner = f'({used}{{GPU_I_PROFILE=""}} + {free}{{GPU_I_PROFILE=""}}) * 1048576'
            return f"max by (uuid) ({_rename(inner, 'uuid', 'UUID')})"
        return "max by (uuid) (gpu_memory_total_bytes)"

    @property
    def whole_activity(self) -> str:
        """Each whole GPU's activity averaged over one rule interval, by uuid."""
        return self.activity("whole")

    @property
    def mig_activity(self) -> str:
        """Each MIG instance's activity averaged over one rule interval, by mig_uuid."""
        return self.activity("mig")


def interval_range(interval: str) -> str:
    """A rule interval as a range one millisecond short (`1m` -> `59999ms`).

    Prometheus 2.x ranges include both ends; a range one millisecond short of the interval
    holds the samples of exactly one interval, so consecutive evaluations never count a sample
    twice.
    """
    parts = _DURATION_PART.findall(interval)
    if not parts or "".join(n + u for n, u in parts) != interval:
        raise ValueError(f"{interval!r} is not a Prometheus duration such as 1m")
    ms = sum(int(number) * _UNIT_MS[unit] for number, unit in parts)
    return f"{ms - 1}ms"


def default_team_source(source: str) -> TeamSource:
    """Teams from the pod label on our series; DCGM series carry no pod labels by default."""
    return "kube_pod_labels" if source == "dcgm" else "pod_label"


def rule_inputs(
    source: str = "exporter",
    *,
    interval: str = "1m",
    label_prefix: str = "",
    team_label: str = "label_team",
    team_source: TeamSource = "pod_label",
) -> RuleInputs:
    """The inputs for `source` (`exporter` or `dcgm`), with pod labels under `label_prefix`
    (`exported_` when Prometheus renamed them) and the team from `team_source`."""
    window = interval_range(interval)
    if source == "dcgm":
        return _dcgm_inputs(window, label_prefix, team_label, team_source)
    if source != "exporter":
        raise ValueError(f"unknown source {source!r}: use exporter or dcgm")
    adapters: list[tuple[str, str]] = []
    allocations = "gpu_allocation_info"
    if label_prefix or team_source == "kube_pod_labels":
        expr = _pod_labels_from(f'{allocations}{{{label_prefix}pod!=""}}', label_prefix)
        expr = f"max by ({MIG_LABELS}, {POD_LABELS}, {team_label}) (\n{_indent(expr)}\n)"
        if team_source == "kube_pod_labels":
            expr = _with_team(expr, team_label)
        head = "# gpu_allocation_info with the pod labels under their own names"
        head += " and the team from kube_pod_labels.\n" if team_source != "pod_label" else ".\n"
        adapters.append((NORMALIZED_ALLOCATIONS, head + expr))
        allocations = NORMALIZED_ALLOCATIONS
    process = f'avg_over_time(gpu_process_sm_utilization_ratio{{mig_uuid=""}}[{window}])'
    return RuleInputs(
        source="exporter",
        devices="gpu_info",
        mig_instances="gpu_mig_info",
        allocations=allocations,
        process_use=(
            f"sum by (uuid, namespace, pod) (\n  {_pod_labels_from(process, label_prefix)}\n)"
        ),
        interval_range=window,
        adapters=tuple(adapters),
    )


def _dcgm_inputs(window: str, prefix: str, team_label: str, team_source: TeamSource) -> RuleInputs:
    presence = DCGM_PRESENCE
    devices = (
        "# Every GPU dcgm-exporter reports (whole or carved into MIG instances), in our labels.\n"
        f"group by ({DEVICE_LABELS}) (\n{_indent(_dcgm_device(presence))}\n)"
    )
    instance = _dcgm_mig(f'{presence}{{GPU_I_PROFILE!=""}}')
    mig = (
        "# Every MIG instance; DCGM has no MIG UUID, so mig_uuid is <parent UUID>/<GI id>.\n"
        f"group by ({MIG_LABELS}) (\n{_indent(instance)}\n)"
    )
    holder = f'{prefix}pod!=""'
    whole_held = _dcgm_device(f'{presence}{{GPU_I_PROFILE="", {holder}}}')
    mig_held = _dcgm_mig(f'{presence}{{GPU_I_PROFILE!="", {holder}}}')
    by = f"{MIG_LABELS}, {POD_LABELS}, {team_label}"
    allocations = (
        f"group by ({by}) (\n{_indent(_pod_labels_from(whole_held, prefix))}\n)\n"
        f"or\ngroup by ({by}) (\n{_indent(_pod_labels_from(mig_held, prefix))}\n)"
    )
    if team_source == "kube_pod_labels":
        allocations = _with_team(f"(\n{_indent(allocations)}\n)", team_label)
    allocations = (
        "# Device series with a pod: dcgm-exporter labels a device with the pod holding it\n"
        "# (one copy per pod on a shared GPU with its virtual-GPU mode).\n" + allocations
    )
    return RuleInputs(
        source="dcgm",
        devices=DCGM_DEVICES,
        mig_instances=DCGM_MIG,
        allocations=DCGM_ALLOCATIONS,
        process_use=None,
        interval_range=window,
        adapters=(
            (DCGM_DEVICES, devices),
            (DCGM_MIG, mig),
            (DCGM_ALLOCATIONS, allocations),
        ),
    )


def _select(series: str, matchers: str) -> str:
    return f"{series}{{{matchers}}}" if matchers else series


def _rename(expr: str, target: str, source: str) -> str:
    """`expr` with label `target` set to label `source` (removed where `source` is empty)."""
    return f'label_replace({expr}, "{target}", "$1", "{source}", "(.*)")'


def _dcgm_device(series: str) -> str:
    expr = series
    for ours in ("uuid", "model", "node"):
        expr = _rename(expr, ours, DCGM_LABELS[ours])
    return expr


def _mig_uuid(expr: str) -> str:
    return f'label_join({expr}, "mig_uuid", "/", "UUID", "GPU_I_ID")'


def _dcgm_mig(series: str) -> str:
    expr = _dcgm_device(series)
    for ours in ("gpu_instance", "mig_profile"):
        expr = _rename(expr, ours, DCGM_LABELS[ours])
    return _mig_uuid(expr)


def _pod_labels_from(expr: str, prefix: str) -> str:
    """`expr` with `<prefix>namespace`, `<prefix>pod`, `<prefix>container` as the plain names.

    Replacing (not just copying) matters: with honorLabels false the plain names hold the
    exporter's own pod, which must not be billed.
    """
    if not prefix:
        return expr
    for name in ("namespace", "pod", "container"):
        expr = _rename(expr, name, prefix + name)
    return expr


def _with_team(allocations: str, team_label: str) -> str:
    """Allocations with the team label from `kube_pod_labels` (pods without it keep none)."""
    labels = f"max by (cluster, namespace, pod, {team_label}) (kube_pod_labels)"
    return (
        f"{allocations}\n* on (cluster, namespace, pod) group_left ({team_label})\n{labels}\n"
        f"# pods kube-state-metrics does not (yet) list keep their allocation, without a team\n"
        f"or on (cluster, namespace, pod)\n{allocations}"
    )


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.strip().split("\n"))
