"""Devices and MIG API against a real Prometheus holding the attribution fleet's history.

Three hours of exporter-shaped history (``write_openmetrics``) are backfilled, plus hand-written
MIG capacity series at the last instant; the service's clock sits just after the last sample,
so every figure must equal the fleet's ground truth at that sample (``Fleet.gpu_state``).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from analytics import devices
from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from exporter.simulator import load_fleet
from exporter.simulator.fleet import Fleet
from exporter.simulator.history import write_openmetrics
from tests.conftest import PrometheusFactory, PrometheusServer
from tests.unit.exporter_harness import FLEETS

pytestmark = pytest.mark.integration

STEP = 60.0
HOURS = 3
NODE = "attr-node"
LEGACY = "legacy-node"
INJECTION = 'a"} or vector(1) #'

# attr-node GPU 1 (H100, MIG 4g.40gb + 3g.40gb): hand-written capacity series.
CAPACITY = {"1g.10gb": (7, 0, 0), "3g.40gb": (2, 1, 0), "4g.40gb": (1, 1, 0)}


def _fleet() -> Fleet:
    return load_fleet(FLEETS / "attribution.yaml")


def _capacity_lines(fleet: Fleet, t: float) -> str:
    """OpenMetrics families for gpu_mig_instance_capacity/instances/available at ``t``."""
    g = fleet.gpu(NODE, 1)
    base = (
        f'node="{NODE}",gpu="1",uuid="{g.uuid}",model="{g.model.name}",pci_bus_id="{g.pci_bus_id}"'
    )
    lines = []
    for position, metric in enumerate(devices.CAPACITY_METRICS):
        lines.append(f"# TYPE {metric} gauge")
        for profile, values in CAPACITY.items():
            labels = f'{base},mig_profile="{profile}",instance="{NODE}",job="gpu-exporter"'
            lines.append(f"{metric}{{{labels}}} {values[position]} {int(t)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def history(
    module_prometheus: PrometheusFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FlaskClient, Fleet, float]]:
    """The service over three hours of both nodes' history; yields (client, fleet, last t)."""
    fleet = _fleet()
    end = math.floor(time.time() / STEP) * STEP - 3600.0
    start = end - HOURS * 3600.0
    last = end - STEP
    path = tmp_path_factory.mktemp("openmetrics") / "history.om"
    with path.open("w") as out:
        write_openmetrics(fleet, out, start=start, end=end, step=STEP, pod_labels=("team", "app"))
    text = path.read_text()
    assert text.endswith("# EOF\n")
    path.write_text(text[: -len("# EOF\n")] + _capacity_lines(fleet, last) + "# EOF\n")
    server = module_prometheus(openmetrics=path)
    config = Config(prometheus=PrometheusConfig(url=server.url, timeout_seconds=10, retries=0))
    now = dt.datetime.fromtimestamp(last + 30, tz=dt.UTC)
    yield create_app(config, clock=lambda: now).test_client(), fleet, last


