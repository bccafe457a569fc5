"""Grafana dashboards for the GPU metrics, generated so they stay short and consistent.

``python -m monitoring.dashboards`` writes ``dashboards/<uid>.json`` (``--check`` exits 1 when
the committed files differ). Every dashboard takes its data source from a variable, has the
template variables cluster, node, namespace and team, a stable uid, links to the others (by
tag, keeping time and variables), and a unit on every panel. Thresholds drawn on panels come
from `monitoring/values.yaml`, as the alerts' do. Import: see README ("Dashboards and alerts").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitoring import rules as r
from monitoring.promql import with_matcher
from monitoring.values import DEFAULT_PATH, Values, ValuesError, load_values

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = REPO_ROOT / "dashboards"
TAG = "k8s-gpu-monitor"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
#: Hours in an average month (365.25 * 24 / 12), for monthly figures from hourly rates.
HOURS_PER_MONTH = 730.5

# Selectors built from the template variables.
C = 'cluster=~"$cluster"'
N = f'{C}, node=~"$node"'
NS = f'{C}, namespace=~"$namespace"'
POD = f'{N}, namespace=~"$namespace", label_team=~"$team"'
TEAM = f'{C}, team=~"$team"'


@dataclass(frozen=True)
class Target:
    """One query of a panel; `instant` for stat, gauge, bar gauge and table panels."""

    expr: str
    legend: str = ""
    instant: bool = False


@dataclass
class Panel:
    """A panel before layout: what it shows and how wide it is (of 24 columns)."""

    title: str
    kind: str  # timeseries, stat, gauge, bargauge, table
    targets: list[Target]
    unit: str
    description: str
    width: int = 12
    height: int = 8
    minimum: float | None = None
    maximum: float | None = None
    thresholds: list[tuple[float, str]] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)
    stack: bool = False
    column_units: dict[str, str] = field(default_factory=dict)
    hidden_columns: tuple[str, ...] = ()
    decimals: int | None = None


def ts(title: str, unit: str, description: str, *targets: Target, **kw: Any) -> Panel:
    return Panel(title, "timeseries", list(targets), unit, description, **kw)


def stat(title: str, unit: str, description: str, expr: str, **kw: Any) -> Panel:
    kw.setdefault("width", 4)
    kw.setdefault("height", 4)
    return Panel(title, "stat", [Target(expr, title, instant=True)], unit, description, **kw)


def table(title: str, unit: str, description: str, *targets: Target, **kw: Any) -> Panel:
    instant = [Target(t.expr, t.legend, instant=True) for t in targets]
    return Panel(title, "table", instant, unit, description, **kw)


def bars(title: str, unit: str, description: str, *targets: Target, **kw: Any) -> Panel:
    instant = [Target(t.expr, t.legend, instant=True) for t in targets]
    return Panel(title, "bargauge", instant, unit, description, **kw)


def link(uid: str, title: str, var: str | None = None) -> dict[str, str]:
    """A data link to another dashboard, passing a clicked series' label as its variable."""
    extra = f"&var-{var}=${{__field.labels.{var}}}" if var else ""
    return {
        "title": title,
        "url": f"/d/{uid}?${{__url_time_range}}&${{datasource:queryparam}}"
        f"&${{cluster:queryparam}}{extra}",
    }


# -- the dashboards ----------------------------------------------------------------------------

OVERVIEW = "gpu-overview"
NODE = "gpu-node"
MIG = "gpu-mig"
WORKLOADS = "gpu-workloads"
COST = "gpu-cost"
IDLE = "gpu-idle"
FORECAST = "gpu-forecast"


def _activity(selector: str, by: str = "") -> str:
    group = f"by ({by}) " if by else ""
    return (
        f"sum {group}({r.DEVICE_ACTIVITY}{{{selector}}} "
        f"* on (uuid, mig_uuid) group_left {r.DEVICE_SHARE})\n"
        f"/ sum {group}({r.DEVICE_SHARE}{{{selector}}} "
        f"and on (uuid, mig_uuid) {r.DEVICE_ACTIVITY})"
    )


