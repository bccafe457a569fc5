"""End to end: simulated fleet → history in a real Prometheus (raw series backfilled, the
generated pricing rules backfilled over them) → the analytics service → cost reports that
match the fleet's ground truth within 0.5%, MIG slices and a GPU shared by three pods
included."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from exporter.simulator import load_fleet
from exporter.simulator.history import backfill
from tests.ground_truth import (
    REPO,
    expected_cost_per_hour,
    expected_gpu_equivalents,
    expected_utilized_equivalents,
)
from tests.unit.exporter_harness import FLEETS

NODE = "attr-node"
STEP = 60.0
HOURS = 6


@pytest.fixture(scope="module")
def history(
    module_prometheus: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FlaskClient, float, float]]:
    """Six hours of one node's history ending an hour ago, and the service over it."""
    fleet = load_fleet(FLEETS / "attribution.yaml")
    end = math.floor(time.time() / STEP) * STEP - 3600.0
    start = end - HOURS * 3600.0
    data = tmp_path_factory.mktemp("tsdb")
    backfill(
        fleet,
        data,
        start=start,
        end=end,
        step=STEP,
        nodes=[NODE],
        pod_labels=("team", "app"),
        rule_files=[REPO / "rules" / "pricing.yml"],
    )
    server = module_prometheus(data_dir=data)
    config = Config(prometheus=PrometheusConfig(url=server.url, timeout_seconds=10, retries=0))
    now = dt.datetime.fromtimestamp(end + 3600, tz=dt.UTC)
    yield create_app(config, clock=lambda: now).test_client(), start, end


def expected_totals(
    start: float,
    end: float,
    key: str,
    per_hour: Callable[..., dict[str, float]] = expected_cost_per_hour,
) -> dict[str, float]:
    """Ground-truth dollars (or GPU-hours) per namespace or team over (start, end]."""
    fleet = load_fleet(FLEETS / "attribution.yaml")
    keys = {
        "namespace": lambda pod: pod.namespace,
        "team": lambda pod: pod.labels.get("team", "(none)"),
    }
    total: dict[str, float] = defaultdict(float)
    t = start + STEP
    while t <= end:
        for name, rate in per_hour(fleet, NODE, t, keys[key]).items():
            total[name] += rate * STEP / 3600
        t += STEP
    return dict(total)


def edge_tolerance(start: float, end: float) -> float:
    """How far a ratio of window sums may move when the rules' evaluation instants (offset
    within one interval by the rule group's hash) shift the window by one sample: one sample
    of activity (at most 1.0) out of those in the window."""
    return STEP / (end - start)


def report(
    client: FlaskClient, start: float, end: float, aggregate: str, field: str = "cost"
) -> dict[str, float]:
    response = client.get(
        "/api/v1/gpu/cost/report",
        query_string={"start": int(start), "end": int(end), "aggregate": aggregate},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    rows = response.get_json()["data"]["rows"]
    return {row["key"]: row[field] for row in rows if row["kind"] == "allocated"}


def inner_window(start: float, end: float) -> tuple[float, float]:
    """A window inside the history, so the recorded series cover all of it."""
    return start + 3600, end - 1800


def assert_matches_ground_truth(
    client: FlaskClient,
    start: float,
    end: float,
    aggregate: str,
    field: str = "cost",
    per_hour: Callable[..., dict[str, float]] = expected_cost_per_hour,
) -> dict[str, float]:
    """The report's `field` per key equals the ground truth within 0.5%; returns the truth."""
    window_start, window_end = inner_window(start, end)
    got = report(client, window_start, window_end, aggregate, field=field)
    want = expected_totals(window_start, window_end, aggregate, per_hour)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=0.005), name
    return want


def assert_efficiency_matches_ground_truth(
    client: FlaskClient, start: float, end: float
) -> dict[str, float]:
    """Efficiency per namespace is busy over held GPU-hours of the ground truth."""
    window_start, window_end = inner_window(start, end)
    got = report(client, window_start, window_end, "namespace", field="efficiency")
    held = expected_totals(window_start, window_end, "namespace", expected_gpu_equivalents)
    busy = expected_totals(window_start, window_end, "namespace", expected_utilized_equivalents)
    assert set(got) == set(held)
    for name in held:
        assert got[name] == pytest.approx(
            busy[name] / held[name], abs=edge_tolerance(window_start, window_end)
        ), name
    return got


def test_gpu_hours_match_ground_truth_within_half_a_percent(
    history: tuple[FlaskClient, float, float],
) -> None:
    assert_matches_ground_truth(
        *history, "namespace", field="gpuHours", per_hour=expected_gpu_equivalents
    )


def test_efficiency_is_busy_over_held_gpu_hours_from_ground_truth(
    history: tuple[FlaskClient, float, float],
) -> None:
    got = assert_efficiency_matches_ground_truth(*history)
    # The whole H100 trains, the MIG inference slices and the time-sliced A100 serve: none of
    # them idle for the whole window, none saturated.
    assert all(0 < value < 1 for value in got.values()), got


@pytest.mark.parametrize("aggregate", ["namespace", "team"])
def test_cost_report_matches_ground_truth_within_half_a_percent(
    history: tuple[FlaskClient, float, float], aggregate: str
) -> None:
    want = assert_matches_ground_truth(*history, aggregate)
    # Whole GPU (ml), MIG slices (inference), the A100 time-sliced between three research
    # pods (one of them without a team label), and a Succeeded pod that pays nothing (batch).
    expected_keys = {
        "namespace": {"ml", "inference", "research"},
        "team": {"vision", "nlp", "research", "(none)"},
    }
    assert set(want) == expected_keys[aggregate]


def test_cost_by_mig_profile_prices_each_slice_by_its_share(
    history: tuple[FlaskClient, float, float],
) -> None:
    client, start, end = history
    window_start, window_end = inner_window(start, end)
    got = report(client, window_start, window_end, "mig_profile")
    hours = (window_end - window_start) / 3600
    # examples/pricing.yaml: H100 $7/h; 4g.40gb is priced at half the GPU, 3g.40gb at 3/7.
    assert got["4g.40gb"] == pytest.approx(7.0 * 0.5 * hours, rel=0.005)
    assert got["3g.40gb"] == pytest.approx(7.0 * 3 / 7 * hours, rel=0.005)
