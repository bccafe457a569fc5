"""Rules and dashboards against a real Prometheus fed by the simulated fleet.

A day of the fleet's history (raw series and recorded rules) is backfilled first, as the demo
does; then one Prometheus scrapes the exporters of every node of examples/fleet.yaml (with an
XID and an overheating GPU scheduled at start), the analytics service, and a stand-in for
kube-state-metrics (node labels, allocatable GPUs, one GPU node without an exporter). It
evaluates the pricing rules and the GPU rules and alerts, generated from the values with short
intervals and `for`s. Then every recording rule must record data, every alert expression must
run over series that exist, the alerts for the scheduled faults must fire, and every query of
every dashboard must return data: a panel that shows nothing fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.simulator import load_fleet
from exporter.simulator.history import backfill
from monitoring import dashboards as d
from monitoring.promql import metric_names, rule_file_names
from tests.conftest import EXAMPLE_FLEET, PrometheusServer, free_port
from tests.integration.monitoring_stack import analytics_service, rule_variant, static_target

pytestmark = pytest.mark.integration

DASHBOARDS = {p.stem: json.loads(p.read_text()) for p in sorted(d.DASHBOARDS_DIR.glob("*.json"))}
QUERIES = [q for board in DASHBOARDS.values() for q in d.queries(board)]
#: Rule overrides: fast evaluation; short `for` on the alerts the scheduled faults raise.
HISTORY_DAYS = 1
HISTORY_STEP = 300.0
RECENT_SECONDS = 40 * 60
RECENT_STEP = 30.0
OVERRIDES: dict[str, Any] = {
    "recording_interval": "2s",
    "alerts": {
        "GPUHighTemperature": {"for": "2s"},
        "GPUXidError": {"for": "1s"},
        "GPUNodeNotScraped": {"for": "1s"},
        "GPUAllocatedIdle": {"for": "1s"},
    },
}
#: Series only present in special conditions, with what they need.
CONDITIONAL = {
    "gpu_analytics_capacity_exhaustion_seconds": "a scope forecast to run out within the horizon",
}
KUBE_STATE_METRICS = """\
# TYPE kube_node_labels gauge
kube_node_labels{node="gpu-node-h100",label_pricing_example_com_commitment="1y"} 1
kube_node_labels{node="gpu-node-a100",label_karpenter_sh_capacity_type="on-demand"} 1
kube_node_labels{node="gpu-node-l4",label_karpenter_sh_capacity_type="spot"} 1
# TYPE kube_node_status_allocatable gauge
kube_node_status_allocatable{node="gpu-node-h100",resource="nvidia_com_gpu",unit="integer"} 8
kube_node_status_allocatable{node="gpu-node-a100",resource="nvidia_com_gpu",unit="integer"} 9
kube_node_status_allocatable{node="gpu-node-l4",resource="nvidia_com_gpu",unit="integer"} 4
kube_node_status_allocatable{node="gpu-node-l4",resource="cpu",unit="core"} 48
kube_node_status_allocatable{node="gpu-node-spare",resource="nvidia_com_gpu",unit="integer"} 4
"""


@dataclass
class Stack:
    prometheus: PrometheusServer
    rule_files: list[Path]
    started: float


def _fleet_with_faults_now(path: Path) -> None:
    """The example fleet, with its XID and overheating scheduled at start-up."""
    data = yaml.safe_load(EXAMPLE_FLEET.read_text())
    for node in data["nodes"]:
        for fault in node.get("faults", []):
            if fault["kind"] in ("xid", "overheat"):
                fault["at"] = "1s"
                fault.pop("until", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def stack(
    module_prometheus: Any,
    module_exporter_process: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("monitoring-live")
    fleet = work / "fleet.yaml"
    _fleet_with_faults_now(fleet)
    # A100s unpriced, so the unpriced-device rules have something to list.
    unpriced = ("NVIDIA A100-SXM4-80GB",)
    rule_files = rule_variant(
        work / "rules", OVERRIDES, pricing_interval="2s", drop_models=unpriced
    )
    history_rules = rule_variant(work / "history-rules", {}, "1m", drop_models=unpriced)
    started = time.time()
    exporters = {
        node: module_exporter_process(node, fleet=fleet, extra_args=["--pod-labels", "team,app"])
        for node in load_fleet(fleet).nodes
    }
    # History that the live scrapes continue (the same job and instance labels): a day at
    # 5-minute steps, then the last 40 minutes at 30 s, as dense as a scrape and up to the
    # moment Prometheus starts, so that idle spells of a whole idle window (30m) reach "now".
    data = work / "tsdb"
    end = math.floor(time.time() / HISTORY_STEP) * HISTORY_STEP
    recent = end - RECENT_SECONDS
    for start, step in ((end - HISTORY_DAYS * 86400, HISTORY_STEP), (recent, RECENT_STEP)):
        backfill(
            load_fleet(fleet),
            data,
            start=start,
            end=recent if step == HISTORY_STEP else time.time(),
            step=step,
            target_labels=lambda node: {"job": "gpu-exporter", "instance": exporters[node].address},
            rule_files=history_rules,
        )
    analytics_port = free_port()
    with contextlib.ExitStack() as stop:
        ksm = stop.enter_context(static_target(KUBE_STATE_METRICS))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": "gpu-exporter",
                    "static_configs": [{"targets": [e.address for e in exporters.values()]}],
                },
                {
                    "job_name": "gpu-analytics",
                    "static_configs": [{"targets": [f"127.0.0.1:{analytics_port}"]}],
                },
                {"job_name": "kube-state-metrics", "static_configs": [{"targets": [ksm]}]},
            ],
        }
        server = module_prometheus(config=config, data_dir=data)
        scraping = time.time()
        stop.enter_context(analytics_service(server.url, analytics_port, work / "analytics"))
        server.wait_for_targets_up(len(exporters) + 2, timeout=60)
        for record in sorted(rule_file_names(rule_files)):
            server.wait_for(f"count({record})", timeout=90)
        server.wait_for("count(gpu_analytics_namespace_cost_dollars_per_hour)", timeout=60)
        # Long enough for rate() and increase() over the 1s scrapes.
        time.sleep(max(0.0, scraping + 15 - time.time()))
        yield Stack(server, rule_files, started)


def _rules(stack: Stack) -> list[dict[str, Any]]:
    return [
        rule
        for path in stack.rule_files
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_every_recording_rule_records_data(stack: Stack) -> None:
    empty = [
        rule["record"]
        for rule in _rules(stack)
        if "record" in rule and not stack.prometheus.query(rule["record"])
    ]
    assert not empty, f"recording rules with no data: {empty}"


def test_every_alert_expression_runs_over_series_that_exist(stack: Stack) -> None:
    missing: dict[str, set[str]] = {}
    for rule in _rules(stack):
        if "alert" not in rule:
            continue
        stack.prometheus.query(rule["expr"])  # raises on a PromQL error
        for name in metric_names(rule["expr"]):
            if name in CONDITIONAL:
                continue
            if not stack.prometheus.query(f'count({{__name__="{name}"}})'):
                missing.setdefault(rule["alert"], set()).add(name)
    assert not missing, f"alerts reading series nothing publishes here: {missing}"


def test_the_scheduled_faults_fire_their_alerts(stack: Stack) -> None:
    def firing(name: str) -> list[dict[str, str]]:
        result = stack.prometheus.wait_for(
            f'ALERTS{{alertname="{name}", alertstate="firing"}}', timeout=60
        )
        return [sample["metric"] for sample in result]

    (hot,) = firing("GPUHighTemperature")
    assert (hot["node"], hot["gpu"], hot["severity"]) == ("gpu-node-h100", "5", "warning")
    (xid,) = firing("GPUXidError")
    assert (xid["node"], xid["gpu"], xid["xid"], xid["severity"]) == (
        "gpu-node-h100",
        "6",
        "63",
        "critical",
    )
    (unscraped,) = firing("GPUNodeNotScraped")
    assert unscraped["node"] == "gpu-node-spare"


def test_allocated_idle_fires_for_idle_devices_only(stack: Stack) -> None:
    fleet = load_fleet(EXAMPLE_FLEET)
    now = time.time()
    alerts = stack.prometheus.wait_for(
        'ALERTS{alertname="GPUAllocatedIdle", alertstate="firing"}', timeout=60
    )
    idle = {
        (a["metric"]["pod"], a["metric"].get("mig_uuid") or a["metric"]["uuid"]) for a in alerts
    }
    held_busy = []
    for node in fleet.nodes.values():
        for pod in node.pods:
            for container in pod.containers:
                for claim in container.devices:
                    gpu = node.gpus[claim.gpu]
                    inst = gpu.instance(claim.gpu_instance) if claim.gpu_instance else None
                    device = inst.uuid if inst is not None else gpu.uuid
                    spells = fleet.idle_spells(
                        node.name, claim.gpu, claim.gpu_instance, now - 31 * 60, now + 60
                    )
                    if not spells:
                        held_busy.append((pod.name, device))
    # Always idle in the fleet: a whole H100 and a 4g.40gb that hold memory and do nothing.
    h100 = fleet.nodes["gpu-node-h100"]
    assert ("idle-reservation", h100.gpus[7].uuid) in idle
    notebook = h100.gpus[2].instance(1)
    assert notebook is not None and ("notebook-ana", notebook.uuid) in idle
    # A device that was busy for the whole idle window (30m) is never reported.
    assert held_busy and not set(held_busy) & idle, set(held_busy) & idle


@pytest.mark.parametrize(
    "query", QUERIES, ids=[f"{q.dashboard}/{q.panel}/{q.ref}" for q in QUERIES]
)
def test_every_dashboard_query_returns_data(stack: Stack, query: d.Query) -> None:
    board = DASHBOARDS[query.dashboard]
    expr = d.expand(query.expr, board)
    if query.instant:
        result = stack.prometheus.query(expr)
        values = [float(sample["value"][1]) for sample in result]
    else:
        end = time.time()
        result = stack.prometheus.query_range(expr, end - 60, end, 5)
        values = [float(v) for sample in result for _, v in sample["values"]]
    assert result, f"{query.dashboard} / {query.panel} ({query.ref}) shows no data:\n{expr}"
    assert any(not math.isnan(v) for v in values), f"only NaN: {expr}"