def overview(v: Values) -> list[Panel]:
    temp = v.alert("GPUHighTemperature")["threshold_celsius"]
    node_link = [link(NODE, "Node detail", "node")]
    return [
        stat("GPUs", "short", "Physical GPUs reporting (gpu_info).", f"count(gpu_info{{{N}}})"),
        stat(
            "GPUs up",
            "short",
            "GPUs the exporters read in their last collection (gpu_up); fewer than GPUs means "
            "lost or failing GPUs.",
            f"sum(gpu_up{{{N}}})",
        ),
        stat(
            "Active allocations",
            "short",
            "Pod-device holdings: each pod on each GPU or MIG instance it holds.",
            f"count({r.POD_DEVICES}{{{N}}}) or vector(0)",
        ),
        stat(
            "GPU-equivalents allocated",
            "short",
            "GPUs held by pods, MIG instances counted as k/7 of a GPU.",
            f"sum({r.NODE_ALLOCATED}{{{N}}})",
            decimals=2,
        ),
        stat(
            "GPU activity",
            "percentunit",
            "Utilization of whole GPUs and SM activity of MIG instances, weighted by size.",
            _activity(N),
            thresholds=[(0.0, "red"), (0.2, "orange"), (0.5, "green")],
        ),
        stat(
            "Firing GPU alerts",
            "short",
            "Alerts of rules/gpu-alerts.yml firing now.",
            f'count(ALERTS{{{C}, alertstate="firing", alertname=~"GPU.*"}}) or vector(0)',
            thresholds=[(0.0, "green"), (1.0, "red")],
        ),
        ts(
            "GPU activity by node",
            "percentunit",
            "GPU activity per node, weighted by GPU-equivalents (node:gpu_activity_ratio:"
            "weighted_avg).",
            Target(f"{r.NODE_ACTIVITY}{{{N}}}", "{{node}}"),
            minimum=0,
            maximum=1,
            links=node_link,
        ),
        ts(
            "GPU temperature",
            "celsius",
            f"Core temperature of each GPU; the alert threshold ({temp} °C) is drawn.",
            Target(f"gpu_temperature_celsius{{{N}}}", "{{node}} GPU {{gpu}}"),
            thresholds=[(0.0, "green"), (float(temp), "red")],
            links=node_link,
        ),
        bars(
            "MIG instances by profile",
            "short",
            "MIG instances held by pods and free, per profile, and how many more the current "
            "layouts could create.",
            Target(r.MIG_ALLOCATED, "{{mig_profile}} held"),
            Target(r.MIG_FREE, "{{mig_profile}} free"),
            Target(f"{r.MIG_CREATABLE} > 0", "{{mig_profile}} creatable"),
            width=8,
            links=[link(MIG, "MIG slices")],
        ),
        ts(
            "GPU cost per hour",
            "currencyUSD",
            "What the GPUs cost per hour: held by pods, and held by nobody.",
            Target("cluster:gpu_cost_dollars_per_hour:allocated", "held by pods"),
            Target("cluster:gpu_cost_dollars_per_hour:unallocated", "held by nobody"),
            width=8,
            stack=True,
            links=[link(COST, "Cost")],
        ),
        ts(
            "GPU-equivalents: capacity, allocated, idle",
            "short",
            "Physical GPUs, the GPU-equivalents pods hold, and those held but idle.",
            Target(f"sum({r.NODE_DEVICES}{{{N}}})", "GPUs"),
            Target(f"sum({r.NODE_ALLOCATED}{{{N}}})", "allocated"),
            Target(f"sum({r.POD_IDLE}{{{N}}}) or vector(0)", "allocated but idle"),
            width=8,
            links=[link(IDLE, "Idle and savings")],
        ),
        table(
            "Nodes",
            "short",
            "Per node: GPUs, GPU-equivalents held, activity, memory used and price per hour.",
            Target(f"{r.NODE_DEVICES}{{{N}}}", "GPUs"),
            Target(f"{r.NODE_ALLOCATED}{{{N}}}", "allocated"),
            Target(f"{r.NODE_ACTIVITY}{{{N}}}", "activity"),
            Target(f"{r.NODE_MEMORY_USED}{{{N}}} / {r.NODE_MEMORY_TOTAL}", "memory used"),
            Target(f"node:gpu_price_dollars_per_hour:sum{{{N}}}", "price per hour"),
            width=24,
            column_units={
                "Value #C": "percentunit",
                "Value #D": "percentunit",
                "Value #E": "currencyUSD",
            },
            links=node_link,
        ),
    ]


