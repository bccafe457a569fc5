"""Two clusters in one store: each cluster's scrape adds `cluster`, the pricing rules keep it
through every sum, and the cost report by cluster equals each cluster's ground truth, while
the report by namespace adds the clusters up. Node names repeat across clusters (both have an
`attr-node`), as they do in real fleets."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from exporter.simulator.fleet import Fleet, parse_fleet
from exporter.simulator.history import backfill
from tests.ground_truth import REPO, expected_cost_per_hour
from tests.integration.test_cost_end_to_end import NODE, STEP, inner_window, report
from tests.unit.exporter_harness import FLEETS

HOURS = 6
CLUSTERS = {"east": 11, "west": 12}  # cluster -> fleet seed (different GPUs, same node names)


def _fleet(seed: int) -> Fleet:
    data = yaml.safe_load((FLEETS / "attribution.yaml").read_text())
    data["seed"] = seed
    return parse_fleet(data, f"attribution.yaml with seed {seed}")


@pytest.fixture(scope="module")
def history(
    module_prometheus: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FlaskClient, float, float]]:
    end = math.floor(time.time() / STEP) * STEP - 3600.0
    start = end - HOURS * 3600.0
    data = tmp_path_factory.mktemp("tsdb")
    names = list(CLUSTERS)
    for cluster in names:
        backfill(
            _fleet(CLUSTERS[cluster]),
            data,
            start=start,
            end=end,
            step=STEP,
            nodes=[NODE],
            target_labels=lambda node, c=cluster: {
                "job": "gpu-exporter",
                "instance": node,
                "cluster": c,
            },
            # The rules run once, over both clusters' raw series.
            rule_files=[REPO / "rules" / "pricing.yml"] if cluster == names[-1] else [],
        )
    server = module_prometheus(data_dir=data)
    config = Config(prometheus=PrometheusConfig(url=server.url, timeout_seconds=10, retries=0))
    now = dt.datetime.fromtimestamp(end + 3600, tz=dt.UTC)
    yield create_app(config, clock=lambda: now).test_client(), start, end


def _truth(fleet: Fleet, start: float, end: float, key: Callable[..., str]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    t = start + STEP
    while t <= end:
        for name, rate in expected_cost_per_hour(fleet, NODE, t, key).items():
            total[name] += rate * STEP / 3600
        t += STEP
    return dict(total)


def test_cost_by_cluster_matches_each_clusters_ground_truth(
    history: tuple[FlaskClient, float, float],
) -> None:
    client, start, end = history
    window_start, window_end = inner_window(start, end)
    got = report(client, window_start, window_end, "cluster")
    assert set(got) == set(CLUSTERS)
    for cluster, seed in CLUSTERS.items():
        want = sum(_truth(_fleet(seed), window_start, window_end, lambda p: "all").values())
        assert got[cluster] == pytest.approx(want, rel=0.005), cluster


def test_cost_by_namespace_adds_the_clusters_up(history: tuple[FlaskClient, float, float]) -> None:
    client, start, end = history
    window_start, window_end = inner_window(start, end)
    got = report(client, window_start, window_end, "namespace")
    want: dict[str, float] = defaultdict(float)
    for seed in CLUSTERS.values():
        for name, dollars in _truth(
            _fleet(seed), window_start, window_end, lambda p: p.namespace
        ).items():
            want[name] += dollars
    assert set(got) == set(want)
    for name, dollars in want.items():
        assert got[name] == pytest.approx(dollars, rel=0.005), name
