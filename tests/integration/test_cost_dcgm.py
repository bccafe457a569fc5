"""The same cost reports from dcgm-exporter's series: the fleet's history shaped as
dcgm-exporter publishes it (DCGM_FI_* names, UUID/modelName/Hostname/GPU_I_* labels, pods on
the device series, teams from kube_pod_labels), the pricing rules generated for `source: dcgm`,
held to the same ground truth as our exporter's within 0.5%. Also with honorLabels false,
where the pod labels arrive as exported_* and the exporter's own pod must not be billed."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from analytics.pricing import load_pricing, render_rules
from exporter.simulator import load_fleet
from exporter.simulator.history import backfill
from tests.ground_truth import PRICING, expected_gpu_equivalents
from tests.integration.test_cost_end_to_end import (
    NODE,
    STEP,
    assert_efficiency_matches_ground_truth,
    assert_matches_ground_truth,
)
from tests.unit.exporter_harness import FLEETS

HOURS = 4


@pytest.fixture(scope="module", params=["dcgm", "dcgm-exported"])
def dcgm_history(
    request: pytest.FixtureRequest,
    module_prometheus: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FlaskClient, float, float]]:
    shape = request.param
    config = Config(source="dcgm", honor_labels=shape == "dcgm")
    rules = tmp_path_factory.mktemp("rules") / "pricing-dcgm.yml"
    rules.write_text(render_rules(load_pricing(PRICING), inputs=config.rule_inputs()))
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
        rule_files=[rules],
        shape=shape,
        target_labels=lambda node: {"job": "dcgm-exporter", "instance": f"{node}:9400"},
    )
    server = module_prometheus(data_dir=data)
    config = Config(
        prometheus=PrometheusConfig(url=server.url, timeout_seconds=10, retries=0),
        source="dcgm",
        honor_labels=shape == "dcgm",
    )
    now = dt.datetime.fromtimestamp(end + 3600, tz=dt.UTC)
    yield create_app(config, clock=lambda: now).test_client(), start, end


@pytest.mark.parametrize("aggregate", ["namespace", "team"])
def test_dcgm_cost_report_matches_ground_truth(
    dcgm_history: tuple[FlaskClient, float, float], aggregate: str
) -> None:
    # Whole GPU, MIG slices keyed by parent UUID and GPU instance, the A100 shared by three
    # pods (one copy of its series per pod), teams from kube_pod_labels; not the exporter pod.
    assert_matches_ground_truth(*dcgm_history, aggregate)


def test_dcgm_gpu_hours_match_ground_truth(dcgm_history: tuple[FlaskClient, float, float]) -> None:
    assert_matches_ground_truth(
        *dcgm_history, "namespace", field="gpuHours", per_hour=expected_gpu_equivalents
    )


def test_dcgm_efficiency_matches_ground_truth(
    dcgm_history: tuple[FlaskClient, float, float],
) -> None:
    """The fixture carries the exporter's activity as DCGM_FI_PROF_GR_ENGINE_ACTIVE, so the
    efficiency is the same busy-over-held ratio as from our exporter's series."""
    assert_efficiency_matches_ground_truth(*dcgm_history)


def test_usage_split_is_refused_for_dcgm_at_start_up(tmp_path: Path) -> None:
    pricing = tmp_path / "pricing.yaml"
    pricing.write_text(PRICING.read_text() + "\nshared_gpu_split: usage\n")
    config = Config(source="dcgm", pricing_file=pricing)
    with pytest.raises(ValueError, match=r"shared_gpu_split: usage .* dcgm source .* use even"):
        create_app(config)
