"""GPU recording rules and alerts, generated from `monitoring/values.yaml`.

``python -m monitoring.rules`` writes ``rules/gpu-recording.yml`` and ``rules/gpu-alerts.yml``;
``--check`` exits 1 when the committed files differ from what the values give. The cost rules
(``rules/pricing.yml``, from the pricing file) are the analytics' and are only read here:
idle cost and the 24-hour spend build on them. Names follow ``level:metric:operations``;
docs/rules.md lists them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from monitoring.values import DEFAULT_PATH, Values, ValuesError, duration_seconds, load_values

REPO_ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = REPO_ROOT / "rules"
RECORDING_FILE = "gpu-recording.yml"
ALERTS_FILE = "gpu-alerts.yml"
MIG_SLICES = 7

# -- recorded series ---------------------------------------------------------------------------
# Activity: GPU utilization for whole GPUs, GPM SM activity for MIG instances (0-1).
DEVICE_ACTIVITY = "device:gpu_activity_ratio"
DEVICE_SHARE = "device:gpu_share_ratio"
NODE_ACTIVITY = "node:gpu_activity_ratio:weighted_avg"
MODEL_ACTIVITY = "model:gpu_activity_ratio:weighted_avg"
MIG_PROFILE_ACTIVITY = "mig_profile:gpu_activity_ratio:avg"
NAMESPACE_ACTIVITY = "namespace:gpu_activity_ratio:weighted_avg"
TEAM_ACTIVITY = "team:gpu_activity_ratio:weighted_avg"
CLUSTER_ACTIVITY = "cluster:gpu_activity_ratio:weighted_avg"
# Memory.
NODE_MEMORY_USED = "node:gpu_memory_used_bytes:sum"
NODE_MEMORY_TOTAL = "node:gpu_memory_total_bytes:sum"
MODEL_MEMORY_USED = "model:gpu_memory_used_bytes:sum"
MODEL_MEMORY_TOTAL = "model:gpu_memory_total_bytes:sum"
MIG_PROFILE_MEMORY_USED = "mig_profile:gpu_memory_used_bytes:sum"
MIG_PROFILE_MEMORY_TOTAL = "mig_profile:gpu_memory_total_bytes:sum"
NAMESPACE_MEMORY_USED = "namespace:gpu_memory_used_bytes:sum"
TEAM_MEMORY_USED = "team:gpu_memory_used_bytes:sum"
CLUSTER_MEMORY_USED = "cluster:gpu_memory_used_bytes:sum"
CLUSTER_MEMORY_TOTAL = "cluster:gpu_memory_total_bytes:sum"
# Capacity and allocation.
NODE_DEVICES = "node:gpu_devices:count"
CLUSTER_DEVICES = "cluster:gpu_devices:count"
CLUSTER_ALLOCATED = "cluster:gpu_allocated_devices:sum"
NODE_UNALLOCATED = "node:gpu_unallocated_devices:sum"
CLUSTER_UNALLOCATED = "cluster:gpu_unallocated_devices:sum"
NODE_ALLOCATED_UNITS = "node:gpu_allocated_devices:count"
CLUSTER_ALLOCATED_UNITS = "cluster:gpu_allocated_devices:count"
CLUSTER_ALLOCATABLE = "cluster:gpu_allocatable_devices:sum"
MIG_INSTANCES = "mig_profile:gpu_mig_instances:sum"
MIG_ALLOCATED = "mig_profile:gpu_mig_instances_allocated:count"
MIG_FREE = "mig_profile:gpu_mig_instances_free:sum"
MIG_CREATABLE = "mig_profile:gpu_mig_instances_creatable:sum"
# Allocated but idle.
IDLE_MAX = "device:gpu_activity_ratio:max_idle_window"
POD_IDLE = "pod:gpu_allocated_idle:share"
NAMESPACE_IDLE = "namespace:gpu_allocated_idle:share_sum"
TEAM_IDLE = "team:gpu_allocated_idle:share_sum"
CLUSTER_IDLE = "cluster:gpu_allocated_idle:share_sum"
NAMESPACE_IDLE_COST = "namespace:gpu_idle_cost_dollars_per_hour:sum"
TEAM_IDLE_COST = "team:gpu_idle_cost_dollars_per_hour:sum"
CLUSTER_IDLE_COST = "cluster:gpu_idle_cost_dollars_per_hour:sum"
# Spend over 24 hours, and the budgets it is held to.
CLUSTER_SPEND = "cluster:gpu_cost_dollars:sum_24h"
NAMESPACE_SPEND = "namespace:gpu_cost_dollars:sum_24h"
TEAM_SPEND = "team:gpu_cost_dollars:sum_24h"
CLUSTER_BUDGET = "cluster:gpu_budget_dollars_per_day"
TEAM_BUDGET = "team:gpu_budget_dollars_per_day"

# -- what the pricing rules (rules/pricing.yml) record, read here --------------------------------
POD_DEVICES = "pod:gpu_allocated_devices:share"
POD_UTILIZED = "pod:gpu_utilized_devices:share"
POD_MEASURED = "pod:gpu_measured_devices:share"
POD_COST = "pod:gpu_cost_dollars_per_hour:allocated"
NODE_ALLOCATED = "node:gpu_allocated_devices:sum"
NAMESPACE_ALLOCATED = "namespace:gpu_allocated_devices:sum"
TEAM_ALLOCATED = "team:gpu_allocated_devices:sum"
NAMESPACE_UTILIZED = "namespace:gpu_utilized_devices:sum"
NAMESPACE_MEASURED = "namespace:gpu_measured_devices:sum"
TEAM_UTILIZED = "team:gpu_utilized_devices:sum"
TEAM_MEASURED = "team:gpu_measured_devices:sum"
NAMESPACE_COST = "namespace:gpu_cost_dollars_per_hour:sum"
TEAM_COST = "team:gpu_cost_dollars_per_hour:sum"
CLUSTER_PRICE = "cluster:gpu_price_dollars_per_hour:sum"

DEVICE_BY = "node, gpu, uuid, model"
MIG_BY = f"{DEVICE_BY}, gpu_instance, compute_instance, mig_profile, mig_uuid"
#: The labels of a MIG instance's idle-window series (the analytics reads the same).
IDLE_MIG_BY = f"{DEVICE_BY}, gpu_instance, mig_profile, mig_uuid"


def _rule(record: str, expr: str) -> dict[str, str]:
    return {"record": record, "expr": expr.strip() + "\n"}


def _q(text: str) -> str:
    """A PromQL string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _num(value: float) -> str:
    return f"{value:g}" if value == int(value) and abs(value) < 1e15 else repr(value)