def ok(client: FlaskClient, path: str, **query: Any) -> Any:
    response = client.get(path, query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "success"
    return body["data"]


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "error"
    assert body["error"]["code"] == code


EXPECTED_PODS = {
    (NODE, 0): [("ml", "trainer-0")],
    (NODE, 1): [("inference", "llm-large"), ("inference", "llm-small")],
    (NODE, 2): [("research", "notebook-a"), ("research", "notebook-b"), ("research", "notebook-c")],
    (NODE, 3): [],  # its pod has Succeeded
    (NODE, 4): [],
    (LEGACY, 0): [("batch", "worker-7"), ("batch", "worker-8")],
}


def test_devices_match_ground_truth_at_the_last_sample(
    history: tuple[FlaskClient, Fleet, float],
) -> None:
    client, fleet, last = history
    got = ok(client, "/api/v1/gpu/devices")
    assert [(d["node"], d["index"]) for d in got] == list(EXPECTED_PODS)
    for device in got:
        node, index = device["node"], device["index"]
        gpu = fleet.gpu(node, index)
        state = fleet.gpu_state(node, index, last)
        assert device["deviceId"] == gpu.uuid
        assert device["modelName"] == gpu.model.name
        assert device["pciBusId"] == gpu.pci_bus_id
        mig = gpu.mig is not None
        mode = "enabled" if mig else ("disabled" if gpu.model.mig_capable else "unsupported")
        assert device["migMode"] == mode
        assert device["status"] == ("MIG_ENABLED" if mig else "ACTIVE")
        if mig:
            assert device["utilization"] is None
        else:
            assert device["utilization"] == pytest.approx(state.utilization_gpu / 100)
        assert device["memoryUsedBytes"] == state.memory_used
        assert device["memoryTotalBytes"] == state.memory_total
        assert device["temperatureCelsius"] == state.temperature_c
        assert device["powerWatts"] == pytest.approx(state.power_mw / 1000)
        pods = [(p["namespace"], p["pod"]) for p in device["allocatedTo"]]
        assert pods == EXPECTED_PODS[(node, index)]


def test_device_filters(history: tuple[FlaskClient, Fleet, float]) -> None:
    client, fleet, _ = history
    legacy = ok(client, "/api/v1/gpu/devices", nodeName=LEGACY)
    assert [d["deviceId"] for d in legacy] == [fleet.gpu(LEGACY, 0).uuid]
    l4 = ok(client, "/api/v1/gpu/devices", modelId="NVIDIA L4")
    assert [(d["node"], d["index"]) for d in l4] == [(NODE, 3), (NODE, 4)]
    mig = ok(client, "/api/v1/gpu/devices", status="mig_enabled")
    assert [(d["node"], d["index"]) for d in mig] == [(NODE, 1), (LEGACY, 0)]
    assert ok(client, "/api/v1/gpu/devices", status="FAILED") == []
    both = ok(client, "/api/v1/gpu/devices", nodeName=NODE, status="ACTIVE")
    assert [d["index"] for d in both] == [0, 2, 3, 4]
    assert ok(client, "/api/v1/gpu/devices", nodeName="no-such-node") == []


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/gpu/devices?status=broken", "status"),
        ("/api/v1/gpu/devices?nodeName=" + INJECTION.replace("#", "%23"), "nodeName"),
        ("/api/v1/gpu/devices?nodeName=UPPER", "nodeName"),
        ("/api/v1/gpu/devices?modelId=%07bell", "modelId"),
        ("/api/v1/gpu/devices/overheating?threshold=151", "threshold"),
        ("/api/v1/gpu/devices/overheating?threshold=-1", "threshold"),
        ("/api/v1/gpu/devices/overheating?threshold=hot", "threshold"),
        ("/api/v1/gpu/devices/overheating?threshold=nan", "threshold"),
        ("/api/v1/gpu/devices/%07x", "deviceId"),
        ("/api/v1/gpu/mig/devices/" + "x" * 300, "deviceId"),
    ],
)
def test_bad_parameters_are_400(
    history: tuple[FlaskClient, Fleet, float], path: str, field: str
) -> None:
    client, _, _ = history
    response = client.get(path)
    assert_error(response, 400, "INVALID_PARAMETER")
    assert response.get_json()["error"]["details"]["field"] == field


def test_unknown_device_is_404_and_injection_in_the_id_finds_nothing(
    history: tuple[FlaskClient, Fleet, float],
) -> None:
    client, _, _ = history
    for path in ("/api/v1/gpu/devices/", "/api/v1/gpu/mig/devices/"):
        for unknown in ("GPU-00000000-0000-0000-0000-000000000000", INJECTION):
            response = client.get(path + unknown.replace("#", "%23"))
            assert_error(response, 404, "RESOURCE_NOT_FOUND")