def node_detail(v: Values) -> list[Panel]:
    temp = v.alert("GPUHighTemperature")["threshold_celsius"]
    g = f'{N}, gpu=~"$gpu"'
    throttling = (
        *v.alert("GPUThermalThrottling")["reasons"],
        *v.alert("GPUPowerThrottling")["reasons"],
    )
    reasons = "|".join(throttling)
    legend = "{{node}} GPU {{gpu}}"
    return [
        stat("GPUs", "short", "GPUs of the selected nodes.", f"count(gpu_info{{{g}}})"),
        stat("GPUs up", "short", "GPUs read in the last collection.", f"sum(gpu_up{{{g}}})"),
        stat("Power draw", "watt", "Power drawn by the GPUs.", f"sum(gpu_power_watts{{{g}}})"),
        stat(
            "Memory used",
            "percentunit",
            "Device memory in use.",
            f"sum(gpu_memory_used_bytes{{{g}}}) / sum(gpu_memory_total_bytes{{{g}}})",
        ),
        stat(
            "GPU processes",
            "short",
            "Processes using the nodes' GPUs (GPU sessions).",
            f"sum(gpu_node_processes{{{N}}})",
        ),
        stat(
            "Energy over the range",
            "kwatth",
            "Energy the GPUs consumed over the dashboard's time range.",
            f"sum(increase(gpu_energy_joules_total{{{g}}}[$__range])) / 3600000",
        ),
        ts(
            "Activity",
            "percentunit",
            "Utilization of whole GPUs, SM activity of MIG instances (GPM, Hopper and newer).",
            Target(
                f"{r.DEVICE_ACTIVITY}{{{g}}}",
                "{{node}} GPU {{gpu}} {{mig_profile}} {{gpu_instance}}",
            ),
            minimum=0,
            maximum=1,
        ),
        ts(
            "Memory used",
            "bytes",
            "Device memory allocated by processes and the driver, and the total.",
            Target(f"gpu_memory_used_bytes{{{g}}}", f"{legend} used"),
            Target(f"gpu_memory_total_bytes{{{g}}}", f"{legend} total"),
        ),
        ts(
            "Temperature",
            "celsius",
            f"Core temperature; the alert threshold ({temp} °C) is drawn.",
            Target(f"gpu_temperature_celsius{{{g}}}", legend),
            thresholds=[(0.0, "green"), (float(temp), "red")],
            width=8,
        ),
        ts(
            "Power and limit",
            "watt",
            "Board power and the limit the driver enforces.",
            Target(f"gpu_power_watts{{{g}}}", f"{legend} draw"),
            Target(f"gpu_power_limit_watts{{{g}}}", f"{legend} limit"),
            width=8,
        ),
        ts(
            "SM clock",
            "hertz",
            "Streaming-multiprocessor clock.",
            Target(f'gpu_clock_hertz{{{g}, clock="sm"}}', legend),
            width=8,
        ),
        ts(
            "GPUs held down, by reason",
            "short",
            "How many GPUs have each thermal or power clock-event (throttle) reason active: "
            "the reasons the throttling alerts watch.",
            Target(
                f'sum by (reason) (gpu_clock_event_reason_active{{{g}, reason=~"{reasons}"}})',
                "{{reason}}",
            ),
            width=8,
            stack=True,
        ),
        ts(
            "PCIe throughput",
            "Bps",
            "PCIe traffic by direction.",
            Target(f"gpu_pcie_throughput_bytes_per_second{{{g}}}", f"{legend} {{{{direction}}}}"),
            width=8,
        ),
        ts(
            "NVLink throughput",
            "Bps",
            "Data sent and received over NVLink.",
            Target(
                f"rate(gpu_nvlink_transmitted_bytes_total{{{g}}}[$__rate_interval])",
                f"{legend} sent",
            ),
            Target(
                f"rate(gpu_nvlink_received_bytes_total{{{g}}}[$__rate_interval])",
                f"{legend} received",
            ),
            width=8,
        ),
        ts(
            "Video engines",
            "percentunit",
            "Encoder and decoder utilization.",
            Target(f"gpu_encoder_utilization_ratio{{{g}}}", f"{legend} encoder"),
            Target(f"gpu_decoder_utilization_ratio{{{g}}}", f"{legend} decoder"),
            width=8,
        ),
        ts(
            "Performance state",
            "short",
            "P-state: 0 is maximum performance, 8 idle, 15 minimum.",
            Target(f"gpu_performance_state{{{g}}}", legend),
            width=8,
            decimals=0,
        ),
        table(
            "Memory errors",
            "short",
            "ECC errors over the range, remapped rows, and remappings pending (reset needed) or "
            "failed (service the GPU).",
            Target(
                f"sum by (node, gpu, error_type) (increase(gpu_ecc_errors_total{{{g}}}[$__range]))",
                "ECC errors",
            ),
            Target(f"sum by (node, gpu, cause) (gpu_remapped_rows{{{g}}})", "remapped rows"),
            Target(
                f"gpu_remapped_rows_pending{{{g}}} + gpu_remapped_rows_failed", "pending+failed"
            ),
            width=12,
        ),
        table(
            "XID errors",
            "short",
            "XID errors reported since each exporter started, by code, and when last seen.",
            Target(f"sum by (node, gpu, xid) (gpu_xid_errors_total{{{g}}})", "count"),
            Target(
                f"max by (node, gpu, xid) (gpu_xid_last_seen_timestamp_seconds{{{g}}}) * 1000",
                "last seen",
            ),
            width=12,
            column_units={"Value #B": "dateTimeAsIso"},
        ),
        ts(
            "Exporter collection time",
            "s",
            "Time each collector took per cycle; one failing collector never fails the scrape.",
            Target(
                f"gpu_exporter_collector_duration_seconds{{{N}}}",
                "{{node}} {{collector}}",
            ),
        ),
        ts(
            "Exporter NVML errors",
            "short",
            "Failed NVML calls per second, by function and kind.",
            Target(
                f"sum by (node, function, kind) "
                f"(rate(gpu_exporter_nvml_errors_total{{{N}}}[$__rate_interval]))",
                "{{node}} {{function}} {{kind}}",
            ),
        ),
    ]