def _team(expr: str, team_label: str) -> str:
    """`expr` with the pod's team label copied to `team` (pods without one get none)."""
    return f'label_replace({expr}, "team", "$1", {_q(team_label)}, "(.+)")'


def _slice_profiles(slices: int) -> str:
    """The regex of MIG profiles with `slices` compute slices (as the pricing rules count)."""
    return _q(f"({slices}c\\.[0-9]+g|{slices}g)\\..*")


def _union(parts: Sequence[str]) -> str:
    return "\nor\n".join(f"(\n{_indent(p)}\n)" for p in parts)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.splitlines())


# -- recording rules ---------------------------------------------------------------------------


def _usage_rules(v: Values) -> list[dict[str, str]]:
    team = v.team_label
    share = [
        "# Whole GPUs outside MIG mode: one GPU each.\n"
        f'max by ({DEVICE_BY}) (gpu_info{{mig_mode!="enabled"}})'
    ]
    for k in range(1, MIG_SLICES + 1):
        share.append(
            f"# MIG instances of {k} compute slices: {k}/{MIG_SLICES} of a GPU\n"
            f"max by ({MIG_BY}) (gpu_mig_info{{mig_profile=~{_slice_profiles(k)}}}) "
            f"* {k} / {MIG_SLICES}"
        )

    def weighted(by: str) -> str:
        group = f"by ({by}) " if by else ""
        return (
            "# Mean activity weighted by GPU-equivalents (a 1g instance counts 1/7), over the\n"
            "# devices with an activity reading.\n"
            f"sum {group}({DEVICE_ACTIVITY} * on (uuid, mig_uuid) group_left {DEVICE_SHARE})\n"
            f"/\nsum {group}({DEVICE_SHARE} and on (uuid, mig_uuid) {DEVICE_ACTIVITY})"
        )

    def held(utilized: str, measured: str) -> str:
        return (
            "# Busy GPU-equivalents held over GPU-equivalents held and measured (both summed by\n"
            "# the pricing rules).\n"
            f"{utilized} / {measured}"
        )

    process_memory = 'gpu_process_memory_used_bytes{namespace!=""}'
    return [
        _rule(
            DEVICE_ACTIVITY,
            _union(
                [
                    "# Whole GPUs: NVML utilization (absent on MIG-enabled GPUs).\n"
                    f"max by ({DEVICE_BY}) (gpu_utilization_ratio)",
                    "# MIG instances: GPM SM activity (absent on GPUs without GPM, e.g. A100).\n"
                    f"max by ({MIG_BY}) (gpu_mig_sm_activity_ratio)",
                ]
            ),
        ),
        _rule(DEVICE_SHARE, _union(share)),
        _rule(NODE_ACTIVITY, weighted("node")),
        _rule(MODEL_ACTIVITY, weighted("model")),
        _rule(CLUSTER_ACTIVITY, weighted("")),
        _rule(
            MIG_PROFILE_ACTIVITY,
            f'avg by (model, mig_profile) ({DEVICE_ACTIVITY}{{mig_uuid!=""}})',
        ),
        _rule(NAMESPACE_ACTIVITY, held(NAMESPACE_UTILIZED, NAMESPACE_MEASURED)),
        _rule(TEAM_ACTIVITY, held(TEAM_UTILIZED, TEAM_MEASURED)),
        _rule(NODE_MEMORY_USED, "sum by (node) (gpu_memory_used_bytes)"),
        _rule(NODE_MEMORY_TOTAL, "sum by (node) (gpu_memory_total_bytes)"),
        _rule(MODEL_MEMORY_USED, "sum by (model) (gpu_memory_used_bytes)"),
        _rule(MODEL_MEMORY_TOTAL, "sum by (model) (gpu_memory_total_bytes)"),
        _rule(CLUSTER_MEMORY_USED, "sum(gpu_memory_used_bytes)"),
        _rule(CLUSTER_MEMORY_TOTAL, "sum(gpu_memory_total_bytes)"),
        _rule(
            MIG_PROFILE_MEMORY_USED,
            "sum by (model, mig_profile) (gpu_mig_memory_used_bytes)",
        ),
        _rule(
            MIG_PROFILE_MEMORY_TOTAL,
            "sum by (model, mig_profile) (gpu_mig_memory_total_bytes)",
        ),
        _rule(
            NAMESPACE_MEMORY_USED,
            "# Memory of the GPU processes each namespace's pods run.\n"
            f"sum by (namespace) ({process_memory})",
        ),
        _rule(TEAM_MEMORY_USED, f"sum by (team) ({_team(process_memory, team)})"),
    ]


