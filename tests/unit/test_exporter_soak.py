"""A soak: 24 simulated hours of pods, processes, XIDs and a lost GPU in 480 cycles, with
every cycle compared to ground truth: no stale series, flat memory, bounded threads and
descriptors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml

from exporter.simulator.pods import allocations_at, processes_at
from tests.unit.exporter_harness import FLEETS, fleet_document, one, running_attributed_node, select

STEP = 180.0  # simulated seconds per cycle (pods live 12 min in 20, processes 4 in 6)
CYCLES = int(24 * 3600 / STEP)  # 480 cycles: one simulated day
WARM = CYCLES // 4  # memory is compared from here (caches and pools filled by then)
NODE = "churn-node"
LOST_FROM, LOST_UNTIL = 6 * 3600, 8 * 3600


def soak_fleet(directory: Path) -> Path:
    """The churn fleet, plus an XID every hour on GPU 0 and GPU 2 lost for two hours."""
    document = fleet_document(FLEETS / "churn.yaml")
    document["nodes"][0]["faults"] = [
        *({"gpu": 0, "kind": "xid", "xid": 13, "at": hour * 3600 + 60} for hour in range(24)),
        {"gpu": 2, "kind": "lost", "at": LOST_FROM, "until": LOST_UNTIL},
    ]
    path = directory / "soak.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_simulated_day_leaves_no_stale_series_and_flat_resources(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    process = psutil.Process()
    rss: dict[int, int] = {}
    threads: dict[int, int] = {}
    fds: dict[int, int] = {}
    # The fake API server keeps 500 watch events, minutes of this node's churn, as a real
    # one's watch cache does (its default 10,000 would grow in this process all day long
    # and be counted as the exporter's memory).
    with running_attributed_node(soak_fleet(tmp_path), NODE, apiserver_history=500) as node:
        fleet = node.driver.fleet
        start = node.clock.now()
        changes = 0
        previous: set[str] = set()
        for cycle in range(1, CYCLES + 1):
            series = node.cycle(advance=STEP)
            now = node.clock.now()
            truth = {str(p.pid): p.pod for p in processes_at(fleet, NODE, now)}
            lost = LOST_FROM <= now - start < LOST_UNTIL
            if lost:  # a lost GPU publishes nothing of its processes
                truth = {pid: pod for pid, pod in truth.items() if not on_gpu(fleet, now, pid, 2)}
            published = {dict(k)["pid"]: dict(k)["pod"] for k in select(series, "gpu_process_info")}
            assert published == truth, f"cycle {cycle}: processes differ from ground truth"
            holders = {a.pod for a in allocations_at(fleet, NODE, now)}
            allocated = {dict(k)["pod"] for k in select(series, "gpu_allocation_info")}
            assert allocated == holders, f"cycle {cycle}: allocations differ from ground truth"
            assert one(series, "gpu_up", gpu="2") == (0 if lost else 1)
            changes += len(set(truth) ^ previous)
            previous = set(truth)
            if cycle in (WARM, CYCLES):
                rss[cycle] = process.memory_info().rss
                threads[cycle] = threading.active_count()
                fds[cycle] = process.num_fds()
        wait_errors = select(
            series, "gpu_exporter_nvml_errors_total", function="nvmlEventSetWait_v2"
        )
    assert changes > 500, "the fleet did not churn enough to prove anything"
    assert sum(select(series, "gpu_xid_errors_total", gpu="0").values()) == 24
    assert not wait_errors
    growth = rss[CYCLES] / rss[WARM] - 1
    record_property("rss_mib", f"{rss[WARM] / 2**20:.1f} -> {rss[CYCLES] / 2**20:.1f}")
    record_property("rss_growth", f"{growth:+.2%}")
    record_property("changes", changes)
    assert growth < 0.05, f"RSS grew {growth:.1%} from hour 6 to hour 24"
    # Bounded, not equal: the test process also holds the simulated kubelet's and API
    # server's threads and sockets, and pytest's.
    assert threads[CYCLES] <= threads[WARM] + 2, threads
    assert fds[CYCLES] <= fds[WARM] + 2, fds


def on_gpu(fleet: object, now: float, pid: str, gpu: int) -> bool:
    return any(
        str(p.pid) == pid and p.gpu == gpu
        for p in processes_at(fleet, NODE, now)  # type: ignore[arg-type]
    )
