"""Allocations, usage statistics, overheating alerts and the overview over a real Prometheus
holding a few hours of the attribution fleet's exporter-shaped history, checked against the
fleet's ground truth."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from exporter.simulator import load_fleet
from exporter.simulator.fleet import Fleet
from exporter.simulator.history import write_openmetrics
from exporter.simulator.pods import allocations_at, pods_at
from tests.unit.exporter_harness import FLEETS

NODE = "attr-node"
STEP = 60.0
HISTORY_HOURS = 3
HOURS = 2  # the window asked for, inside the history


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(FLEETS / "attribution.yaml")


@pytest.fixture(scope="module")
def history(
    fleet: Fleet,
    module_prometheus: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FlaskClient, float]]:
    """Three hours of attr-node's history; the service's clock is 30 s after the last sample."""
    end = math.floor(time.time() / STEP) * STEP - 3600.0
    path = tmp_path_factory.mktemp("om") / "history.om"
    with path.open("w") as out:
        write_openmetrics(
            fleet,
            out,
            start=end - HISTORY_HOURS * 3600.0,
            end=end,
            step=STEP,
            nodes=[NODE],
            pod_labels=("team", "app"),
        )
    server = module_prometheus(openmetrics=path)
    at = end - STEP + 30.0
    config = Config(prometheus=PrometheusConfig(url=server.url, timeout_seconds=10, retries=0))
    now = dt.datetime.fromtimestamp(at, tz=dt.UTC)
    yield create_app(config, clock=lambda: now).test_client(), at


def data(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "success"
    return dict(body["data"])


def samples(at: float, hours: int) -> list[float]:
    """The sample instants in (at - hours, at]."""
    last = math.floor(at / STEP) * STEP
    return [last - i * STEP for i in range(int(hours * 3600 / STEP))]


def model_counts(fleet: Fleet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in fleet.nodes[NODE].gpus:
        counts[g.model.name] = counts.get(g.model.name, 0) + 1
    return counts


def expected_allocations(fleet: Fleet, t: float) -> dict[str, dict[str, Any]]:
    running = {(p.namespace, p.name): p for p in pods_at(fleet, NODE, t) if p.phase == "Running"}
    holders: dict[int, set[str]] = {}
    for a in allocations_at(fleet, NODE, t):
        if (a.namespace, a.pod) in running and a.claim.gpu_instance is None:
            holders.setdefault(a.claim.gpu, set()).add(a.pod)
    out = {}
    for a in allocations_at(fleet, NODE, t):
        pod = running.get((a.namespace, a.pod))
        if pod is None:
            continue  # the exporter credits Running pods only
        gpu = fleet.gpu(NODE, a.claim.gpu)
        mig = gpu.instance(a.claim.gpu_instance) if a.claim.gpu_instance is not None else None
        if mig is not None:
            kind = "MIG_INSTANCE"
        else:
            kind = "SHARED_GPU" if len(holders[a.claim.gpu]) > 1 else "GPU"
        device = mig.uuid if mig is not None else gpu.uuid
        out[f"{a.namespace}/{a.pod}/{device}"] = {
            "namespace": a.namespace,
            "pod": a.pod,
            "container": a.container,
            "team": pod.labels.get("team"),
            "resourceType": kind,
            "deviceId": gpu.uuid,
            "migUuid": mig.uuid if mig is not None else None,
            "migProfile": mig.profile.key if mig is not None else None,
            "node": NODE,
            "status": "ALLOCATED",
        }
    return out


def test_allocations_match_the_fleet(history: tuple[FlaskClient, float], fleet: Fleet) -> None:
    client, at = history
    got = data(client.get("/api/v1/gpu/allocations"))
    want = expected_allocations(fleet, at)
    assert got["count"] == len(want) == 6
    rows = {row["allocationId"]: row for row in got["allocations"]}
    assert set(rows) == set(want)
    for key, expected in want.items():
        assert {k: rows[key][k] for k in expected} == expected, key
    kinds = sorted(row["resourceType"] for row in rows.values())
    assert kinds == ["GPU", "MIG_INSTANCE", "MIG_INSTANCE", *["SHARED_GPU"] * 3]


def test_allocations_filters(history: tuple[FlaskClient, float]) -> None:
    client, _ = history
    research = data(client.get("/api/v1/gpu/allocations?namespace=research"))["allocations"]
    assert sorted(r["pod"] for r in research) == ["notebook-a", "notebook-b", "notebook-c"]
    # Filtering keeps the sharing visible: the GPU is still shared by three pods.
    assert {r["resourceType"] for r in research} == {"SHARED_GPU"}
    nlp = data(client.get("/api/v1/gpu/allocations?team=nlp"))["allocations"]
    assert sorted(r["pod"] for r in nlp) == ["llm-large", "llm-small"]
    both = data(client.get("/api/v1/gpu/allocations?namespace=ml&team=nlp"))
    assert both["allocations"] == [] and both["count"] == 0


def test_usage_statistics_match_the_fleet(history: tuple[FlaskClient, float], fleet: Fleet) -> None:
    client, at = history
    got = data(client.get(f"/api/v1/gpu/metrics/usage-statistics?hours={HOURS}"))
    assert got["timeRange"] == f"{HOURS} hours"
    devices = got["deviceStatistics"]
    instants = samples(at, HOURS)
    gpus = fleet.nodes[NODE].gpus
    assert set(devices) == {f"{NODE}/{g.uuid}" for g in gpus}
    for g in gpus:
        row = devices[f"{NODE}/{g.uuid}"]
        states = [fleet.gpu_state(NODE, g.index, t) for t in instants]
        assert row["samples"] == len(instants)
        assert row["gpuHours"] == pytest.approx(HOURS)
        memory = sum(s.memory_used for s in states) / len(states) / states[0].memory_total
        assert row["avgMemoryUtilization"] == pytest.approx(memory * 100, abs=0.006)
        temps = [s.temperature_c for s in states]
        assert row["avgTemperature"] == pytest.approx(sum(temps) / len(temps), abs=0.006)
        if g.mig is None:
            util = [s.utilization_gpu for s in states]
            assert row["avgGpuUtilization"] == pytest.approx(sum(util) / len(util), abs=0.006)
            assert row["maxGpuUtilization"] == pytest.approx(max(util))
        else:  # from the instances' SM activity
            assert 0 <= row["avgGpuUtilization"] <= row["maxGpuUtilization"] <= 100
    models = got["modelStatistics"]
    counts = {name: stats["deviceCount"] for name, stats in models.items()}
    assert counts == model_counts(fleet)
    assert models["NVIDIA L4"]["gpuHours"] == pytest.approx(2 * HOURS)
    node = got["nodeStatistics"][NODE]
    assert node["deviceCount"] == 5
    assert node["gpuHours"] == pytest.approx(5 * HOURS)


def test_overheating_alerts_match_the_fleet(
    history: tuple[FlaskClient, float], fleet: Fleet
) -> None:
    client, at = history
    instants = samples(at, HOURS)
    gpus = fleet.nodes[NODE].gpus
    peaks = {
        g.uuid: max(fleet.gpu_state(NODE, g.index, t).temperature_c for t in instants) for g in gpus
    }
    levels = sorted(set(peaks.values()))
    assert len(levels) > 1, peaks
    threshold = levels[len(levels) // 2] - 0.5
    got = data(
        client.get(
            "/api/v1/gpu/metrics/overheating-alerts",
            query_string={"threshold": threshold, "hours": HOURS},
        )
    )
    want = {uuid: peak for uuid, peak in peaks.items() if peak > threshold}
    assert got["count"] == len(want)
    assert {a["deviceId"]: a["peakTemperature"] for a in got["alerts"]} == want
    for alert in got["alerts"]:
        index = next(g.index for g in gpus if g.uuid == alert["deviceId"])
        current = fleet.gpu_state(NODE, index, instants[0]).temperature_c
        assert alert["currentTemperature"] == current
    none = data(client.get("/api/v1/gpu/metrics/overheating-alerts?threshold=199"))
    assert none["alerts"] == [] and none["threshold"] == 199


def test_overview_matches_the_fleet(history: tuple[FlaskClient, float], fleet: Fleet) -> None:
    client, at = history
    got = data(client.get("/api/v1/gpu/overview"))
    gpus = fleet.nodes[NODE].gpus
    states = [fleet.gpu_state(NODE, g.index, math.floor(at / STEP) * STEP) for g in gpus]
    whole = [s for g, s in zip(gpus, states, strict=True) if g.mig is None]
    assert got["totalNodes"] == 1
    assert got["totalGpuDevices"] == 5
    assert got["totalMigInstances"] == 2
    # 4 whole GPUs (the time-sliced one counts once) + 2 MIG instances; the finished job's
    # L4 and the idle L4 are free.
    assert got["totalDevices"] == 6
    assert got["allocatedDevices"] == 4
    assert got["freeDevices"] == 2
    assert got["activeAllocations"] == 6
    assert got["gpusDown"] == 0
    assert got["devicesByModel"] == model_counts(fleet)
    assert list(got["devicesByModel"].values()) == [1, 2, 2]  # A100, H100, L4
    util = sum(s.utilization_gpu for s in whole) / len(whole)
    assert got["overallGpuUtilization"] == pytest.approx(util, abs=0.006)
    temp = sum(s.temperature_c for s in states) / len(states)
    assert got["overallTemperature"] == pytest.approx(temp, abs=0.006)
    # No pricing rules were recorded over this history: unknown, not zero.
    assert got["totalHourlyCost"] is None and got["totalMonthlyCost"] is None


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/gpu/metrics/usage-statistics?hours=-1", "hours"),
        ("/api/v1/gpu/metrics/usage-statistics?hours=0", "hours"),
        ("/api/v1/gpu/metrics/usage-statistics?hours=721", "hours"),
        ("/api/v1/gpu/metrics/usage-statistics?hours=1.5", "hours"),
        ("/api/v1/gpu/metrics/overheating-alerts?hours=-1", "hours"),
        ("/api/v1/gpu/metrics/overheating-alerts?threshold=-5", "threshold"),
        ("/api/v1/gpu/metrics/overheating-alerts?threshold=hot", "threshold"),
        ("/api/v1/gpu/metrics/overheating-alerts?threshold=1e9", "threshold"),
        ('/api/v1/gpu/allocations?namespace=a"} or vector(1) #', "namespace"),
        ('/api/v1/gpu/allocations?team=x"} or vector(1) #', "team"),
    ],
)
def test_bad_parameters_are_400(history: tuple[FlaskClient, float], path: str, field: str) -> None:
    client, _ = history
    response = client.get(path)
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "INVALID_PARAMETER"
    assert error["details"]["field"] == field


def test_prometheus_stopped_is_503(prometheus: Callable[..., Any]) -> None:
    server = prometheus()
    config = Config(prometheus=PrometheusConfig(url=server.url, timeout_seconds=10, retries=0))
    client = create_app(config).test_client()
    assert data(client.get("/api/v1/gpu/allocations"))["allocations"] == []
    server.process.terminate()
    server.process.wait(timeout=10)
    for path in (
        "/api/v1/gpu/allocations",
        "/api/v1/gpu/metrics/usage-statistics",
        "/api/v1/gpu/metrics/overheating-alerts",
        "/api/v1/gpu/overview",
    ):
        response = client.get(path)
        assert response.status_code == 503, path
        assert response.get_json()["error"]["code"] == "SERVICE_UNAVAILABLE"