def mig_slices(v: Values) -> list[Panel]:
    free_ratio = v.alert("GPUMIGProfileNearlyExhausted")["free_ratio_below"]
    mig = f'{N}, mig_uuid!=""'
    return [
        stat("MIG instances", "short", "MIG instances that exist.", f"sum({r.MIG_INSTANCES})"),
        stat("Held", "short", "MIG instances held by a pod.", f"sum({r.MIG_ALLOCATED})"),
        stat("Free", "short", "Instances that exist and no pod holds.", f"sum({r.MIG_FREE})"),
        stat(
            "Creatable",
            "short",
            "Instances the current layouts still have room for, summed over profiles (one "
            "slice may count toward several profiles).",
            f"sum({r.MIG_CREATABLE})",
        ),
        stat(
            "Free of the scarcest profile",
            "percentunit",
            "The lowest share of free instances over profiles that exist; the alert fires "
            f"below {free_ratio:g}.",
            f"min({r.MIG_FREE} / ({r.MIG_INSTANCES} > 0))",
            thresholds=[(0.0, "red"), (free_ratio, "green")],
        ),
        stat(
            "MIG memory used",
            "percentunit",
            "Memory used over memory of all MIG instances.",
            f"sum(gpu_mig_memory_used_bytes{{{N}}}) / sum(gpu_mig_memory_total_bytes{{{N}}})",
        ),
        table(
            "Instances by profile",
            "short",
            "Per profile: instances, held, free, creatable.",
            Target(f"{r.MIG_INSTANCES} > 0", "instances"),
            Target(r.MIG_ALLOCATED, "held"),
            Target(f"{r.MIG_FREE} and {r.MIG_INSTANCES} > 0", "free"),
            Target(r.MIG_CREATABLE, "creatable"),
        ),
        bars(
            "Free share by profile",
            "percentunit",
            "Free instances over instances, per profile that exists.",
            Target(f"{r.MIG_FREE} / ({r.MIG_INSTANCES} > 0)", "{{mig_profile}}"),
            minimum=0,
            maximum=1,
            thresholds=[(0.0, "red"), (free_ratio, "green")],
        ),
        table(
            "Layouts per GPU",
            "short",
            "Instances per profile on each MIG-enabled GPU, and how many more fit.",
            Target(
                f"sum by (node, gpu, mig_profile) (gpu_mig_instances{{{N}}}) > 0",
                "instances",
            ),
            Target(
                f"sum by (node, gpu, mig_profile) (gpu_mig_instances_available{{{N}}}) > 0",
                "creatable",
            ),
            links=[link(NODE, "Node detail", "node")],
        ),
        table(
            "Who holds which instance",
            "none",
            "Each MIG instance held by a pod, with its profile and GPU.",
            Target(
                f"max by (node, gpu, mig_profile, gpu_instance, namespace, pod, label_team) "
                f'(gpu_allocation_info{{{POD}, mig_uuid!=""}})',
                "held",
            ),
            hidden_columns=("Value",),
            links=[link(WORKLOADS, "Processes and pods", "namespace")],
        ),
        ts(
            "Memory used per instance",
            "bytes",
            "Memory allocated in each MIG instance.",
            Target(
                f"gpu_mig_memory_used_bytes{{{mig}}}",
                "{{node}} GPU {{gpu}} {{mig_profile}} #{{gpu_instance}}",
            ),
        ),
        ts(
            "SM activity per instance",
            "percentunit",
            "SM activity of MIG instances, where the GPU has GPM (Hopper and newer).",
            Target(
                f"gpu_mig_sm_activity_ratio{{{mig}}}",
                "{{node}} GPU {{gpu}} {{mig_profile}} #{{gpu_instance}}",
            ),
            minimum=0,
            maximum=1,
        ),
        ts(
            "Activity by profile",
            "percentunit",
            "Mean SM activity of each profile's instances (GPM only).",
            Target(r.MIG_PROFILE_ACTIVITY, "{{model}} {{mig_profile}}"),
            minimum=0,
            maximum=1,
        ),
        ts(
            "Memory by profile",
            "bytes",
            "Memory used and total, per model and profile.",
            Target(r.MIG_PROFILE_MEMORY_USED, "{{model}} {{mig_profile}} used"),
            Target(r.MIG_PROFILE_MEMORY_TOTAL, "{{model}} {{mig_profile}} total"),
        ),
    ]


def workloads(v: Values) -> list[Panel]:
    pods = f"{{{POD}}}"
    return [
        table(
            "GPU processes",
            "bytes",
            "Every process using a GPU or MIG instance, with its pod, and its device memory. "
            "The command is the process name, never its arguments.",
            Target(
                "max by (node, gpu, mig_profile, gpu_instance, pid, command, namespace, pod, "
                f"container) (gpu_process_memory_used_bytes{pods})",
                "memory",
            ),
            width=24,
        ),
        ts(
            "Memory per pod",
            "bytes",
            "Device memory of each pod's GPU processes.",
            Target(
                f"sum by (namespace, pod) (gpu_process_memory_used_bytes{pods})",
                "{{namespace}}/{{pod}}",
            ),
            stack=True,
        ),
        ts(
            "SM utilization per pod",
            "percentunit",
            "Share of time each pod's processes ran kernels (whole GPUs; NVML has no "
            "per-process utilization on MIG).",
            Target(
                f"sum by (namespace, pod) (gpu_process_sm_utilization_ratio{pods})",
                "{{namespace}}/{{pod}}",
            ),
        ),
        ts(
            "Activity of what each pod holds",
            "percentunit",
            "Busy over measured GPU-equivalents each pod holds.",
            Target(
                f"sum by (namespace, pod) ({r.POD_UTILIZED}{pods})\n"
                f"/ sum by (namespace, pod) ({r.POD_MEASURED}{pods})",
                "{{namespace}}/{{pod}}",
            ),
            minimum=0,
            maximum=1,
        ),
        ts(
            "GPU-equivalents per pod",
            "short",
            "GPUs held by each pod, MIG instances as k/7, shared GPUs split.",
            Target(
                f"sum by (namespace, pod) ({r.POD_DEVICES}{pods})",
                "{{namespace}}/{{pod}}",
            ),
            stack=True,
        ),
        ts(
            "GPU sessions per node",
            "short",
            "Processes using any GPU of each node.",
            Target(f"gpu_node_processes{{{N}}}", "{{node}}"),
            width=8,
        ),
        ts(
            "Processes per GPU",
            "short",
            "Processes using each GPU or its MIG instances.",
            Target(f"gpu_processes{{{N}}}", "{{node}} GPU {{gpu}}"),
            width=8,
        ),
        stat(
            "Process series dropped",
            "short",
            "Per-process series left out over the range because a GPU had more processes than "
            "the exporter's cap (--process-series-limit).",
            f"sum(increase(gpu_exporter_process_series_dropped_total{{{N}}}[$__range]))",
            width=8,
            height=8,
        ),
        table(
            "Allocations",
            "currencyUSD",
            "Which pod holds which GPU or MIG instance, its GPU-equivalents and what it costs "
            "per hour.",
            Target(f"{r.POD_COST}{pods}", "cost per hour"),
            Target(f"{r.POD_DEVICES}{pods}", "GPU-equivalents"),
            width=24,
            column_units={"Value #B": "short"},
            links=[link(COST, "Cost", "namespace")],
        ),
    ]