def _capacity_rules(v: Values) -> list[dict[str, str]]:
    holders = "max by (node, resource, namespace, pod, uuid, mig_uuid) (gpu_allocation_info)"
    mig_holders = 'max by (mig_profile, mig_uuid) (gpu_allocation_info{mig_uuid!=""})'
    return [
        _rule(NODE_DEVICES, "# Physical GPUs.\ncount by (node) (gpu_info)"),
        _rule(CLUSTER_DEVICES, "count(gpu_info)"),
        _rule(
            CLUSTER_ALLOCATED,
            "# GPU-equivalents held by pods (1 per whole GPU, k/7 per MIG instance); 0, not\n"
            "# absent, when no pod holds any. Per node, namespace, team: the pricing rules.\n"
            f"sum({POD_DEVICES}) or (0 * {CLUSTER_DEVICES})",
        ),
        _rule(
            NODE_UNALLOCATED,
            "# GPU-equivalents no pod holds: free GPUs, free MIG instances, uncarved slices.\n"
            f"{NODE_DEVICES} - ({NODE_ALLOCATED} or (0 * {NODE_DEVICES}))",
        ),
        _rule(CLUSTER_UNALLOCATED, f"{CLUSTER_DEVICES} - {CLUSTER_ALLOCATED}"),
        _rule(
            NODE_ALLOCATED_UNITS,
            "# Devices of each extended resource held by pods, as the kubelet counts them (a\n"
            "# GPU, a MIG instance, a time-sliced share): one per pod and device.\n"
            f"count by (node, resource) ({holders})",
        ),
        _rule(CLUSTER_ALLOCATED_UNITS, f"sum by (resource) ({NODE_ALLOCATED_UNITS})"),
        _rule(CLUSTER_ALLOCATABLE, "sum by (resource) (gpu_allocatable_devices)"),
        _rule(
            MIG_INSTANCES, "# MIG instances that exist.\nsum by (mig_profile) (gpu_mig_instances)"
        ),
        _rule(MIG_ALLOCATED, f"count by (mig_profile) ({mig_holders})"),
        _rule(
            MIG_FREE,
            "# Instances that exist and no pod holds: what a new pod of the profile can get.\n"
            f"{MIG_INSTANCES} - ({MIG_ALLOCATED} or (0 * {MIG_INSTANCES}))",
        ),
        _rule(
            MIG_CREATABLE,
            "# Instances that could still be created beside the current layouts.\n"
            "sum by (mig_profile) (gpu_mig_instances_available)",
        ),
    ]


