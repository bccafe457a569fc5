"""A thousand cycles of pods and processes coming and going: no stale series, flat memory, and
no API-server traffic after the first list and watch."""

from __future__ import annotations

import psutil

from exporter.simulator.pods import allocations_at, processes_at
from tests.unit.exporter_harness import FLEETS, running_attributed_node, select

CYCLES = 1000
STEP = 30.0  # simulated seconds per cycle: 1,000 cycles cover 8 h 20 min of churn


def test_churn_leaves_no_stale_series_and_flat_memory() -> None:
    rss: dict[int, int] = {}
    process = psutil.Process()
    with running_attributed_node(FLEETS / "churn.yaml", "churn-node") as node:
        fleet = node.driver.fleet
        assert node.informer is not None
        requests_after_start = node.informer.requests
        changes = 0
        previous: set[str] = set()
        for cycle in range(1, CYCLES + 1):
            series = node.cycle(advance=STEP)
            now = node.clock.now()
            truth = {str(p.pid): p.pod for p in processes_at(fleet, "churn-node", now)}
            published = {dict(k)["pid"]: dict(k)["pod"] for k in select(series, "gpu_process_info")}
            assert published == truth, f"cycle {cycle}: processes differ from ground truth"
            holders = {a.pod for a in allocations_at(fleet, "churn-node", now)}
            allocated = {dict(k)["pod"] for k in select(series, "gpu_allocation_info")}
            assert allocated == holders, f"cycle {cycle}: allocations differ from ground truth"
            changes += len(set(truth) ^ previous)
            previous = set(truth)
            if cycle in (CYCLES // 2, CYCLES):
                rss[cycle] = process.memory_info().rss
        api_requests = node.informer.requests - requests_after_start
    assert changes > 500, "the fleet did not churn enough to prove anything"
    assert api_requests == 0
    growth = rss[CYCLES] / rss[CYCLES // 2] - 1
    assert growth < 0.05, f"RSS grew {growth:.1%} over the second half"