def cost(v: Values) -> list[Panel]:
    ns = f"{{{NS}}}"
    team = f"{{{TEAM}}}"
    panels = [
        stat(
            "Cost per hour, held",
            "currencyUSD",
            "What the GPUs pods hold cost per hour.",
            "cluster:gpu_cost_dollars_per_hour:allocated",
        ),
        stat(
            "Cost per hour, unallocated",
            "currencyUSD",
            "What the GPUs and slices nobody holds cost per hour.",
            "cluster:gpu_cost_dollars_per_hour:unallocated",
        ),
        stat(
            "Spend, last 24 hours",
            "currencyUSD",
            "Every priced GPU, held or not, over the last 24 hours.",
            r.CLUSTER_SPEND,
        ),
        stat(
            "Daily budget used",
            "percentunit",
            "The last 24 hours' spend over the daily budget (monitoring/values.yaml).",
            f"{r.CLUSTER_SPEND} / {r.CLUSTER_BUDGET}",
            thresholds=[(0.0, "green"), (0.8, "orange"), (1.0, "red")],
        ),
        stat(
            "Projected per month",
            "currencyUSD",
            "Today's price per hour of every GPU, over an average month.",
            f"cluster:gpu_price_dollars_per_hour:sum * {HOURS_PER_MONTH:g}",
        ),
        stat(
            "Unpriced devices",
            "short",
            "GPUs and MIG instances without a price (not costed, never counted as $0).",
            "(count(device:gpu_unpriced:info) or vector(0)) + "
            "(count(mig:gpu_unpriced:info) or vector(0))",
            thresholds=[(0.0, "green"), (1.0, "orange")],
        ),
        ts(
            "Cost per hour by namespace",
            "currencyUSD",
            "What each namespace's pods hold, per hour.",
            Target(f"{r.NAMESPACE_COST}{ns}", "{{namespace}}"),
            stack=True,
            links=[link(WORKLOADS, "Processes and pods", "namespace")],
        ),
        ts(
            "Cost per hour by team",
            "currencyUSD",
            "What each team's pods hold, per hour (pod label team).",
            Target(f"{r.TEAM_COST}{team}", "{{team}}"),
            stack=True,
        ),
        table(
            "Team spend and budget, last 24 hours",
            "currencyUSD",
            "Each team's spend over the last 24 hours against its daily budget.",
            Target(f"{r.TEAM_SPEND}{team}", "spend"),
            Target(f"{r.TEAM_BUDGET}{team}", "budget"),
            Target(f"{r.TEAM_SPEND}{team} / on (team) {r.TEAM_BUDGET}", "used"),
            column_units={"Value #C": "percentunit"},
        ),
        bars(
            "Namespace spend, last 24 hours",
            "currencyUSD",
            "What each namespace's pods held over the last 24 hours.",
            Target(f"{r.NAMESPACE_SPEND}{ns}", "{{namespace}}"),
        ),
        ts(
            "Daily spend and budget",
            "currencyUSD",
            "The trailing 24-hour spend over time, against the daily budget.",
            Target(r.CLUSTER_SPEND, "spend, last 24 hours"),
            Target(r.CLUSTER_BUDGET, "budget"),
            width=24,
        ),
        bars(
            "Cost per hour by model",
            "currencyUSD",
            "Held GPUs' cost per hour by GPU model.",
            Target("model:gpu_cost_dollars_per_hour:sum", "{{model}}"),
            width=8,
        ),
        bars(
            "Cost per hour by node",
            "currencyUSD",
            "Held GPUs' cost per hour by node.",
            Target(f"node:gpu_cost_dollars_per_hour:sum{{{N}}}", "{{node}}"),
            width=8,
            links=[link(NODE, "Node detail", "node")],
        ),
        bars(
            "Cost per hour by MIG profile",
            "currencyUSD",
            "Held MIG instances' cost per hour by model and profile.",
            Target("mig_profile:gpu_cost_dollars_per_hour:sum", "{{model}} {{mig_profile}}"),
            width=8,
        ),
        ts(
            "Cost per hour as the analytics service reports it",
            "currencyUSD",
            "The same recorded costs, as the analytics service publishes them (its namespace "
            "and team cost metrics).",
            Target(
                f"sum by (namespace) (gpu_analytics_namespace_cost_dollars_per_hour{ns})",
                "namespace {{namespace}}",
            ),
            Target(
                f"sum by (team) (gpu_analytics_team_cost_dollars_per_hour{team})",
                "team {{team}}",
            ),
            width=24,
        ),
    ]
    return panels


