"""Forecast endpoints over a real Prometheus: three days of a simulated node's history (raw
series and the pricing rules backfilled at a 5-minute interval), the service's forecasts of
GPUs held and GPU activity per scope, capacity, bad parameters, and the cached models."""

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
from analytics.pricing import load_pricing, render_rules
from exporter.simulator import load_fleet
from exporter.simulator.history import backfill
from tests.ground_truth import PRICING, REPO

FLEET = REPO / "tests" / "fleets" / "idle.yaml"
STEP = 300.0
DAYS = 3
# trainer 1 + two MIG slices 4/7 + 3/7 + the time-sliced A100 3 x 1/3 + the forgotten L4 1
HELD = 4.0


@pytest.fixture(scope="module")
def client(
    module_prometheus: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlaskClient]:
    tmp = tmp_path_factory.mktemp("forecast")
    rules = tmp / "pricing.yml"
    rules.write_text(render_rules(load_pricing(PRICING), interval="5m"))
    end = math.floor(time.time() / 3600) * 3600.0 - 3600.0
    backfill(
        load_fleet(FLEET),
        tmp / "tsdb",
        start=end - DAYS * 86400,
        end=end,
        step=STEP,
        rule_files=[rules],
        rules_interval="5m",
    )
    server = module_prometheus(data_dir=tmp / "tsdb")
    config = Config(
        prometheus=PrometheusConfig(url=server.url, timeout_seconds=30, retries=0),
        rules_interval_seconds=STEP,
    )
    now = dt.datetime.fromtimestamp(end, tz=dt.UTC)
    yield create_app(config, clock=lambda: now).test_client()


def _get(client: FlaskClient, path: str, **params: Any) -> Any:
    response = client.get(path, query_string=params)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["data"]


def test_cluster_forecast_of_gpus_held_and_activity(client: FlaskClient) -> None:
    data = _get(client, "/api/v1/gpu/forecast", hours=24)
    (cluster,) = data["forecasts"]
    assert cluster["scope"] == "cluster" and cluster["target"] == "cluster"
    assert cluster["historyHours"] >= DAYS * 24 - 2
    held = cluster["allocatedDevices"]
    assert len(held["points"]) == 24
    # The pods hold the same devices all along: a flat forecast at what they hold.
    for point in held["points"]:
        assert point["mean"] == pytest.approx(HELD, rel=0.01)
        assert point["lower"] <= point["mean"] <= point["upper"]
    activity = cluster["activity"]
    assert activity["model"] in {"ets-daily", "holt", "ses", "naive", "mean"}
    assert all(0 <= p["lower"] <= p["mean"] <= p["upper"] <= 1 for p in activity["points"])
    # Five GPUs on the node, four held: capacity does not run out.
    assert cluster["capacityDevices"] == 5
    assert cluster["capacityExhaustedAt"] is None


def test_scopes_and_names(client: FlaskClient) -> None:
    teams = _get(client, "/api/v1/gpu/forecast", scope="team", hours=6)["forecasts"]
    assert {f["target"] for f in teams} >= {"vision", "nlp", "research"}
    nlp = _get(client, "/api/v1/gpu/forecast", scope="team", name="nlp", hours=6)["forecasts"]
    assert [f["target"] for f in nlp] == ["nlp"]
    assert nlp[0]["allocatedDevices"]["points"][0]["mean"] == pytest.approx(1.0, rel=0.01)
    resources = _get(client, "/api/v1/resources/forecast", hours=12)
    assert {(r["scope"], r["target"]) for r in resources["resources"]} == {
        ("cluster", "cluster"),
        ("node", "idle-node"),
    }
    assert resources["exhaustedWithinHorizon"] == 0


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"hours": "0"}, 400),
        ({"hours": "1000"}, 400),
        ({"hours": "two"}, 400),
        ({"scope": "galaxy"}, 400),
        ({"scope": "namespace", "name": 'a"} or vector(1) #'}, 400),
        ({"scope": "cluster", "name": "x"}, 400),
        ({"scope": "namespace", "name": "no-such-namespace"}, 404),
    ],
)
def test_bad_parameters_get_the_error_envelope(
    client: FlaskClient, params: dict[str, str], status: int
) -> None:
    response = client.get("/api/v1/gpu/forecast", query_string=params)
    assert response.status_code == status
    assert response.get_json()["status"] == "error"


def test_forecasts_are_cached_not_refit_per_request(client: FlaskClient) -> None:
    first = _get(client, "/api/v1/gpu/forecast")["generatedAt"]
    for _ in range(3):
        assert _get(client, "/api/v1/gpu/forecast")["generatedAt"] == first
        assert _get(client, "/api/v1/resources/forecast")["generatedAt"] == first


def test_forecast_metrics_at_each_horizon_with_bounds(client: FlaskClient) -> None:
    # The first scrape starts the background refresh; values appear once it has run.
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = client.get("/metrics").get_data(as_text=True)
        if "gpu_analytics_forecast_refresh_success 1.0" in text:
            break
        time.sleep(0.5)
    for horizon in ("1h", "6h", "24h"):
        for bound in ("mean", "lower", "upper"):
            line = (
                "gpu_analytics_forecast_allocated_devices{"
                f'bound="{bound}",horizon="{horizon}",scope="cluster",target="cluster"}}'
            )
            assert line in text, line
    assert "gpu_analytics_capacity_exhaustion_seconds{" not in text  # capacity holds