def _idle_rules(v: Values) -> list[dict[str, str]]:
    team = v.team_label
    window = v.idle_window
    overridden = [ns for ns, _ in v.idle_namespace_thresholds]
    terms: list[str] = []
    default_selector = (
        f"{{namespace!~{_q('|'.join(_re_escape(ns) for ns in overridden))}}}" if overridden else ""
    )
    terms.append(
        f"# Pods whose device stayed below {_num(v.idle_threshold)} for {window}.\n"
        f"{POD_DEVICES}{default_selector}\n"
        f"and on (uuid, mig_uuid)\n({IDLE_MAX} < {_num(v.idle_threshold)})"
    )
    for ns, threshold in v.idle_namespace_thresholds:
        terms.append(
            f"# Namespace {ns}: threshold {_num(threshold)}.\n"
            f"{POD_DEVICES}{{namespace={_q(ns)}}}\n"
            f"and on (uuid, mig_uuid)\n({IDLE_MAX} < {_num(threshold)})"
        )
    idle_cost = f"{POD_COST} and on (namespace, pod, uuid, mig_uuid) {POD_IDLE}"
    return [
        _rule(
            IDLE_MAX,
            _union(
                [
                    f"# Whole GPUs: the highest utilization in the last {window}.\n"
                    f"max by ({DEVICE_BY}) (max_over_time(gpu_utilization_ratio[{window}]))",
                    f"# MIG instances: the highest SM activity in the last {window} (GPM only).\n"
                    f"max by ({IDLE_MIG_BY}) "
                    f"(max_over_time(gpu_mig_sm_activity_ratio[{window}]))",
                ]
            ),
        ),
        _rule(
            POD_IDLE,
            "# The GPU-equivalents each pod holds on a device that stayed idle for the whole\n"
            "# window; devices without an activity reading are never classified.\n" + _union(terms),
        ),
        _rule(NAMESPACE_IDLE, f"sum by (namespace) ({POD_IDLE})"),
        _rule(TEAM_IDLE, f"sum by (team) ({_team(POD_IDLE, team)})"),
        _rule(CLUSTER_IDLE, f"sum({POD_IDLE}) or (0 * {CLUSTER_DEVICES})"),
        _rule(
            NAMESPACE_IDLE_COST,
            "# What the idle pods pay for what they hold, in dollars per hour.\n"
            f"sum by (namespace) ({idle_cost})",
        ),
        _rule(TEAM_IDLE_COST, f"sum by (team) ({_team(f'({idle_cost})', team)})"),
        _rule(CLUSTER_IDLE_COST, f"sum({idle_cost}) or (0 * {CLUSTER_PRICE})"),
    ]