def idle(v: Values) -> list[Panel]:
    ns = f"{{{NS}}}"
    team = f"{{{TEAM}}}"
    threshold = v.idle_threshold
    return [
        stat(
            "Idle GPU-equivalents",
            "short",
            f"Held by pods but below {threshold:g} activity for the whole {v.idle_window}.",
            r.CLUSTER_IDLE,
            decimals=2,
        ),
        stat(
            "Idle cost per hour",
            "currencyUSD",
            "What the idle holdings cost per hour.",
            r.CLUSTER_IDLE_COST,
        ),
        stat(
            "Idle cost per month",
            "currencyUSD",
            "The idle holdings' cost per hour over an average month.",
            f"{r.CLUSTER_IDLE_COST} * {HOURS_PER_MONTH:g}",
        ),
        stat(
            "Unallocated GPU-equivalents",
            "short",
            "GPUs, MIG instances and slices nobody holds.",
            r.CLUSTER_UNALLOCATED,
            decimals=2,
        ),
        stat(
            "Unallocated cost per hour",
            "currencyUSD",
            "What the capacity nobody holds costs per hour.",
            "cluster:gpu_cost_dollars_per_hour:unallocated",
        ),
        stat(
            "Potential savings per month",
            "currencyUSD",
            "The analytics service's estimate of what reclaiming idle and unallocated GPUs "
            "would save per month.",
            "sum(gpu_analytics_potential_monthly_savings_dollars)",
        ),
        ts(
            "Idle GPU-equivalents by namespace",
            "short",
            "Idle holdings per namespace.",
            Target(f"{r.NAMESPACE_IDLE}{ns}", "{{namespace}}"),
            stack=True,
        ),
        ts(
            "Idle cost per hour by team",
            "currencyUSD",
            "What each team's idle holdings cost per hour.",
            Target(f"{r.TEAM_IDLE_COST}{team}", "{{team}}"),
            stack=True,
        ),
        table(
            "Idle pods",
            "short",
            "Pods holding a device that stayed idle for the idle window: GPU-equivalents and "
            "cost per hour.",
            Target(
                f'label_replace({r.POD_IDLE}{{{POD}}}, "team", "$1", "label_team", "(.+)")',
                "GPU-equivalents",
            ),
            Target(
                f"label_replace({r.POD_COST}{{{POD}}} and on (namespace, pod, uuid, mig_uuid) "
                f'{r.POD_IDLE}, "team", "$1", "label_team", "(.+)")',
                "cost per hour",
            ),
            width=24,
            column_units={"Value #B": "currencyUSD"},
            links=[link(WORKLOADS, "Processes and pods", "namespace")],
        ),
        bars(
            f"Highest activity over the last {v.idle_window}",
            "percentunit",
            "Per device with an activity reading; below the threshold it counts as idle when "
            "a pod holds it.",
            Target(
                f"{r.IDLE_MAX}{{{N}}}",
                "{{node}} GPU {{gpu}} {{mig_profile}} {{gpu_instance}}",
            ),
            minimum=0,
            maximum=1,
            thresholds=[(0.0, "red"), (threshold, "green")],
        ),
        bars(
            "Unallocated GPU-equivalents by node",
            "short",
            "Capacity nobody holds, per node.",
            Target(f"{r.NODE_UNALLOCATED}{{{N}}}", "{{node}}"),
            links=[link(NODE, "Node detail", "node")],
        ),
        ts(
            "Idle GPUs as the analytics service reports them",
            "short",
            "gpu_analytics_idle_devices: idle GPU-equivalents per namespace and team.",
            Target(
                f'sum by (namespace, team) (gpu_analytics_idle_devices{{{NS}, team=~"$team"}})',
                "{{namespace}} {{team}}",
            ),
        ),
        ts(
            "Idle cost as the analytics service reports it",
            "currencyUSD",
            "gpu_analytics_idle_cost_dollars_per_hour per namespace and team.",
            Target(
                "sum by (namespace, team) "
                f'(gpu_analytics_idle_cost_dollars_per_hour{{{NS}, team=~"$team"}})',
                "{{namespace}} {{team}}",
            ),
        ),
    ]


