"""Cost API against the real Prometheus 2.42 holding hand-written recorded cost series.

Three days of the pricing rules' output at 1-minute steps are backfilled with ``promtool tsdb
create-blocks-from openmetrics``: an H100 held by ``ml-serving/serve-0`` (team ml) all the
time, an A100 in MIG mode whose 3g.40gb instance ``research/train-0`` (team research) holds
on days 2-3 and whose 1g.10gb instance ``research/notebook-0`` (no team label) holds on day 1,
and an idle L4. Every expected dollar below is worked out by hand from those prices.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from analytics.app import create_app
from analytics.config import Config, Limits, PrometheusConfig
from tests.conftest import PrometheusFactory, PrometheusServer

pytestmark = pytest.mark.integration

DAY = 86_400
STEP = 60
# Day-aligned, so windows given in whole days start and end exactly on a sample: the
# half-open (start, end] rule is what keeps boundary samples from counting twice.
T0 = (int(time.time()) // DAY - 5) * DAY
T_END = T0 + 3 * DAY
NOW = dt.datetime.fromtimestamp(T_END, dt.UTC)

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
L4 = "NVIDIA L4"

SERVE = {
    "node": "n1",
    "gpu": "0",
    "uuid": "GPU-a",
    "model": H100,
    "namespace": "ml-serving",
    "pod": "serve-0",
    "label_team": "ml",
}
TRAIN = {
    "node": "n2",
    "gpu": "0",
    "uuid": "GPU-b",
    "model": A100,
    "namespace": "research",
    "pod": "train-0",
    "label_team": "research",
    "mig_profile": "3g.40gb",
    "mig_uuid": "MIG-1",
}
NOTEBOOK = {
    "node": "n2",
    "gpu": "0",
    "uuid": "GPU-b",
    "model": A100,
    "namespace": "research",
    "pod": "notebook-0",
    "mig_profile": "1g.10gb",
    "mig_uuid": "MIG-2",
}
GPU_B = {"node": "n2", "gpu": "0", "uuid": "GPU-b", "model": A100}
GPU_C = {"node": "n1", "gpu": "1", "uuid": "GPU-c", "model": L4}

# Value as a function of the day (0, 1, 2); None: no sample that day.
Value = Callable[[int], float | None]
ALL = lambda value: lambda day: value  # noqa: E731
DAY1 = lambda value: lambda day: value if day == 0 else None  # noqa: E731
DAYS23 = lambda value: lambda day: value if day >= 1 else None  # noqa: E731

SERIES: list[tuple[str, dict[str, str], Value]] = [
    ("pod:gpu_cost_dollars_per_hour:allocated", SERVE, ALL(7.0)),
    ("pod:gpu_cost_dollars_per_hour:allocated", TRAIN, DAYS23(1.5)),
    ("pod:gpu_cost_dollars_per_hour:allocated", NOTEBOOK, DAY1(0.5)),
    ("namespace:gpu_cost_dollars_per_hour:sum", {"namespace": "ml-serving"}, ALL(7.0)),
    (
        "namespace:gpu_cost_dollars_per_hour:sum",
        {"namespace": "research"},
        lambda d: 0.5 if d == 0 else 1.5,
    ),
    ("team:gpu_cost_dollars_per_hour:sum", {"team": "ml"}, ALL(7.0)),
    ("team:gpu_cost_dollars_per_hour:sum", {"team": "research"}, DAYS23(1.5)),
    ("team:gpu_cost_dollars_per_hour:sum", {}, DAY1(0.5)),
    ("node:gpu_cost_dollars_per_hour:sum", {"node": "n1"}, ALL(7.0)),
    ("node:gpu_cost_dollars_per_hour:sum", {"node": "n2"}, lambda d: 0.5 if d == 0 else 1.5),
    ("model:gpu_cost_dollars_per_hour:sum", {"model": H100}, ALL(7.0)),
    ("model:gpu_cost_dollars_per_hour:sum", {"model": A100}, lambda d: 0.5 if d == 0 else 1.5),
    (
        "mig_profile:gpu_cost_dollars_per_hour:sum",
        {"model": A100, "mig_profile": "3g.40gb"},
        DAYS23(1.5),
    ),
    (
        "mig_profile:gpu_cost_dollars_per_hour:sum",
        {"model": A100, "mig_profile": "1g.10gb"},
        DAY1(0.5),
    ),
    ("device:gpu_cost_dollars_per_hour:unallocated", GPU_B, lambda d: 3.0 if d == 0 else 2.0),
    ("device:gpu_cost_dollars_per_hour:unallocated", GPU_C, ALL(0.75)),
    ("cluster:gpu_cost_dollars_per_hour:allocated", {}, lambda d: 7.5 if d == 0 else 8.5),
    ("cluster:gpu_cost_dollars_per_hour:unallocated", {}, lambda d: 3.75 if d == 0 else 2.75),
    ("cluster:gpu_price_dollars_per_hour:sum", {}, ALL(11.25)),
    # The proposed GPU-share series: whole GPU 1, 3g.40gb 3/7, 1g.10gb 1/7.
    ("pod:gpu_allocated_devices:share", SERVE, ALL(1.0)),
    ("pod:gpu_allocated_devices:share", TRAIN, DAYS23(3 / 7)),
    ("pod:gpu_allocated_devices:share", NOTEBOOK, DAY1(1 / 7)),
    # Utilization measured on the H100 only (A100 MIG instances have no GPM): 50 % busy.
    ("pod:gpu_measured_devices:share", SERVE, ALL(1.0)),
    ("pod:gpu_utilized_devices:share", SERVE, ALL(0.5)),
    # Their sums by namespace, as the pricing rules record them for reports.
    ("namespace:gpu_allocated_devices:sum", {"namespace": "ml-serving"}, ALL(1.0)),
    (
        "namespace:gpu_allocated_devices:sum",
        {"namespace": "research"},
        lambda d: 1 / 7 if d == 0 else 3 / 7,
    ),
    ("namespace:gpu_measured_devices:sum", {"namespace": "ml-serving"}, ALL(1.0)),
    ("namespace:gpu_utilized_devices:sum", {"namespace": "ml-serving"}, ALL(0.5)),
    ("node:gpu_allocated_devices:sum", {"node": "n1"}, ALL(1.0)),
    ("node:gpu_allocated_devices:sum", {"node": "n2"}, lambda d: 1 / 7 if d == 0 else 3 / 7),
    ("device:gpu_unallocated_devices:share", GPU_B, lambda d: 6 / 7 if d == 0 else 4 / 7),
    ("device:gpu_unallocated_devices:share", GPU_C, ALL(1.0)),
]


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}" if inner else ""


def write_history(path: Path) -> None:
    """The series above as OpenMetrics: one sample per minute, at T0 + 1 min ... T0 + 3 days."""
    lines: list[str] = []
    names = list(dict.fromkeys(name for name, _, _ in SERIES))
    for name in names:
        lines.append(f"# TYPE {name} gauge")
        for series_name, labels, value in SERIES:
            if series_name != name:
                continue
            for ts in range(T0 + STEP, T_END + 1, STEP):
                v = value((ts - T0 - 1) // DAY)
                if v is not None:
                    lines.append(f"{name}{_labels(labels)} {v!r} {ts}")
    lines.append("# EOF")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def prom(
    module_prometheus: PrometheusFactory, tmp_path_factory: pytest.TempPathFactory
) -> PrometheusServer:
    history = tmp_path_factory.mktemp("cost-history") / "history.om"
    write_history(history)
    return module_prometheus(openmetrics=history)


def client_for(url: str, now: dt.datetime = NOW, **settings: Any) -> FlaskClient:
    config = Config(prometheus=PrometheusConfig(url=url, timeout_seconds=10, retries=0), **settings)
    return create_app(config, clock=lambda: now).test_client()


@pytest.fixture
def client(prom: PrometheusServer) -> Iterator[FlaskClient]:
    yield client_for(prom.url)


def data(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "success"
    return dict(body["data"])


def cents(value: float) -> Any:
    return pytest.approx(value, abs=0.005)


def iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- /gpu/cost/analysis -----------------------------------------------------------------------


def test_analysis_over_the_three_recorded_days_is_exact(client: FlaskClient) -> None:
    got = data(client.get("/api/v1/gpu/cost/analysis?days=3"))
    # Allocated 7*72 + 0.5*24 + 1.5*48 = 588; unallocated 3.75*24 + 2.75*48 = 222.
    assert got["totalCost"] == cents(810.0)
    assert got["allocatedCost"] == cents(588.0)
    assert got["dailyCost"] == cents(270.0)
    assert got["weeklyCost"] == cents(1890.0)
    assert got["monthlyCost"] == cents(8100.0)
    assert got["costByNamespace"] == {"ml-serving": cents(504.0), "research": cents(84.0)}
    assert list(got["costByNamespace"]) == ["ml-serving", "research"]  # dearest first
    assert got["costByTeam"] == {"ml": cents(504.0), "research": cents(72.0), "(none)": cents(12.0)}
    assert got["costByModel"] == {H100: cents(504.0), A100: cents(84.0)}
    assert got["costByMigProfile"] == {"3g.40gb": cents(72.0), "1g.10gb": cents(12.0)}
    assert got["idleCost"] == {"unallocated": cents(222.0)}
    # Only recorded cost series here (no device activity): no suggestion, nothing to save.
    assert got["potentialMonthlySavings"] == 0.0
    assert got["analysisDate"] == iso(T_END)
    assert got["currency"] == "USD"
    assert got["window"] == {"start": iso(T0), "end": iso(T_END), "days": 3}


def test_analysis_daily_cost_averages_over_the_whole_window(client: FlaskClient) -> None:
    got = data(client.get("/api/v1/gpu/cost/analysis"))  # default 7 days, 3 of them recorded
    assert got["window"]["days"] == 7
    assert got["totalCost"] == cents(810.0)
    assert got["dailyCost"] == cents(810.0 / 7)
    assert got["monthlyCost"] == cents(810.0 / 7 * 30)


def test_analysis_before_any_recording_is_null_not_zero(prom: PrometheusServer) -> None:
    got = data(client_for(prom.url, NOW - dt.timedelta(days=5)).get("/api/v1/gpu/cost/analysis"))
    assert got["dailyCost"] is None
    assert got["totalCost"] is None
    assert got["idleCost"] == {"unallocated": None}
    assert got["costByNamespace"] == {}


# --- /gpu/cost/report -------------------------------------------------------------------------


def rows_by_key(got: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["kind"], row["key"]): row for row in got["rows"]}


def test_report_by_namespace_has_gpu_hours_efficiency_and_the_idle_row(
    client: FlaskClient,
) -> None:
    got = data(client.get("/api/v1/gpu/cost/report?window=3d"))
    assert got["aggregate"] == "namespace"
    assert got["totalCost"] == cents(810.0)
    assert got["unallocatedCost"] == cents(222.0)
    assert [(r["kind"], r["key"]) for r in got["rows"]] == [
        ("allocated", "ml-serving"),
        ("allocated", "research"),
        ("unallocated", "unallocated"),
    ]
    rows = rows_by_key(got)
    serving = rows["allocated", "ml-serving"]
    assert serving["cost"] == cents(504.0)
    assert serving["gpuHours"] == pytest.approx(72.0)
    assert serving["efficiency"] == pytest.approx(0.5)
    assert serving["share"] == pytest.approx(504 / 810)
    research = rows["allocated", "research"]
    assert research["cost"] == cents(84.0)
    assert research["gpuHours"] == pytest.approx(24.0)  # 3/7 * 48 h + 1/7 * 24 h
    assert research["efficiency"] is None  # MIG on A100: never measured, so unknown
    idle = rows["unallocated", "unallocated"]
    assert idle["cost"] == cents(222.0)
    assert idle["gpuHours"] == pytest.approx(120.0)  # L4 72 h + A100 6/7*24 + 4/7*48
    assert idle["efficiency"] is None
    assert sum(r["share"] for r in got["rows"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # A day ending exactly on a sample: that sample is in, the one at the start is not.
        (f"window=24h&end={T0 + DAY}", {"ml-serving": 168.0, "research": 12.0}),
        (f"window=24h&end={T0 + 2 * DAY}", {"ml-serving": 168.0, "research": 36.0}),
        # Start/end as RFC 3339, half a day across the day-1/day-2 boundary.
        (
            f"start={iso(T0 + DAY - 6 * 3600)}&end={iso(T0 + DAY + 6 * 3600)}",
            {"ml-serving": 84.0, "research": 0.5 * 6 + 1.5 * 6},
        ),
        # Partly before the recorded history: only what was recorded costs.
        (f"start={T0 - DAY}&end={T0 + 3600}", {"ml-serving": 7.0, "research": 0.5}),
    ],
)
def test_report_over_partial_windows_is_exact(
    client: FlaskClient, query: str, expected: dict[str, float]
) -> None:
    got = data(client.get(f"/api/v1/gpu/cost/report?aggregate=namespace&{query}"))
    costs = {r["key"]: r["cost"] for r in got["rows"] if r["kind"] == "allocated"}
    assert costs == {key: cents(value) for key, value in expected.items()}


def test_adjacent_windows_add_up_to_the_whole(client: FlaskClient) -> None:
    whole = data(client.get(f"/api/v1/gpu/cost/report?start={T0}&end={T_END}"))["totalCost"]
    parts = [
        data(client.get(f"/api/v1/gpu/cost/report?start={a}&end={a + DAY}"))["totalCost"]
        for a in (T0, T0 + DAY, T0 + 2 * DAY)
    ]
    assert sum(parts) == cents(whole)
    assert whole == cents(810.0)


@pytest.mark.parametrize(
    ("aggregate", "allocated", "unallocated"),
    [
        ("team", {"ml": 504.0, "research": 72.0, "(none)": 12.0}, {"unallocated": 222.0}),
        (
            "pod",
            {"ml-serving/serve-0": 504.0, "research/train-0": 72.0, "research/notebook-0": 12.0},
            {"unallocated": 222.0},
        ),
        ("node", {"n1": 504.0, "n2": 84.0}, {"n1": 54.0, "n2": 168.0}),
        ("model", {H100: 504.0, A100: 84.0}, {L4: 54.0, A100: 168.0}),
        ("mig_profile", {"3g.40gb": 72.0, "1g.10gb": 12.0}, {"unallocated": 222.0}),
    ],
)
def test_report_by_every_aggregate(
    client: FlaskClient,
    aggregate: str,
    allocated: dict[str, float],
    unallocated: dict[str, float],
) -> None:
    got = data(client.get(f"/api/v1/gpu/cost/report?window=3d&aggregate={aggregate}"))
    assert {r["key"]: r["cost"] for r in got["rows"] if r["kind"] == "allocated"} == {
        k: cents(v) for k, v in allocated.items()
    }
    assert {r["key"]: r["cost"] for r in got["rows"] if r["kind"] == "unallocated"} == {
        k: cents(v) for k, v in unallocated.items()
    }
    # Every aggregate covers all the cost, except MIG profiles: whole GPUs have none.
    total = 810.0 if aggregate != "mig_profile" else 810.0 - 504.0
    assert got["totalCost"] == cents(total)


def test_report_by_node_gives_idle_gpu_hours_per_node(client: FlaskClient) -> None:
    got = data(client.get("/api/v1/gpu/cost/report?window=3d&aggregate=node"))
    rows = rows_by_key(got)
    assert rows["unallocated", "n1"]["gpuHours"] == pytest.approx(72.0)
    assert rows["unallocated", "n2"]["gpuHours"] == pytest.approx(48.0)
    assert rows["allocated", "n1"]["gpuHours"] == pytest.approx(72.0)


def test_report_filters_by_namespace_and_team(client: FlaskClient) -> None:
    got = data(client.get("/api/v1/gpu/cost/report?window=3d&aggregate=team&namespace=research"))
    assert got["filters"] == {"namespace": "research", "team": None}
    assert {r["key"]: r["cost"] for r in got["rows"]} == {
        "research": cents(72.0),
        "(none)": cents(12.0),
    }
    assert all(r["kind"] == "allocated" for r in got["rows"])  # idle capacity is nobody's
    assert got["unallocatedCost"] is None
    assert got["totalCost"] == cents(84.0)

    got = data(client.get("/api/v1/gpu/cost/report?window=3d&aggregate=pod&team=research"))
    assert {r["key"]: r["cost"] for r in got["rows"]} == {"research/train-0": cents(72.0)}
    assert got["rows"][0]["gpuHours"] == pytest.approx(48 * 3 / 7)

    got = data(client.get("/api/v1/gpu/cost/report?window=3d&namespace=nobody-here"))
    assert got["rows"] == []
    assert got["totalCost"] == 0


def test_report_as_csv(client: FlaskClient) -> None:
    response = client.get("/api/v1/gpu/cost/report?window=3d&aggregate=namespace&format=csv")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    text = response.get_data(as_text=True)
    lines = text.splitlines()
    assert lines[0] == (
        "window_start,window_end,aggregate,kind,key,cost_usd,gpu_hours,efficiency,share"
    )
    assert len(lines) == 4
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["key"] for r in rows] == ["ml-serving", "research", "unallocated"]
    assert rows[0]["window_start"] == iso(T0)
    assert rows[0]["window_end"] == iso(T_END)
    assert float(rows[0]["cost_usd"]) == cents(504.0)
    assert float(rows[1]["cost_usd"]) == cents(84.0)
    assert rows[1]["efficiency"] == ""  # unknown, not 0
    assert float(rows[2]["cost_usd"]) == cents(222.0)
    assert rows[2]["kind"] == "unallocated"


# --- /gpu/allocations/cost-statistics ---------------------------------------------------------


def test_cost_per_allocation(client: FlaskClient) -> None:
    got = data(client.get("/api/v1/gpu/allocations/cost-statistics?days=3&top=2"))
    assert got["allocationCount"] == 3
    assert got["totalCost"] == cents(588.0)
    assert got["averageCostPerAllocation"] == cents(196.0)
    assert got["medianCostPerAllocation"] == cents(72.0)
    assert got["maxCostPerAllocation"] == cents(504.0)
    top = got["topAllocations"]
    assert [(a["namespace"], a["pod"], a["team"]) for a in top] == [
        ("ml-serving", "serve-0", "ml"),
        ("research", "train-0", "research"),
    ]
    assert top[0]["cost"] == cents(504.0)
    assert top[0]["costPerGpuHour"] == cents(7.0)
    assert top[0]["efficiency"] == pytest.approx(0.5)
    assert top[1]["gpuHours"] == pytest.approx(48 * 3 / 7)
    assert top[1]["costPerGpuHour"] == cents(3.5)

    got = data(client.get("/api/v1/gpu/allocations/cost-statistics?days=3&namespace=research"))
    assert [a["pod"] for a in got["topAllocations"]] == ["train-0", "notebook-0"]
    assert got["topAllocations"][1]["team"] is None


# --- errors -----------------------------------------------------------------------------------


def assert_invalid(response: Any, field: str) -> None:
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "INVALID_PARAMETER"
    assert error["details"]["field"] == field
    assert error["details"]["reason"]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/gpu/cost/analysis?days=-1", "days"),
        ("/api/v1/gpu/cost/analysis?days=0", "days"),
        ("/api/v1/gpu/cost/analysis?days=91", "days"),
        ("/api/v1/gpu/cost/analysis?days=seven", "days"),
        ("/api/v1/gpu/cost/report?aggregate=datacenter", "aggregate"),
        ("/api/v1/gpu/cost/report?format=xlsx", "format"),
        ('/api/v1/gpu/cost/report?namespace=a"} or vector(1) #', "namespace"),
        ('/api/v1/gpu/cost/report?team=x"}) or vector(1', "team"),
        (f"/api/v1/gpu/cost/report?start={T0 + DAY}&end={T0}", "start"),
        (f"/api/v1/gpu/cost/report?start={T0}&end={T0}", "start"),
        ("/api/v1/gpu/cost/report?window=91d", "window"),
        ("/api/v1/gpu/cost/report?window=-7d", "window"),
        ("/api/v1/gpu/cost/report?window=7x", "window"),
        (f"/api/v1/gpu/cost/report?start={T0 - 100 * DAY}&end={T0}", "start"),
        ("/api/v1/gpu/cost/report?start=yesterday", "start"),
        ("/api/v1/gpu/cost/report?end=2025-08-01T00:00:00", "end"),
        ("/api/v1/gpu/cost/report?window=7d&start=1700000000", "window"),
        ('/api/v1/gpu/allocations/cost-statistics?namespace=a"} or vector(1) #', "namespace"),
        ("/api/v1/gpu/allocations/cost-statistics?top=0", "top"),
        ("/api/v1/gpu/allocations/cost-statistics?days=-3", "days"),
    ],
)
def test_bad_parameters_are_400(client: FlaskClient, path: str, field: str) -> None:
    assert_invalid(client.get(path), field)


def test_prometheus_stopped_is_503(prometheus: PrometheusFactory) -> None:
    server = prometheus()
    # Without the report cache, whose stored answer would (rightly) outlive the outage.
    client = client_for(server.url, limits=Limits(cache_ttl_seconds=0))
    assert data(client.get("/api/v1/gpu/cost/analysis"))["totalCost"] is None
    server.process.terminate()
    server.process.wait(timeout=10)
    for path in (
        "/api/v1/gpu/cost/analysis",
        "/api/v1/gpu/cost/report?window=24h",
        "/api/v1/gpu/cost/report?format=csv",
        "/api/v1/gpu/allocations/cost-statistics",
    ):
        response = client.get(path)
        assert response.status_code == 503, path
        assert response.get_json()["error"]["code"] == "SERVICE_UNAVAILABLE"