def _budget_rules(v: Values) -> list[dict[str, str]]:
    per_sample = f"{_num(v.recording_interval_seconds)} / 3600"
    # Range selectors include both ends before Prometheus 3: one millisecond short of 24 hours
    # holds exactly one day of samples recorded at the rule interval.
    day = "86399999ms"
    rules = [
        _rule(
            CLUSTER_SPEND,
            "# Dollars over the last 24 hours for every priced GPU, held or not: each recorded\n"
            f"# dollars-per-hour sample stands for one rule interval ({v.recording_interval});\n"
            "# the range is one millisecond short of 24h, so a sample is never counted twice.\n"
            f"sum_over_time({CLUSTER_PRICE}[{day}]) * {per_sample}",
        ),
        _rule(NAMESPACE_SPEND, f"sum_over_time({NAMESPACE_COST}[{day}]) * {per_sample}"),
        _rule(TEAM_SPEND, f"sum_over_time({TEAM_COST}[{day}]) * {per_sample}"),
    ]
    if v.cluster_daily_dollars is not None:
        rules.append(_rule(CLUSTER_BUDGET, f"vector({_num(v.cluster_daily_dollars)})"))
    parts = [
        f'label_replace(vector({_num(dollars)}), "team", {_q(name)}, "", "")'
        for name, dollars in v.team_daily_dollars
    ]
    if v.default_team_daily_dollars is not None:
        listed = "|".join(_re_escape(name) for name, _ in v.team_daily_dollars)
        unlisted = f", team!~{_q(listed)}" if listed else ""
        parts.append(
            "# every other team with GPU cost\n"
            f"{_num(v.default_team_daily_dollars)} + 0 * group by (team) "
            f'({TEAM_COST}{{team!=""{unlisted}}})'
        )
    if parts:
        rules.append(_rule(TEAM_BUDGET, "\nor\n".join(parts)))
    return rules


def _re_escape(text: str) -> str:
    """Escape RE2 metacharacters for a PromQL regex matcher."""
    return "".join(f"\\{c}" if c in r".^$*+?()[]{}|\\" else c for c in text)


def recording_rules(v: Values) -> dict[str, Any]:
    """The recording rule file: usage, capacity, idle and budget groups."""
    interval = v.recording_interval
    return {
        "groups": [
            {"name": "gpu-usage", "interval": interval, "rules": _usage_rules(v)},
            {"name": "gpu-capacity", "interval": interval, "rules": _capacity_rules(v)},
            {"name": "gpu-idle", "interval": interval, "rules": _idle_rules(v)},
            {"name": "gpu-budget", "interval": interval, "rules": _budget_rules(v)},
        ]
    }


# -- alerts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertRule:
    """One alerting rule: its expression, labels and texts (values fill in thresholds)."""

    name: str
    group: str
    component: str
    expr: str
    summary: str
    description: str
    severity: str | None = None  # None: the alert's severity in the values