def forecast(v: Values) -> list[Panel]:
    an = v.analytics_selector

    def bounds(metric: str, scope: str, target: str) -> list[Target]:
        sel = f'{C}, scope="{scope}", target=~"{target}", horizon="$horizon"'
        return [
            Target(f'{metric}{{{sel}, bound="{b}"}}', f"{{{{target}}}} {b}")
            for b in ("mean", "lower", "upper")
        ]

    return [
        ts(
            "Cluster: allocated GPU-equivalents and forecast",
            "short",
            "GPU-equivalents held and physical GPUs, with the analytics service's forecast "
            "for the chosen horizon (mean and bounds).",
            Target(r.CLUSTER_ALLOCATED, "allocated"),
            Target(r.CLUSTER_DEVICES, "GPUs"),
            *bounds("gpu_analytics_forecast_allocated_devices", "cluster", "cluster"),
            width=24,
        ),
        ts(
            "Cluster: activity forecast",
            "percentunit",
            "Mean GPU activity now and as forecast (mean and bounds).",
            Target(r.CLUSTER_ACTIVITY, "activity"),
            *bounds("gpu_analytics_forecast_activity_ratio", "cluster", "cluster"),
            minimum=0,
            maximum=1,
        ),
        bars(
            "Headroom at each horizon",
            "short",
            "Physical GPUs minus the upper bound of the forecast allocation; below 0 the "
            "cluster runs out.",
            Target(
                f"{r.CLUSTER_DEVICES} - on () group_right "
                f'gpu_analytics_forecast_allocated_devices{{{C}, scope="cluster", '
                'bound="upper"}',
                "{{horizon}}",
            ),
            thresholds=[(float("-inf"), "red"), (0.0, "orange"), (1.0, "green")],
        ),
        ts(
            "Nodes: allocation forecast",
            "short",
            "Per selected node: GPU-equivalents held, and the forecast with its bounds.",
            Target(f"{r.NODE_ALLOCATED}{{{N}}}", "{{node}} allocated"),
            *bounds("gpu_analytics_forecast_allocated_devices", "node", "$node"),
        ),
        ts(
            "Namespaces: allocation forecast",
            "short",
            "Per selected namespace: GPU-equivalents held, and the forecast with its bounds.",
            Target(f"{r.NAMESPACE_ALLOCATED}{{{NS}}}", "{{namespace}} allocated"),
            *bounds("gpu_analytics_forecast_allocated_devices", "namespace", "$namespace"),
        ),
        ts(
            "Teams: allocation forecast",
            "short",
            "Per selected team: GPU-equivalents held, and the forecast with its bounds.",
            Target(f"{r.TEAM_ALLOCATED}{{{TEAM}}}", "{{team}} allocated"),
            *bounds("gpu_analytics_forecast_allocated_devices", "team", "$team"),
        ),
        ts(
            "Allocatable and allocated devices by resource",
            "short",
            "The kubelets' allocatable devices and those held, per extended resource.",
            Target(r.CLUSTER_ALLOCATABLE, "{{resource}} allocatable"),
            Target(r.CLUSTER_ALLOCATED_UNITS, "{{resource}} allocated"),
        ),
        stat(
            "Forecast refresh",
            "short",
            "1 when the analytics service's last forecast refresh succeeded.",
            "min(gpu_analytics_forecast_refresh_success)",
            thresholds=[(0.0, "red"), (1.0, "green")],
        ),
        stat(
            "Cost refresh",
            "short",
            "1 when the analytics service's last cost refresh succeeded.",
            "min(gpu_analytics_cost_refresh_success)",
            thresholds=[(0.0, "red"), (1.0, "green")],
        ),
        stat(
            "Analytics up",
            "short",
            "Analytics service instances Prometheus scrapes successfully.",
            f"sum(up{{{an}}})",
            thresholds=[(0.0, "red"), (1.0, "green")],
        ),
        ts(
            "Analytics requests",
            "reqps",
            "Requests the analytics service served per second, by endpoint and status.",
            Target(
                "sum by (endpoint, status) "
                "(rate(gpu_analytics_http_requests_total[$__rate_interval]))",
                "{{endpoint}} {{status}}",
            ),
            width=8,
        ),
        ts(
            "Analytics latency (p90)",
            "s",
            "90th percentile time to serve a request, by endpoint.",
            Target(
                "histogram_quantile(0.9, sum by (endpoint, le) "
                "(rate(gpu_analytics_http_request_duration_seconds_bucket[$__rate_interval])))",
                "{{endpoint}}",
            ),
            width=8,
        ),
        ts(
            "Analytics: failed Prometheus calls",
            "short",
            "Failed calls to Prometheus per second, by kind (unavailable, query).",
            Target(
                "sum by (kind) (rate(gpu_analytics_prometheus_errors_total[$__rate_interval]))",
                "{{kind}}",
            ),
            width=8,
        ),
    ]


@dataclass(frozen=True)
class Spec:
    uid: str
    title: str
    description: str
    build: Any
    extra_variables: tuple[str, ...] = ()


DASHBOARDS: tuple[Spec, ...] = (
    Spec(
        OVERVIEW,
        "GPU / Cluster overview",
        "GPUs, allocations, activity, temperature, MIG, cost.",
        overview,
    ),
    Spec(
        NODE,
        "GPU / Node and device detail",
        "Every reading of the selected nodes' GPUs.",
        node_detail,
        ("gpu",),
    ),
    Spec(
        MIG,
        "GPU / MIG slices",
        "MIG instances: layouts, holders, free capacity, activity.",
        mig_slices,
    ),
    Spec(
        WORKLOADS,
        "GPU / Processes and pods",
        "GPU processes and the pods that hold GPUs.",
        workloads,
    ),
    Spec(
        COST,
        "GPU / Cost",
        "GPU cost by namespace, team, model and node; spend against budgets.",
        cost,
    ),
    Spec(
        IDLE,
        "GPU / Idle and savings",
        "Allocated-but-idle and unallocated GPUs and their cost.",
        idle,
    ),
    Spec(
        FORECAST,
        "GPU / Capacity forecast",
        "Allocation and activity forecasts with bounds; the analytics service's health.",
        forecast,
        ("horizon",),
    ),
)


# -- JSON --------------------------------------------------------------------------------------


def _variables(extra: Sequence[str]) -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": expr,
            "query": {"query": expr, "refId": f"{name}-variable"},
            "refresh": 2,
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "hide": 0,
            "options": [],
            "regex": "",
        }

    out: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        },
        query("cluster", "Cluster", "label_values(gpu_info, cluster)"),
        query("node", "Node", 'label_values(gpu_info{cluster=~"$cluster"}, node)'),
        query(
            "namespace",
            "Namespace",
            'label_values(gpu_allocation_info{cluster=~"$cluster"}, namespace)',
        ),
        query("team", "Team", f'label_values({r.TEAM_COST}{{cluster=~"$cluster"}}, team)'),
    ]
    if "gpu" in extra:
        out.append(
            query("gpu", "GPU", 'label_values(gpu_info{cluster=~"$cluster", node=~"$node"}, gpu)')
        )
    if "horizon" in extra:
        out.append(
            {
                "name": "horizon",
                "label": "Forecast horizon",
                "type": "custom",
                "query": "1h,6h,24h",
                "includeAll": False,
                "multi": False,
                "current": {"selected": True, "text": "24h", "value": "24h"},
                "options": [
                    {"selected": h == "24h", "text": h, "value": h} for h in ("1h", "6h", "24h")
                ],
                "hide": 0,
            }
        )
    return out


