"""Backfilled history equals the simulator's ground truth, in Python and in a real Prometheus.

`exporter.simulator.history` computes days of the exporter's series with numpy; these tests
hold it to the scalar fleet functions (`Fleet.gpu_state`, `Fleet.mig_state`, `processes_at`,
`allocations_at`), to the live exporter's own output (same label sets, so history and live
data are one series), and, after `promtool` backfill, to PromQL answers at past instants,
recorded pricing rules included.
"""

from __future__ import annotations

import io
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from exporter.simulator import load_fleet
from exporter.simulator.fleet import GPM_SM_UTIL, Fleet
from exporter.simulator.history import HISTORY_METRICS, backfill, write_openmetrics
from exporter.simulator.pods import allocations_at, pods_at, processes_at
from tests.ground_truth import expected_cost_per_hour
from tests.unit.exporter_harness import FLEETS, T0, running_attributed_node

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ATTRIBUTION = FLEETS / "attribution.yaml"
NODE = "attr-node"
POD_LABELS = ("team", "app")
MIB = 1024 * 1024

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_openmetrics(text: str) -> dict[float, Series]:
    """{timestamp: {(metric, labels): value}} from OpenMetrics text."""
    out: dict[float, Series] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.timestamp is not None
            key = (sample.name, frozenset(sample.labels.items()))
            out[float(sample.timestamp)][key] = sample.value
    return out


def history(fleet: Fleet, nodes: list[str], start: float, end: float, step: float) -> str:
    buf = io.StringIO()
    write_openmetrics(
        fleet, buf, start=start, end=end, step=step, nodes=nodes, target_labels=lambda n: {}
    )
    text = buf.getvalue()
    assert text.endswith("# EOF\n")
    return text