def _alert_rules(v: Values) -> list[AlertRule]:
    a = v.alerts
    temp = a["GPUHighTemperature"]["threshold_celsius"]
    util = a["GPUHighUtilization"]["threshold_ratio"]
    free = a["GPUMIGProfileNearlyExhausted"]["free_ratio_below"]
    xid = a["GPUXidError"]
    critical = "|".join(str(code) for code in xid["critical_xids"])
    quiet = "|".join(str(code) for code in (*xid["ignored_xids"], *xid["critical_xids"]))
    xid_window = _seconds(xid["window"])
    ecc_window = a["GPUUncorrectableECCErrors"]["window"]
    thermal = a["GPUThermalThrottling"]
    power = a["GPUPowerThrottling"]
    horizon = _seconds(a["GPUCapacityExhaustionForecast"]["horizon"])
    failing_window = a["GPUAnalyticsQueriesFailing"]["window"]
    gpu = "GPU {{ $labels.gpu }} ({{ $labels.model }}) on node {{ $labels.node }}"
    rules = [
        AlertRule(
            "GPUHighTemperature",
            "gpu-hardware",
            "gpu-hardware",
            f"gpu_temperature_celsius > {_num(temp)}",
            "GPU {{ $labels.gpu }} on {{ $labels.node }} is above " + f"{_num(temp)} °C",
            f"{gpu} is at " + "{{ $value }} °C, above " + f"{_num(temp)} °C for "
            f"{a['GPUHighTemperature'].for_}.",
        ),
        AlertRule(
            "GPUHighUtilization",
            "gpu-hardware",
            "gpu-hardware",
            f"gpu_utilization_ratio > {_num(util)}\nor\ngpu_mig_sm_activity_ratio > {_num(util)}",
            "GPU {{ $labels.gpu }} on {{ $labels.node }} is saturated",
            f"{gpu}" + "{{ with $labels.mig_profile }} (MIG {{ . }}){{ end }} is "
            "{{ $value | humanizePercentage }} busy, above "
            f"{_num(round(util * 100, 6))}% for {a['GPUHighUtilization'].for_}.",
        ),
        AlertRule(
            "GPUUnavailable",
            "gpu-hardware",
            "gpu-hardware",
            "gpu_up == 0",
            "GPU {{ $labels.gpu }} on {{ $labels.node }} is lost or failing",
            f"The exporter could not read {gpu} "
            f"for {a['GPUUnavailable'].for_} (lost, hung or failing).",
        ),
        AlertRule(
            "GPUNVMLUnavailable",
            "gpu-hardware",
            "gpu-hardware",
            "gpu_exporter_nvml_up == 0",
            "NVML is not answering on node {{ $labels.node }}",
            "The exporter on node {{ $labels.node }} could not initialise NVML for "
            f"{a['GPUNVMLUnavailable'].for_}: no GPU of the node is measured.",
        ),
        AlertRule(
            "GPUXidError",
            "gpu-hardware",
            "gpu-hardware",
            "time() - gpu_xid_last_seen_timestamp_seconds"
            f'{{xid=~"{critical}"}} < {_num(xid_window)}',
            "XID {{ $labels.xid }} on GPU {{ $labels.gpu }} of {{ $labels.node }}",
            f"{gpu} reported XID " + "{{ $labels.xid }} {{ $value | humanizeDuration }} ago, "
            "an XID that means a hardware or driver fault.",
            severity="critical",
        ),
        AlertRule(
            "GPUXidError",
            "gpu-hardware",
            "gpu-hardware",
            f'time() - gpu_xid_last_seen_timestamp_seconds{{xid!~"{quiet}"}} < {_num(xid_window)}',
            "XID {{ $labels.xid }} on GPU {{ $labels.gpu }} of {{ $labels.node }}",
            f"{gpu} reported XID " + "{{ $labels.xid }} {{ $value | humanizeDuration }} ago.",
        ),
        AlertRule(
            "GPUUncorrectableECCErrors",
            "gpu-hardware",
            "gpu-hardware",
            f'increase(gpu_ecc_errors_total{{error_type="uncorrected"}}[{ecc_window}]) > 0',
            "Uncorrectable ECC errors on GPU {{ $labels.gpu }} of {{ $labels.node }}",
            f"{gpu} had " + "{{ $value | humanize }} uncorrectable ECC errors in the last "
            f"{ecc_window}.",
        ),
        AlertRule(
            "GPURemappedRowsFailed",
            "gpu-hardware",
            "gpu-hardware",
            "gpu_remapped_rows_failed == 1",
            "Row remapping failed on GPU {{ $labels.gpu }} of {{ $labels.node }}",
            f"{gpu} could not remap a failing memory row: the GPU needs servicing.",
        ),
        AlertRule(
            "GPUThermalThrottling",
            "gpu-hardware",
            "gpu-hardware",
            _throttle_expr(thermal["reasons"], thermal["window"], thermal["active_ratio"]),
            "GPU {{ $labels.gpu }} on {{ $labels.node }} is thermally throttled",
            f"{gpu} held its clocks down for thermal reasons "
            "{{ $value | humanizePercentage }} of the last " + f"{thermal['window']}.",
        ),
        AlertRule(
            "GPUPowerThrottling",
            "gpu-hardware",
            "gpu-hardware",
            _throttle_expr(power["reasons"], power["window"], power["active_ratio"]),
            "GPU {{ $labels.gpu }} on {{ $labels.node }} is power throttled",
            f"{gpu} held its clocks down at its power limit or power brake "
            "{{ $value | humanizePercentage }} of the last " + f"{power['window']}.",
        ),
        AlertRule(
            "GPUMIGProfileNearlyExhausted",
            "gpu-capacity",
            "mig-management",
            f"{MIG_FREE} / {MIG_INSTANCES} < {_num(free)}",
            "Few free MIG {{ $labels.mig_profile }} instances",
            "Only {{ $value | humanizePercentage }} of the MIG {{ $labels.mig_profile }} "
            "instances are free (held by no pod); pods asking for "
            "nvidia.com/mig-{{ $labels.mig_profile }} may stay Pending.",
        ),
        AlertRule(
            "GPUCapacityExhaustionForecast",
            "gpu-capacity",
            "gpu-capacity",
            f"min by (scope, target) (gpu_analytics_capacity_exhaustion_seconds) < {_num(horizon)}",
            "GPU capacity of {{ $labels.scope }} {{ $labels.target }} forecast to run out",
            "The analytics forecasts allocated GPUs of {{ $labels.scope }} "
            "{{ $labels.target }} to exceed allocatable GPUs in "
            "{{ $value | humanizeDuration }}.",
        ),
        AlertRule(
            "GPUAllocatedIdle",
            "gpu-capacity",
            "gpu-cost",
            f"{_team(POD_IDLE, v.team_label)} > 0",
            "Pod {{ $labels.namespace }}/{{ $labels.pod }} holds an idle GPU",
            "Pod {{ $labels.namespace }}/{{ $labels.pod }} holds "
            "{{ $value | humanize }} GPU-equivalents on "
            f"{gpu}" + "{{ with $labels.mig_profile }} (MIG {{ . }}){{ end }} that stayed "
            f"below the idle threshold for {v.idle_window}.",
        ),
        AlertRule(
            "GPUExporterDown",
            "gpu-monitoring",
            "gpu-monitoring",
            f"up{{{v.exporter_selector}}} == 0",
            "GPU exporter {{ $labels.instance }} is down",
            "Prometheus could not scrape the GPU exporter {{ $labels.instance }} for "
            f"{a['GPUExporterDown'].for_}: that node's GPUs are not measured.",
        ),
        AlertRule(
            "GPUNodeNotScraped",
            "gpu-monitoring",
            "gpu-monitoring",
            "max by (node) (kube_node_status_allocatable{resource=~"
            f"{_q(a['GPUNodeNotScraped']['resource_regex'])}}}) > 0\n"
            "unless on (node)\ngpu_info",
            "GPUs of node {{ $labels.node }} are not scraped",
            "Kubernetes says node {{ $labels.node }} has {{ $value }} allocatable GPU devices, "
            "but Prometheus has no gpu_info from it: no exporter runs there or its scrape "
            "target is missing.",
        ),
        AlertRule(
            "GPUAnalyticsDown",
            "gpu-monitoring",
            "gpu-monitoring",
            f"up{{{v.analytics_selector}}} == 0",
            "GPU analytics {{ $labels.instance }} is down",
            "Prometheus could not scrape the GPU analytics service {{ $labels.instance }} for "
            f"{a['GPUAnalyticsDown'].for_}: cost, idle and forecast metrics are stale.",
        ),
        AlertRule(
            "GPUAnalyticsQueriesFailing",
            "gpu-monitoring",
            "gpu-monitoring",
            "sum by (job, instance) "
            f"(rate(gpu_analytics_prometheus_errors_total[{failing_window}])) > 0\n"
            "or\nmin by (job, instance) (gpu_analytics_cost_refresh_success) == 0\n"
            "or\nmin by (job, instance) (gpu_analytics_forecast_refresh_success) == 0\n"
            "or\nmin by (job, instance) (gpu_analytics_idle_refresh_success) == 0",
            "GPU analytics {{ $labels.instance }} cannot query Prometheus",
            "The GPU analytics service {{ $labels.instance }} has had failing Prometheus "
            f"queries or refreshes for {a['GPUAnalyticsQueriesFailing'].for_}: its reports "
            "and metrics are stale or missing.",
        ),
    ]
    if v.cluster_daily_dollars is not None:
        rules.append(
            AlertRule(
                "GPUDailyCostOverBudget",
                "gpu-cost",
                "cost-management",
                f"{CLUSTER_SPEND} > {CLUSTER_BUDGET}",
                "GPU spend of the last 24 hours is over budget",
                "The cluster's GPUs cost ${{ $value | humanize }} over the last 24 hours, "
                f"above the daily budget of ${_num(v.cluster_daily_dollars)}.",
            )
        )
    if v.team_daily_dollars or v.default_team_daily_dollars is not None:
        rules.append(
            AlertRule(
                "GPUTeamOverBudget",
                "gpu-cost",
                "cost-management",
                f"{TEAM_SPEND} > on (team) {TEAM_BUDGET}",
                "Team {{ $labels.team }} is over its daily GPU budget",
                "Team {{ $labels.team }}'s pods held GPUs worth ${{ $value | humanize }} over "
                "the last 24 hours, above the team's daily budget.",
            )
        )
    return rules