def _panel_json(panel: Panel, pid: int, pos: dict[str, int]) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "links": panel.links}
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    steps = panel.thresholds or [(float("-inf"), "green")]
    defaults["thresholds"] = {
        "mode": "absolute",
        "steps": [{"color": c, "value": None if i == 0 else t} for i, (t, c) in enumerate(steps)],
    }
    defaults["color"] = {"mode": "palette-classic" if panel.kind == "timeseries" else "thresholds"}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 5,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if panel.thresholds else "off"},
        }
    overrides = [
        {
            "matcher": {"id": "byName", "options": column},
            "properties": [{"id": "unit", "value": unit}],
        }
        for column, unit in panel.column_units.items()
    ]
    targets = []
    for i, target in enumerate(panel.targets):
        entry: dict[str, Any] = {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            # Every selector honours the cluster variable, recorded series included.
            "expr": with_matcher(target.expr, "cluster", C),
            "legendFormat": target.legend or "__auto",
            "range": not target.instant,
            "instant": target.instant,
        }
        if panel.kind == "table":
            entry["format"] = "table"
        targets.append(entry)
    body: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": pos,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": _options(panel),
    }
    if panel.kind == "table":
        body["transformations"] = _table_transformations(panel)
    return body


def _options(panel: Panel) -> dict[str, Any]:
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if panel.kind == "timeseries":
        return {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if panel.kind == "stat":
        return {
            "reduceOptions": reduce,
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "textMode": "auto",
            "orientation": "auto",
        }
    if panel.kind == "bargauge":
        return {
            "reduceOptions": reduce,
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
        }
    return {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}


def _table_transformations(panel: Panel) -> list[dict[str, Any]]:
    """Instant queries as one table: merged on their labels, columns named by legend."""
    names = {
        "Time": "",
        **{
            "Value" if len(panel.targets) == 1 else f"Value #{chr(65 + i)}": t.legend
            for i, t in enumerate(panel.targets)
        },
    }
    hidden = {"Time": True, "__name__": True, "job": True, "instance": True}
    hidden.update({column: True for column in panel.hidden_columns})
    return [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": hidden,
                "renameByName": {k: v for k, v in names.items() if v},
            },
        },
    ]


def layout(panels: Sequence[Panel]) -> list[dict[str, int]]:
    """Grid positions: left to right, wrapping at 24 columns; a row is as tall as its tallest."""
    out = []
    x = y = row_height = 0
    for panel in panels:
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        out.append({"x": x, "y": y, "w": panel.width, "h": panel.height})
        x += panel.width
        row_height = max(row_height, panel.height)
    return out


def dashboard(spec: Spec, values: Values) -> dict[str, Any]:
    """One dashboard as Grafana JSON."""
    panels = spec.build(values)
    positions = layout(panels)
    return {
        "uid": spec.uid,
        "title": spec.title,
        "description": spec.description,
        "tags": [TAG, "gpu"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {
            "list": [
                {
                    "name": "GPU alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    "expr": 'ALERTS{cluster=~"$cluster", alertstate="firing", alertname=~"GPU.*"}',
                    "titleFormat": "{{alertname}}",
                    "textFormat": "{{node}} {{namespace}} {{pod}}",
                    "step": "60s",
                }
            ]
        },
        "links": [
            {
                "title": "GPU dashboards",
                "type": "dashboards",
                "tags": [TAG],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
            }
        ],
        "templating": {"list": _variables(spec.extra_variables)},
        "panels": [
            _panel_json(panel, pid, pos)
            for pid, (panel, pos) in enumerate(zip(panels, positions, strict=True), start=1)
        ],
    }


@dataclass(frozen=True)
class Query:
    """One query of a dashboard: where it is and what it asks."""

    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool


def queries(board: dict[str, Any]) -> list[Query]:
    """Every panel query of a dashboard (JSON), in panel order."""
    return [
        Query(board["uid"], panel["title"], t["refId"], t["expr"], bool(t.get("instant")))
        for panel in board["panels"]
        for t in panel.get("targets", [])
    ]


def expand(expr: str, board: dict[str, Any], builtins: dict[str, str] | None = None) -> str:
    """`expr` with template variables replaced as Grafana does with their defaults: the
    `allValue` of "All" variables, the current value of others, and `builtins` for
    `$__rate_interval`, `$__range` and `$__interval` (defaults 1m, 1h, 1m)."""
    values = {"__rate_interval": "1m", "__range": "1h", "__interval": "1m", **(builtins or {})}
    for var in board["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        if var.get("includeAll"):
            values[var["name"]] = var["allValue"]
        else:
            values[var["name"]] = var["current"]["value"]
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    return expr


def render(values: Values) -> dict[str, str]:
    """{file name: JSON text} of every dashboard."""
    return {
        f"{spec.uid}.json": json.dumps(dashboard(spec, values), indent=2, ensure_ascii=False) + "\n"
        for spec in DASHBOARDS
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with --check, compare) the dashboards."""
    parser = argparse.ArgumentParser(prog="python -m monitoring.dashboards", description=__doc__)
    parser.add_argument("--values", type=Path, default=DEFAULT_PATH, help="values file")
    parser.add_argument("--out-dir", type=Path, default=DASHBOARDS_DIR, help="where they go")
    parser.add_argument("--check", action="store_true", help="exit 1 when the files are stale")
    args = parser.parse_args(argv)
    try:
        values = load_values(args.values)
    except ValuesError as error:
        print(f"monitoring.dashboards: {error}", file=sys.stderr)
        return 2
    rendered = render(values)
    if args.check:
        stale = [
            name
            for name, text in rendered.items()
            if not (args.out_dir / name).exists() or (args.out_dir / name).read_text() != text
        ]
        for name in stale:
            print(f"{args.out_dir / name} is stale: run `make dashboards`", file=sys.stderr)
        return 1 if stale else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (args.out_dir / name).write_text(text)
        print(f"wrote {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
