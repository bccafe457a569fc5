"""A real Prometheus holding a few hours of a simulated fleet's history, for API-wide tests.

The idle fleet (``tests/fleets/idle.yaml``) has three namespaces and three teams on one node:
a training pod on GPU 0, two inference pods of one team on two MIG instances of GPU 1, three
notebooks (one without a team label) time-slicing GPU 2, a forgotten pod on GPU 3, and GPU 4
unallocated. Its exporter series and the pricing rules' recorded series are backfilled with
promtool, so every endpoint has something to say.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analytics.config import Config
from analytics.pricing import load_pricing, render_rules
from exporter.simulator import load_fleet
from exporter.simulator.fleet import Fleet
from exporter.simulator.history import backfill
from tests.conftest import PrometheusServer
from tests.ground_truth import PRICING, REPO

FLEET = REPO / "tests" / "fleets" / "idle.yaml"
NODE = "idle-node"
STEP = 60.0


@dataclass(frozen=True)
class FleetHistory:
    """The running Prometheus, the fleet and the history's end (the apps' clock)."""

    server: PrometheusServer
    fleet: Fleet
    start: float
    end: float

    def pods(self) -> dict[str, tuple[str, str | None]]:
        """pod -> (namespace, team) of every pod of the fleet."""
        return {
            pod.name: (pod.namespace, pod.labels.get("team")) for pod in self.fleet.nodes[NODE].pods
        }

    def devices(self) -> dict[str, set[str]]:
        """pod -> the device uuids (GPU and MIG instance) it holds."""
        node = self.fleet.nodes[NODE]
        out: dict[str, set[str]] = {}
        for pod in node.pods:
            held: set[str] = set()
            for container in pod.containers:
                for claim in container.devices:
                    gpu = node.gpus[claim.gpu]
                    held.add(gpu.uuid)
                    if claim.gpu_instance is not None:
                        instance = gpu.instance(claim.gpu_instance)
                        if instance is not None:
                            held.add(instance.uuid)
            out[pod.name] = held
        return out


def start_fleet_history(
    module_prometheus: Callable[..., Any], tmp: Path, hours: float = 6.0
) -> FleetHistory:
    """Backfill ``hours`` of the idle fleet (ending 30 minutes ago) with the pricing rules."""
    config = Config()
    rules = tmp / "pricing.yml"
    rules.write_text(render_rules(load_pricing(PRICING), inputs=config.rule_inputs()))
    end = math.floor(time.time() / STEP) * STEP - 1800.0
    start = end - hours * 3600.0
    data = tmp / "tsdb"
    fleet = load_fleet(FLEET)
    backfill(fleet, data, start=start, end=end, step=STEP, rule_files=[rules])
    server = module_prometheus(data_dir=data)
    return FleetHistory(server, fleet, start, end)