def test_one_device_with_its_mig_instances(history: tuple[FlaskClient, Fleet, float]) -> None:
    client, fleet, last = history
    gpu = fleet.gpu(NODE, 1)
    device = ok(client, f"/api/v1/gpu/devices/{gpu.uuid}")
    assert (device["node"], device["index"], device["status"]) == (NODE, 1, "MIG_ENABLED")
    assert device["memoryUsedBytes"] == fleet.gpu_state(NODE, 1, last).memory_used
    assert [i["profile"] for i in device["migInstances"]] == ["4g.40gb", "3g.40gb"]
    whole = ok(client, f"/api/v1/gpu/devices/{fleet.gpu(NODE, 0).uuid}")
    assert whole["migInstances"] == []
    assert whole["allocatedTo"] == [{"namespace": "ml", "pod": "trainer-0"}]


def test_mig_device_instances_match_ground_truth(
    history: tuple[FlaskClient, Fleet, float],
) -> None:
    client, fleet, last = history
    gpu = fleet.gpu(NODE, 1)
    assert gpu.mig is not None
    data = ok(client, f"/api/v1/gpu/mig/devices/{gpu.uuid}")
    assert data["deviceId"] == gpu.uuid
    assert data["migMode"] == "enabled"
    pods = {1: "llm-large", 2: "llm-small"}
    assert [i["gpuInstance"] for i in data["instances"]] == [1, 2]
    for inst, sim in zip(data["instances"], gpu.mig, strict=True):
        state = fleet.mig_state(NODE, 1, sim.gpu_instance_id, last)
        assert inst["profile"] == sim.profile.key
        assert inst["computeInstance"] == sim.compute_instance_id
        assert inst["migUuid"] == sim.uuid
        assert inst["memoryUsedBytes"] == state.memory_used
        assert inst["memoryTotalBytes"] == sim.profile.memory_size_mb * 1024 * 1024
        assert inst["smActivity"] is not None and 0.0 <= inst["smActivity"] <= 1.0  # H100: GPM
        assert inst["allocatedTo"] == [{"namespace": "inference", "pod": pods[inst["gpuInstance"]]}]
    # The legacy A100 has no GPM: SM activity is unknown, never estimated.
    legacy = ok(client, f"/api/v1/gpu/mig/devices/{fleet.gpu(LEGACY, 0).uuid}")
    assert len(legacy["instances"]) == 7
    assert all(i["smActivity"] is None for i in legacy["instances"])
    plain = ok(client, f"/api/v1/gpu/mig/devices/{fleet.gpu(NODE, 0).uuid}")
    assert plain["instances"] == [] and plain["migMode"] == "disabled"


def test_device_statistics(history: tuple[FlaskClient, Fleet, float]) -> None:
    client, fleet, last = history
    stats = ok(client, "/api/v1/gpu/devices/statistics")
    assert stats["totalDevices"] == 6
    assert stats["byModel"] == {
        "NVIDIA A100-SXM4-80GB": 2,
        "NVIDIA H100 80GB HBM3": 2,
        "NVIDIA L4": 2,
    }
    assert stats["byStatus"] == {"ACTIVE": 4, "MIG_ENABLED": 2}
    assert stats["byNode"] == {NODE: 5, LEGACY: 1}
    assert stats["allocatedDevices"] == 4
    states = [fleet.gpu_state(node, i, last) for node, i in EXPECTED_PODS]
    non_mig = [s for s in states if not s.mig_enabled]
    want_util = sum(s.utilization_gpu / 100 for s in non_mig) / len(non_mig)
    assert stats["averageUtilization"] == pytest.approx(want_util)
    used = sum(s.memory_used for s in states)
    assert stats["averageMemoryUsedBytes"] == pytest.approx(used / len(states))
    assert stats["memoryUsedRatio"] == pytest.approx(used / sum(s.memory_total for s in states))