def _keep(pairs: list[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    return frozenset((k, v) for k, v in pairs if v != "")


def ground_truth(fleet: Fleet, node: str, t: float, gpm_interval: float = 5.0) -> Series:
    """What the live exporter publishes at t, from the scalar fleet functions, one by one."""
    sim = fleet.nodes[node]
    out: Series = {}
    cuda = sim.cuda_driver_version
    pods = {(p.namespace, p.name): p for p in sim.pods}

    def device(gpu_index: int, gi: int | None) -> list[tuple[str, str]]:
        g = sim.gpus[gpu_index]
        base = [
            ("node", node),
            ("gpu", str(g.index)),
            ("uuid", g.uuid),
            ("model", g.model.name),
            ("pci_bus_id", g.pci_bus_id),
        ]
        if gi is None:
            return base
        inst = g.instance(gi)
        assert inst is not None
        return [
            *base,
            ("gpu_instance", str(gi)),
            ("compute_instance", "0"),
            ("mig_profile", inst.profile.key),
            ("mig_uuid", inst.uuid),
        ]

    for g in sim.gpus:
        st = fleet.gpu_state(node, g.index, t)
        dev = _keep(device(g.index, None))
        mode = "unsupported" if not g.model.mig_capable else "disabled"
        mode = "enabled" if g.mig is not None else mode
        info = [
            *device(g.index, None),
            ("driver_version", sim.driver_version),
            ("cuda_driver_version", f"{cuda // 1000}.{cuda % 1000 // 10}"),
            ("mig_mode", mode),
        ]
        out[("gpu_info", _keep(info))] = 1.0
        out[("gpu_up", dev)] = 1.0
        if g.mig is None:
            out[("gpu_utilization_ratio", dev)] = st.utilization_gpu / 100.0
        out[("gpu_memory_used_bytes", dev)] = float(st.memory_used)
        out[("gpu_memory_total_bytes", dev)] = float(st.memory_total)
        out[("gpu_power_watts", dev)] = st.power_mw / 1000.0
        out[("gpu_temperature_celsius", dev)] = float(st.temperature_c)
        for inst in g.mig or ():
            ms = fleet.mig_state(node, g.index, inst.gpu_instance_id, t)
            mig = _keep(device(g.index, inst.gpu_instance_id))
            out[("gpu_mig_info", mig)] = 1.0
            out[("gpu_mig_memory_used_bytes", mig)] = float(ms.memory_used)
            out[("gpu_mig_memory_total_bytes", mig)] = float(ms.memory_total)
            if g.model.gpm:
                gpm = fleet.gpm_metrics(node, g.index, inst.gpu_instance_id, t - gpm_interval, t)
                out[("gpu_mig_sm_activity_ratio", mig)] = gpm[GPM_SM_UTIL] / 100.0

    def who(namespace: str, pod: str) -> list[tuple[str, str]]:
        labels = pods[(namespace, pod)].labels
        return [(f"label_{k}", labels.get(k, "")) for k in POD_LABELS]

    running = {(p.namespace, p.name) for p in pods_at(fleet, node, t) if p.phase == "Running"}
    for a in allocations_at(fleet, node, t):
        if (a.namespace, a.pod) not in running:
            continue
        pairs = [
            *device(a.claim.gpu, a.claim.gpu_instance),
            ("namespace", a.namespace),
            ("pod", a.pod),
            ("container", a.container),
            ("resource", a.resource),
            *who(a.namespace, a.pod),
        ]
        out[("gpu_allocation_info", _keep(pairs))] = 1.0
    for p in processes_at(fleet, node, t):
        command = p.name
        if len(command) >= 15:  # the exporter prefers argv[0]'s longer base name
            base = p.cmdline[0].rsplit("/", 1)[-1]
            command = base if base.startswith(command) else command
        pairs = [
            *device(p.gpu, p.gpu_instance),
            ("pid", str(p.pid)),
            ("command", command),
            ("namespace", p.namespace),
            ("pod", p.pod),
            ("container", p.container),
            *who(p.namespace, p.pod),
        ]
        out[("gpu_process_memory_used_bytes", _keep(pairs))] = float(p.memory_bytes)
        if p.gpu_instance is None:
            out[("gpu_process_sm_utilization_ratio", _keep(pairs))] = p.sm_util / 100.0
    return out


@pytest.mark.parametrize(
    ("fleet_path", "nodes"),
    [
        (ATTRIBUTION, ["attr-node", "legacy-node"]),
        (FLEETS / "churn.yaml", None),
        (REPO / "examples" / "fleet.yaml", None),
    ],
    ids=["attribution", "churn", "demo"],
)
def test_history_equals_the_scalar_ground_truth(fleet_path: Path, nodes: list[str] | None) -> None:
    fleet = load_fleet(fleet_path)
    names = nodes or list(fleet.nodes)
    # An odd step crosses idle spells, bursts, noise knots, churn windows and day boundaries.
    start, step = T0 - 3 * 3600 + 0.0, 397.0
    end = start + 150 * step
    got = parse_openmetrics(history(fleet, names, start, end, step))
    assert len(got) == 150
    for t, series in sorted(got.items()):
        want: Series = {}
        for node in names:
            want.update(ground_truth(fleet, node, t))
        assert series == want, f"history differs from the ground truth at t={t}"


def test_history_names_only_catalogue_metrics_with_types() -> None:
    from exporter.catalogue import CATALOGUE

    fleet = load_fleet(ATTRIBUTION)
    text = history(fleet, [NODE], T0, T0 + 120, 60)
    types = {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }
    assert set(types) == set(HISTORY_METRICS)
    assert all(CATALOGUE[name].type == kind for name, kind in types.items())


def test_live_exporter_publishes_the_same_series_as_history() -> None:
    """Same label sets (and values) as the live exporter: history and live data join up."""
    t = T0 + 12_345.0
    fleet = load_fleet(ATTRIBUTION)
    backfilled = parse_openmetrics(history(fleet, [NODE], t, t + 1, 60))[t]
    with running_attributed_node(ATTRIBUTION, NODE, start=t - 5, pod_labels=POD_LABELS) as node:
        node.cycle(0)
        live = node.cycle(5)  # GPM needs two samples: the exporter's interval is 5 s here
    live_history = {
        (name, frozenset((k, v) for k, v in labels if v != "")): value
        for (name, labels), value in live.items()
        if name in HISTORY_METRICS
    }
    assert {name for name, _ in live_history} == set(HISTORY_METRICS)
    assert set(backfilled) == set(live_history)
    assert backfilled == live_history


def test_default_target_labels_are_job_and_instance() -> None:
    fleet = load_fleet(ATTRIBUTION)
    buf = io.StringIO()
    count = write_openmetrics(fleet, buf, start=T0, end=T0 + 180, step=60, nodes=[NODE])
    parsed = parse_openmetrics(buf.getvalue())
    assert count == sum(len(series) for series in parsed.values())
    for series in parsed.values():
        for _, labels in series:
            assert ("job", "gpu-exporter") in labels and ("instance", NODE) in labels


def _values(server: Any, promql: str, t: float, *keys: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for sample in server.query(promql, time=t):
        key = tuple(sample["metric"].get(k, "") for k in keys)
        assert key not in out, f"{promql}: two series for {key}"
        out[key] = float(sample["value"][1])
    return out


def test_backfilled_prometheus_answers_ground_truth_and_recorded_costs(
    prometheus: Callable[..., Any], tmp_path: Path
) -> None:
    fleet = load_fleet(ATTRIBUTION)
    step = 60.0
    end = math.floor(time.time() / step) * step - 3600.0
    start = end - 6 * 3600.0
    data = tmp_path / "tsdb"
    backfill(
        fleet,
        data,
        start=start,
        end=end,
        step=step,
        nodes=[NODE],
        pod_labels=POD_LABELS,
        rule_files=[REPO / "rules" / "pricing.yml"],
    )
    server = prometheus(data_dir=data)
    sim = fleet.nodes[NODE]
    instants = [start, start + 17 * step, start + 3 * 3600.0 + 5 * step, end - step]
    for t in instants:
        where = f"at t={t}"
        util = _values(server, f'gpu_utilization_ratio{{node="{NODE}"}}', t, "gpu")
        mem = _values(server, f'gpu_memory_used_bytes{{node="{NODE}"}}', t, "gpu")
        want_util = {}
        for g in sim.gpus:
            st = fleet.gpu_state(NODE, g.index, t)
            assert mem[(str(g.index),)] == st.memory_used, where
            if g.mig is None:
                want_util[(str(g.index),)] = st.utilization_gpu / 100
        assert util == want_util, where
        series = server.query(f'gpu_allocation_info{{node="{NODE}"}}', time=t)
        keys = ("namespace", "pod", "uuid", "mig_uuid", "label_team")
        got_alloc = {tuple(s["metric"].get(k, "") for k in keys) for s in series}
        assert all(s["metric"]["job"] == "gpu-exporter" for s in series)
        want_alloc = set()
        for a in allocations_at(fleet, NODE, t):
            pod = next(p for p in sim.pods if (p.namespace, p.name) == (a.namespace, a.pod))
            if pod.phase != "Running":
                continue
            g = sim.gpus[a.claim.gpu]
            inst = g.instance(a.claim.gpu_instance) if a.claim.gpu_instance is not None else None
            want_alloc.add(
                (a.namespace, a.pod, g.uuid, inst.uuid if inst else "", pod.labels.get("team", ""))
            )
        assert got_alloc == want_alloc, where
        sm = _values(server, f'gpu_process_sm_utilization_ratio{{node="{NODE}"}}', t, "pid")
        want_sm = {
            (str(p.pid),): p.sm_util / 100
            for p in processes_at(fleet, NODE, t)
            if p.gpu_instance is None
        }
        assert sm == want_sm, where
        # Recorded by the backfilled pricing rules. promtool evaluates each group every
        # minute at a group-specific offset (under 1 minute), as Prometheus does: the value
        # recorded from the raw samples at t is there by t + 1 minute.
        cost = _values(server, "namespace:gpu_cost_dollars_per_hour:sum", t + 60, "namespace")
        want_cost = expected_cost_per_hour(fleet, NODE, t)
        assert cost.keys() == {(ns,) for ns in want_cost}, where
        for (namespace,), value in cost.items():
            assert value == pytest.approx(want_cost[namespace], rel=1e-12), where
    # Nothing after the history's end: the live exporter's samples continue from there.
    assert server.query(f'gpu_up{{node="{NODE}"}}', time=end + 301) == []
