"""Idle detection against the simulator's ground truth: the fleet schedules idle spells
(activity under 5%, at least 8% outside them); a day of its history goes into a real Prometheus
with the pricing rules; the service must find the spells of 30 minutes or more (precision and
recall at least 0.95) on a whole GPU, MIG slices and a time-sliced GPU, not the shorter ones,
and give the same list from dcgm-exporter-shaped data."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from analytics import idle
from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from analytics.pricing import load_pricing, render_rules
from analytics.prometheus import PrometheusClient
from exporter.simulator import load_fleet
from exporter.simulator.fleet import Fleet
from exporter.simulator.history import backfill
from tests.ground_truth import PRICING, REPO

FLEET = REPO / "tests" / "fleets" / "idle.yaml"
NODE = "idle-node"
STEP = 60.0
HOURS = 24
MIN_SPELL = 1800.0


@dataclass
class History:
    client: FlaskClient
    prometheus: PrometheusClient
    config: Config
    start: float
    end: float


def _history(shape: str, module_prometheus: Callable[..., Any], tmp: Path) -> Iterator[History]:
    config = Config(source="dcgm" if shape == "dcgm" else "exporter")
    rules = tmp / "pricing.yml"
    rules.write_text(render_rules(load_pricing(PRICING), inputs=config.rule_inputs()))
    # Our exporter's history also gets the idle recording rules the alerts use.
    rule_files = [rules] if shape == "dcgm" else [rules, REPO / "rules" / "gpu-recording.yml"]
    end = math.floor(time.time() / STEP) * STEP - 1800.0
    start = end - HOURS * 3600.0
    data = tmp / "tsdb"
    backfill(
        load_fleet(FLEET), data, start=start, end=end, step=STEP, rule_files=rule_files, shape=shape
    )
    server = module_prometheus(data_dir=data)
    config = Config(
        prometheus=PrometheusConfig(url=server.url, timeout_seconds=30, retries=0),
        source=config.source,
        pricing_file=PRICING,
    )
    now = dt.datetime.fromtimestamp(end, tz=dt.UTC)
    app = create_app(config, clock=lambda: now)
    yield History(app.test_client(), PrometheusClient(server.url), config, start, end)


@pytest.fixture(scope="module")
def history(
    module_prometheus: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    yield from _history("exporter", module_prometheus, tmp_path_factory.mktemp("idle"))


@pytest.fixture(scope="module")
def dcgm_history(
    module_prometheus: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    yield from _history("dcgm", module_prometheus, tmp_path_factory.mktemp("idle-dcgm"))


def _report(h: History) -> idle.IdleReport:
    return idle.find_idle(
        h.prometheus,
        h.config.rule_inputs(),
        h.config.idle,
        start=h.start,
        end=h.end,
        team_label=h.config.team_label,
        rules_interval_seconds=h.config.rules_interval_seconds,
    )


# (pod, gpu, gpu instance) each held device; the fleet's pods hold them all day.
HELD = {
    "whole": [("trainer", 0, None), ("forgotten", 3, None)],
    "mig": [("server-large", 1, 1), ("server-small", 1, 2)],
    "time-sliced": [("nb-a", 2, None), ("nb-b", 2, None), ("nb-c", 2, None)],
}


def _true_spells(fleet: Fleet, gpu: int, gi: int | None, start: float, end: float) -> list:
    return [(a, b) for a, b in fleet.idle_spells(NODE, gpu, gi, start, end) if b - a >= MIN_SPELL]


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two intervals."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def _device_of(fleet: Fleet, gpu: int, gi: int | None) -> str:
    g = fleet.nodes[NODE].gpus[gpu]
    return g.uuid if gi is None else g.instance(gi).uuid


@pytest.mark.parametrize("category", list(HELD))
def test_idle_spells_match_the_simulators_with_precision_and_recall(
    history: History, category: str
) -> None:
    fleet = load_fleet(FLEET)
    spells = _report(history).spells
    true_total = found_total = matched_true = matched_found = 0
    for pod, gpu, gi in HELD[category]:
        truth = _true_spells(fleet, gpu, gi, history.start, history.end)
        device = _device_of(fleet, gpu, gi)
        mine = spells[
            (spells["pod"] == pod) & ((spells["uuid"] == device) | (spells["mig_uuid"] == device))
        ]
        found = list(zip(mine["start"], mine["end"], strict=True))
        true_total += len(truth)
        found_total += len(found)
        matched_true += sum(any(_overlap(t, f) >= 0.8 for f in found) for t in truth)
        matched_found += sum(any(_overlap(t, f) >= 0.8 for t in truth) for f in found)
    assert true_total >= 3, "the fleet must schedule spells of 30 minutes or more"
    recall = matched_true / true_total
    precision = matched_found / found_total if found_total else 0.0
    assert recall >= 0.95 and precision >= 0.95, (category, precision, recall)


def test_spells_shorter_than_the_window_are_not_reported(history: History) -> None:
    fleet = load_fleet(FLEET)
    short = [
        (a, b)
        for a, b in fleet.idle_spells(NODE, 0, None, history.start + 3600, history.end - 3600)
        if b - a < MIN_SPELL - 2 * STEP
    ]
    assert short, "the fleet schedules short idle spells on GPU 0"
    spells = _report(history).spells
    trainer = spells[spells["pod"] == "trainer"]
    for a, b in short:
        assert not any(
            _overlap((a, b), f) > 0.5 for f in zip(trainer["start"], trainer["end"], strict=True)
        )


def test_idle_api_lists_pods_with_cost_and_evidence(history: History) -> None:
    response = history.client.get(
        "/api/v1/gpu/idle", query_string={"start": int(history.start), "end": int(history.end)}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    data = response.get_json()["data"]
    items = {(i["namespace"], i["pod"]): i for i in data["items"]}
    forgotten = items[("notebooks", "forgotten")]
    # Held all day and never used: idle the whole window (less the first spell's window).
    assert forgotten["idleNow"] is True
    assert forgotten["idleHours"] == pytest.approx(HOURS - 1 / 60, abs=2 / 60)
    assert forgotten["idleCost"] == pytest.approx(forgotten["idleHours"] * 0.75, rel=1e-3)
    assert forgotten["evidence"]["maxActivity"] < 0.05
    assert forgotten["evidence"]["memoryHeldBytes"] > 0  # holds memory while idle
    # The time-sliced A100: three pods, each a third of it.
    shared = [items[("notebooks", p)] for p in ("nb-a", "nb-b", "nb-c")]
    assert [i["gpuEquivalents"] for i in shared] == [pytest.approx(1 / 3, abs=1e-6)] * 3
    assert shared[2]["team"] is None
    # MIG slices carry their profile and parent.
    large = items[("inference", "server-large")]
    assert large["kind"] == "mig" and large["migProfile"] == "4g.40gb"
    assert large["gpuEquivalents"] == pytest.approx(4 / 7)
    # The L4 nobody holds is unallocated capacity, its own category; so is the part of the
    # MIG GPU's price its instances do not carry (4g.40gb is priced at half the GPU).
    unallocated = {u["gpu"]: u for u in data["unallocated"]}
    assert set(unallocated) == {"1", "4"}
    assert unallocated["4"]["unallocatedHours"] == pytest.approx(HOURS, abs=2 / 60)
    assert unallocated["4"]["cost"] == pytest.approx(HOURS * 0.75, rel=2e-3)
    assert unallocated["1"]["cost"] == pytest.approx(HOURS * 7.0 * (1 - 3 / 7 - 0.5), rel=2e-3)
    csv_text = history.client.get(
        "/api/v1/gpu/idle",
        query_string={"start": int(history.start), "end": int(history.end), "format": "csv"},
    ).get_data(as_text=True)
    assert csv_text.splitlines()[0] == ",".join(idle.CSV_COLUMNS)
    assert len(csv_text.splitlines()) == 1 + len(data["items"])


def test_idle_filters_are_validated_and_applied(history: History) -> None:
    bad = history.client.get("/api/v1/gpu/idle", query_string={"namespace": 'a"} or vector(1) #'})
    assert bad.status_code == 400
    assert bad.get_json()["error"]["code"] == "INVALID_PARAMETER"
    only = history.client.get(
        "/api/v1/gpu/idle",
        query_string={"start": int(history.start), "end": int(history.end), "team": "nlp"},
    ).get_json()["data"]
    assert {i["pod"] for i in only["items"]} == {"server-large", "server-small"}
    assert only["unallocated"] is None


def test_dcgm_shaped_data_gives_the_same_idle_list(history: History, dcgm_history: History) -> None:
    def summary(h: History) -> dict[tuple[str, str], float]:
        return {
            (i.labels["namespace"], i.labels["pod"]): round(i.idle_seconds / 60)
            for i in _report(h).items
        }

    ours, dcgm = summary(history), summary(dcgm_history)
    assert ours.keys() == dcgm.keys()
    for key, minutes in ours.items():
        assert dcgm[key] == pytest.approx(minutes, abs=2), key


def test_optimization_suggests_releasing_the_forgotten_gpu(history: History) -> None:
    response = history.client.get("/api/v1/gpu/cost/optimization", query_string={"days": 1})
    assert response.status_code == 200, response.get_data(as_text=True)
    data = response.get_json()["data"]
    release = {(s["namespace"], s["pod"]): s for s in data["suggestions"] if s["type"] == "release"}
    forgotten = release[("notebooks", "forgotten")]
    # An L4 at 0.75 $/h idle the whole day: releasing it saves its month.
    assert forgotten["estimatedMonthlySavings"] == pytest.approx(0.75 * 730, rel=0.01)
    assert forgotten["confidence"] == "high"
    # The busy trainer is not told to release its GPU.
    assert ("ml", "trainer") not in release
    assert data["potentialMonthlySavings"] == pytest.approx(
        sum(s["estimatedMonthlySavings"] or 0 for s in data["suggestions"]), rel=1e-6
    )
    analysis = history.client.get("/api/v1/gpu/cost/analysis", query_string={"days": 1})
    assert analysis.get_json()["data"]["potentialMonthlySavings"] == data["potentialMonthlySavings"]
    bad = history.client.get("/api/v1/gpu/cost/optimization", query_string={"days": "-1"})
    assert bad.status_code == 400


def test_idle_metrics_count_what_is_idle_now_per_namespace_and_team(history: History) -> None:
    """gpu_analytics_idle_devices against the simulator: devices whose idle spell covers the
    last idle window, as GPU-equivalents per namespace and team."""
    from analytics.telemetry import IDLE_COST, IDLE_DEVICES, idle_metrics

    fleet = load_fleet(FLEET)
    pods = {p.name: p for p in fleet.nodes[NODE].pods}
    shares = {0: 1.0, 3: 1.0, 2: 1 / 3}
    expected: dict[tuple[str, str], float] = {}
    latest = history.end - STEP  # the newest sample: the history ends before `end`
    for pod, gpu, gi in [p for group in HELD.values() for p in group]:
        spells = fleet.idle_spells(NODE, gpu, gi, history.end - 7200, history.end)
        if any(a <= latest - MIN_SPELL and b > latest for a, b in spells):
            spec = pods[pod]
            key = (spec.namespace, spec.labels.get("team", ""))
            share = (
                shares.get(gpu) or fleet.nodes[NODE].gpus[gpu].instance(gi).profile.slice_count / 7
            )
            expected[key] = expected.get(key, 0.0) + share
    assert ("notebooks", "research") in expected  # the forgotten L4 at least

    clock = lambda: dt.datetime.fromtimestamp(history.end, tz=dt.UTC)  # noqa: E731
    metrics = idle_metrics(history.prometheus, history.config, load_pricing(PRICING), clock)
    metrics.refresh()
    families = {f.name: f for f in metrics.collect()}
    got = {
        (s.labels["namespace"], s.labels["team"]): s.value
        for s in families[IDLE_DEVICES.name].samples
    }
    assert got.keys() == expected.keys()
    for key, share in expected.items():
        assert got[key] == pytest.approx(share, abs=1e-6), key
    costs = {(s.labels["namespace"], s.labels["team"]) for s in families[IDLE_COST.name].samples}
    assert costs == set(expected)
    assert families["gpu_analytics_idle_refresh_success"].samples[0].value == 1.0
    savings = families["gpu_analytics_potential_monthly_savings_dollars"].samples[0].value
    assert savings >= 0.75 * 730 * 0.9  # at least releasing the forgotten L4


def test_the_service_and_the_idle_rules_agree_on_what_is_idle_now(history: History) -> None:
    """pod:gpu_allocated_idle:share (rules/gpu-recording.yml, what GPUAllocatedIdle fires on)
    names the same pods and devices as the service's items idle now, with the same shares."""
    rules = {
        (s.labels["namespace"], s.labels["pod"], s.labels.get("mig_uuid") or s.labels["uuid"]): (
            s.value
        )
        for s in history.prometheus.query("pod:gpu_allocated_idle:share", at=history.end)
    }
    service = {
        (i.labels["namespace"], i.labels["pod"], i.labels["device"]): i.share
        for i in _report(history).items
        if i.idle_now
    }
    assert rules, "the rules find the forgotten L4 at least"
    assert rules.keys() == service.keys()
    for key, share in service.items():
        assert rules[key] == pytest.approx(share, abs=1e-9), key
