"""Scale-out: the analytics runs unchanged on VictoriaMetrics (Debian's `victoria-metrics`,
Prometheus-compatible query API), the store a large fleet moves to.

The same history as the Prometheus end-to-end tests (raw series backfilled, the pricing and
GPU recording rules evaluated over them) is copied sample for sample from that Prometheus into
VictoriaMetrics through its import API; the service pointed at VictoriaMetrics must give the
same cost report (namespace, team: dollars, GPU-hours, efficiency) and the same idle list as the
service pointed at Prometheus, and both the fleet's ground truth.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from analytics.prometheus import PrometheusClient
from exporter.simulator import load_fleet
from exporter.simulator.history import backfill
from tests.ground_truth import REPO, expected_gpu_equivalents
from tests.integration import test_cost_end_to_end as cost_e2e
from tests.integration import test_idle as idle_e2e
from tests.integration.victoriametrics import copy_prometheus, victoriametrics
from tests.unit.exporter_harness import FLEETS


@dataclasses.dataclass
class Pair:
    """The same history behind two services: one on Prometheus, one on VictoriaMetrics."""

    prometheus: FlaskClient
    victoria: FlaskClient
    start: float
    end: float
    samples: int


def _client(url: str, now: dt.datetime, **config: Any) -> FlaskClient:
    cfg = Config(prometheus=PrometheusConfig(url=url, timeout_seconds=30, retries=0), **config)
    return create_app(cfg, clock=lambda: now).test_client()


@pytest.fixture(scope="module")
def cost_pair(
    module_prometheus: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """test_cost_end_to_end's six hours of one node, in Prometheus and in VictoriaMetrics."""
    fleet = load_fleet(FLEETS / "attribution.yaml")
    step = cost_e2e.STEP
    end = math.floor(time.time() / step) * step - 3600.0
    start = end - cost_e2e.HOURS * 3600.0
    data = tmp_path_factory.mktemp("tsdb")
    backfill(
        fleet,
        data,
        start=start,
        end=end,
        step=step,
        nodes=[cost_e2e.NODE],
        pod_labels=("team", "app"),
        rule_files=[REPO / "rules" / "pricing.yml"],
    )
    server = module_prometheus(data_dir=data)
    now = dt.datetime.fromtimestamp(end + 3600, tz=dt.UTC)
    with victoriametrics(tmp_path_factory.mktemp("vm-cost")) as vm:
        samples = copy_prometheus(server.url, vm.url, start - step, end + step)
        yield Pair(_client(server.url, now), _client(vm.url, now), start, end, samples)
        assert "error" not in vm.log().lower(), vm.log()


def test_the_whole_history_is_copied(cost_pair: Pair) -> None:
    # Raw series and recorded series: at least one sample per minute for each of dozens of
    # series over six hours.
    assert cost_pair.samples > 50 * cost_e2e.HOURS * 60


@pytest.mark.parametrize("aggregate", ["namespace", "team"])
def test_cost_report_on_victoriametrics_equals_prometheus_and_ground_truth(
    cost_pair: Pair, aggregate: str
) -> None:
    start, end = cost_pair.start, cost_pair.end
    want = cost_e2e.assert_matches_ground_truth(cost_pair.victoria, start, end, aggregate)
    window = cost_e2e.inner_window(start, end)
    for field in ("cost", "gpuHours", "efficiency"):
        on_prometheus = cost_e2e.report(cost_pair.prometheus, *window, aggregate, field=field)
        on_victoria = cost_e2e.report(cost_pair.victoria, *window, aggregate, field=field)
        assert set(on_victoria) == set(on_prometheus) == set(want)
        for key, value in on_prometheus.items():
            assert on_victoria[key] == pytest.approx(value, rel=0.005), (field, key)


def test_gpu_hours_and_efficiency_on_victoriametrics_match_ground_truth(cost_pair: Pair) -> None:
    start, end = cost_pair.start, cost_pair.end
    cost_e2e.assert_matches_ground_truth(
        cost_pair.victoria,
        start,
        end,
        "namespace",
        field="gpuHours",
        per_hour=expected_gpu_equivalents,
    )
    cost_e2e.assert_efficiency_matches_ground_truth(cost_pair.victoria, start, end)


@pytest.fixture(scope="module")
def idle_pair(
    module_prometheus: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[idle_e2e.History, idle_e2e.History]]:
    """test_idle's day of history (pricing and idle recording rules), in both stores."""
    histories = idle_e2e._history("exporter", module_prometheus, tmp_path_factory.mktemp("idle"))
    on_prometheus = next(histories)
    workdir = tmp_path_factory.mktemp("vm-idle")
    with victoriametrics(workdir) as vm:
        copy_prometheus(
            on_prometheus.config.prometheus.url,
            vm.url,
            on_prometheus.start - idle_e2e.STEP,
            on_prometheus.end + idle_e2e.STEP,
        )
        config = dataclasses.replace(
            on_prometheus.config,
            prometheus=dataclasses.replace(on_prometheus.config.prometheus, url=vm.url),
        )
        now = dt.datetime.fromtimestamp(on_prometheus.end, tz=dt.UTC)
        on_victoria = idle_e2e.History(
            create_app(config, clock=lambda: now).test_client(),
            PrometheusClient(vm.url),
            config,
            on_prometheus.start,
            on_prometheus.end,
        )
        yield on_prometheus, on_victoria
        assert "error" not in vm.log().lower(), vm.log()


def _idle_items(h: idle_e2e.History) -> dict[tuple[str, str, str], dict[str, Any]]:
    response = h.client.get(
        "/api/v1/gpu/idle", query_string={"start": int(h.start), "end": int(h.end)}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return {
        (i["namespace"], i["pod"], i["deviceId"]): i for i in response.get_json()["data"]["items"]
    }


def test_idle_list_on_victoriametrics_equals_prometheus(
    idle_pair: tuple[idle_e2e.History, idle_e2e.History],
) -> None:
    on_prometheus, on_victoria = idle_pair
    want, got = _idle_items(on_prometheus), _idle_items(on_victoria)
    assert want, "the fleet has idle pods"
    assert got.keys() == want.keys()
    for key, item in want.items():
        other = got[key]
        assert other["idleNow"] == item["idleNow"], key
        assert other["idleHours"] == pytest.approx(item["idleHours"], rel=0.005), key
        if item["idleCost"] is not None:
            assert other["idleCost"] == pytest.approx(item["idleCost"], rel=0.005), key


@pytest.mark.parametrize("category", list(idle_e2e.HELD))
def test_idle_spells_on_victoriametrics_match_the_simulators(
    idle_pair: tuple[idle_e2e.History, idle_e2e.History], category: str
) -> None:
    idle_e2e.test_idle_spells_match_the_simulators_with_precision_and_recall(idle_pair[1], category)
