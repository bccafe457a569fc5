"""The service publishes its results as metrics: cost per hour by namespace and team now."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig


def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = client.get("/metrics").get_data(as_text=True)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_cost_per_hour_by_namespace_and_team_is_exported(
    prometheus: Callable[..., Any], tmp_path: Path
) -> None:
    now = int(time.time())
    lines = ["# TYPE namespace:gpu_cost_dollars_per_hour:sum gauge"]
    lines += [
        f'namespace:gpu_cost_dollars_per_hour:sum{{namespace="{ns}"}} {v} {now - age}'
        for ns, v in (("ml", 7.0), ("research", 1.75))
        for age in (120, 60)
    ]
    lines += ["# TYPE team:gpu_cost_dollars_per_hour:sum gauge"]
    lines += [f'team:gpu_cost_dollars_per_hour:sum{{team="vision"}} 8.75 {now - 60}', "# EOF"]
    history = tmp_path / "recorded.om"
    history.write_text("\n".join(lines) + "\n")
    server = prometheus(openmetrics=history)
    config = Config(
        prometheus=PrometheusConfig(url=server.url, timeout_seconds=5, retries=0),
        refresh_seconds=0.2,
    )
    client = create_app(config).test_client()
    deadline = time.monotonic() + 10
    while True:
        metrics = scrape(client)
        if ("gpu_analytics_cost_refresh_success", ()) in metrics:
            break
        assert time.monotonic() < deadline, "no refresh within 10 s"
        time.sleep(0.1)
    assert metrics[("gpu_analytics_cost_refresh_success", ())] == 1
    name = "gpu_analytics_namespace_cost_dollars_per_hour"
    assert metrics[(name, (("namespace", "ml"),))] == 7.0
    assert metrics[(name, (("namespace", "research"),))] == 1.75
    team = ("gpu_analytics_team_cost_dollars_per_hour", (("team", "vision"),))
    assert metrics[team] == 8.75


def test_with_prometheus_unreachable_no_cost_is_made_up() -> None:
    config = Config(
        prometheus=PrometheusConfig(url="http://127.0.0.1:9", timeout_seconds=1, retries=0),
        refresh_seconds=0.2,
    )
    client = create_app(config).test_client()
    deadline = time.monotonic() + 10
    while ("gpu_analytics_cost_refresh_success", ()) not in (metrics := scrape(client)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert metrics[("gpu_analytics_cost_refresh_success", ())] == 0
    assert not [k for k in metrics if k[0].endswith("_cost_dollars_per_hour")]