def _throttle_expr(reasons: Sequence[str], window: str, ratio: float) -> str:
    selector = "|".join(reasons)
    return (
        f"max by (node, gpu, uuid, model) (\n  avg_over_time(gpu_clock_event_reason_active"
        f'{{reason=~"{selector}"}}[{window}])\n) >= {_num(ratio)}'
    )


def _seconds(duration: str) -> float:
    return duration_seconds(duration)


def alert_rules(v: Values) -> list[AlertRule]:
    """Every alerting rule, in file order."""
    return _alert_rules(v)


def runbook_anchor(name: str) -> str:
    """The anchor GitHub gives the runbook's `## <name>` heading."""
    return name.lower()


def alerting_rules(v: Values) -> dict[str, Any]:
    """The alert rule file: one group per component area."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rule in _alert_rules(v):
        settings = v.alert(rule.name)
        body: dict[str, Any] = {
            "alert": rule.name,
            "expr": rule.expr.strip() + "\n",
            "for": settings.for_,
            "labels": {
                "severity": rule.severity or settings.severity,
                "component": rule.component,
            },
            "annotations": {
                "summary": rule.summary,
                "description": rule.description,
                "runbook_url": f"{v.runbook_url}#{runbook_anchor(rule.name)}",
            },
        }
        groups.setdefault(rule.group, []).append(body)
    return {"groups": [{"name": name, "rules": rules} for name, rules in groups.items()]}


# -- files -------------------------------------------------------------------------------------


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so the PromQL reads as written."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.nodes.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def _dump(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_LiteralDumper, sort_keys=False, width=1000, allow_unicode=True)


def render(v: Values) -> dict[str, str]:
    """{file name: text} of the generated rule files."""
    source = _display(v.source)
    header = (
        f"# generated by `python -m monitoring.rules` from {source}; do not edit: change the\n"
        "# values and run `make rules`. Names and meanings: docs/rules.md.\n"
    )
    return {
        RECORDING_FILE: "# GPU recording rules: usage, capacity, allocated-but-idle, budgets;\n"
        + header
        + _dump(recording_rules(v)),
        ALERTS_FILE: "# GPU alerts (runbook: docs/runbook.md);\n"
        + header
        + _dump(alerting_rules(v)),
    }


def _display(source: str) -> str:
    path = Path(source)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return source


def write(v: Values, directory: Path) -> list[Path]:
    """Write the rule files into `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render(v).items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with --check, compare) the generated rule files."""
    parser = argparse.ArgumentParser(prog="python -m monitoring.rules", description=__doc__)
    parser.add_argument("--values", type=Path, default=DEFAULT_PATH, help="values file")
    parser.add_argument("--out-dir", type=Path, default=RULES_DIR, help="where the files go")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the files differ from the values"
    )
    args = parser.parse_args(argv)
    try:
        values = load_values(args.values)
    except ValuesError as error:
        print(f"monitoring.rules: {error}", file=sys.stderr)
        return 2
    if args.check:
        stale = [
            name
            for name, text in render(values).items()
            if not (args.out_dir / name).exists() or (args.out_dir / name).read_text() != text
        ]
        for name in stale:
            print(f"{args.out_dir / name} is stale: run `make rules`", file=sys.stderr)
        return 1 if stale else 0
    for path in write(values, args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
