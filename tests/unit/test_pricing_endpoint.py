"""The service serves its pricing as recording rules, and refuses to start on a broken file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE = PrometheusConfig(url="http://127.0.0.1:9", timeout_seconds=1, retries=0)


def test_served_rules_equal_the_committed_rule_file(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The generated header names the pricing file as given: the same relative path as make rules.
    monkeypatch.chdir(REPO)
    config = Config(prometheus=UNREACHABLE, pricing_file=Path("examples/pricing.yaml"))
    response = create_app(config).test_client().get("/api/v1/gpu/cost/pricing-rules")
    assert response.status_code == 200
    data = response.get_json()["data"]
    assert data["interval"] == "1m"
    assert data["rules"] == (REPO / "rules" / "pricing.yml").read_text()


def test_without_a_pricing_file_the_rules_are_not_found() -> None:
    response = (
        create_app(Config(prometheus=UNREACHABLE))
        .test_client()
        .get("/api/v1/gpu/cost/pricing-rules")
    )
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "RESOURCE_NOT_FOUND"


def test_a_broken_pricing_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    pricing = tmp_path / "pricing.yaml"
    pricing.write_text('currency: USD\nmodels:\n  "NVIDIA H100 80GB HBM3": -3\n')
    config = tmp_path / "analytics.yaml"
    config.write_text(f"prometheus:\n  url: http://127.0.0.1:9\npricing_file: {pricing}\n")
    result = subprocess.run(
        [sys.executable, "-m", "analytics.main", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(pricing) in lines[0] and "negative" in lines[0]