def test_overheating(history: tuple[FlaskClient, Fleet, float]) -> None:
    client, fleet, last = history
    temps = {(n, i): fleet.gpu_state(n, i, last).temperature_c for n, i in EXPECTED_PODS}
    threshold = sorted(temps.values())[len(temps) // 2]
    data = ok(client, "/api/v1/gpu/devices/overheating", threshold=threshold)
    assert data["thresholdCelsius"] == threshold
    got = {(d["node"], d["index"]) for d in data["devices"]}
    assert got == {key for key, t in temps.items() if t > threshold}
    hot = [d["temperatureCelsius"] for d in data["devices"]]
    assert hot == sorted(hot, reverse=True)
    default = ok(client, "/api/v1/gpu/devices/overheating")
    assert default["thresholdCelsius"] == 85
    assert {(d["node"], d["index"]) for d in default["devices"]} == {
        key for key, t in temps.items() if t > 85
    }
    assert ok(client, "/api/v1/gpu/devices/overheating", threshold=150)["devices"] == []


def test_mig_available(history: tuple[FlaskClient, Fleet, float]) -> None:
    client, fleet, _ = history
    rows = ok(client, "/api/v1/gpu/mig/available")
    uuid = fleet.gpu(NODE, 1).uuid
    assert {r["profile"]: (r["capacity"], r["instances"], r["available"]) for r in rows} == (
        CAPACITY
    )
    assert all(r["deviceId"] == uuid and r["node"] == NODE and r["index"] == 1 for r in rows)


def test_mig_statistics(history: tuple[FlaskClient, Fleet, float]) -> None:
    client, _, _ = history
    stats = ok(client, "/api/v1/gpu/mig/statistics")
    assert stats["totalInstances"] == 9
    assert stats["devices"] == 2
    assert stats["allocatedInstances"] == 4
    assert stats["freeInstances"] == 5
    by = stats["byProfile"]
    assert set(by) == {"1g.10gb", "3g.40gb", "4g.40gb"}
    assert (by["1g.10gb"]["instances"], by["1g.10gb"]["allocated"]) == (7, 2)
    assert by["1g.10gb"]["averageSmActivity"] is None  # A100: no GPM
    assert by["4g.40gb"]["allocated"] == 1 and by["4g.40gb"]["free"] == 0
    assert 0.0 <= by["4g.40gb"]["averageSmActivity"] <= 1.0
    assert stats["averageSmActivity"] == pytest.approx(
        (by["3g.40gb"]["averageSmActivity"] + by["4g.40gb"]["averageSmActivity"]) / 2
    )


def test_status_is_failed_when_the_gpu_is_down() -> None:
    info = {"uuid": "GPU-x", "node": "n", "gpu": "0", "model": "M", "mig_mode": "enabled"}
    found = devices.build_devices({"gpu_info": [(info, 1.0)], "gpu_up": [(info, 0.0)]})
    assert found[0]["status"] == "FAILED"
    assert found[0]["utilization"] is None and found[0]["allocatedTo"] == []


def _client(server: PrometheusServer) -> FlaskClient:
    config = Config(prometheus=PrometheusConfig(url=server.url, timeout_seconds=5, retries=0))
    return create_app(config).test_client()


def test_prometheus_stopped_is_503(prometheus: Callable[..., PrometheusServer]) -> None:
    server = prometheus()
    client = _client(server)
    assert ok(client, "/api/v1/gpu/devices") == []
    assert_error(client.get("/api/v1/gpu/devices/GPU-x"), 404, "RESOURCE_NOT_FOUND")
    server.process.terminate()
    server.process.wait(timeout=10)
    for path in (
        "/api/v1/gpu/devices",
        "/api/v1/gpu/devices/GPU-x",
        "/api/v1/gpu/devices/statistics",
        "/api/v1/gpu/devices/overheating",
        "/api/v1/gpu/mig/available",
        "/api/v1/gpu/mig/devices/GPU-x",
        "/api/v1/gpu/mig/statistics",
    ):
        assert_error(client.get(path), 503, "SERVICE_UNAVAILABLE")
