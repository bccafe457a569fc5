"""Driver and GPU faults on the wall clock: the exporter keeps serving, the healthy GPUs keep
reporting, and NVML answers again within two collection intervals of the fault ending.

Each test runs the real collection loop (`Exporter.run_forever`) on its own thread against the
simulated driver, whose faults are scheduled in wall-clock seconds after it is installed, and
watches the served exposition every few milliseconds, as a scraper would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from exporter.collection import Exporter
from exporter.collectors import OPTIONAL_COLLECTORS
from exporter.main import build_collectors
from exporter.simulator import WallClock, install, uninstall
from exporter.simulator.fleet import parse_fleet
from tests.unit.exporter_harness import Series, fleet_document, parse, select

INTERVAL = 0.2  # seconds between collection cycles
FAULT_AT, FAULT_UNTIL = 0.8, 1.6  # seconds after the driver is installed
ALL_GPUS = {"0", "1", "2", "3", "4"}


@dataclass
class Live:
    exporter: Exporter
    driver: Any
    origin: float  # time.time() the fault schedule counts from

    def series(self) -> Series:
        return parse(self.exporter.exposition())


@contextmanager
def live_node(faults: list[dict[str, Any]]) -> Iterator[Live]:
    """The collection loop running every INTERVAL on a node with these scheduled faults."""
    document = fleet_document()
    document["nodes"][0]["faults"] = faults
    clock = WallClock()
    origin = clock.now()
    driver = install(parse_fleet(document, "exporter-unit.yaml"), "unit-node", clock=clock)
    driver.fault_origin = origin
    exporter = Exporter(
        driver_nvml("unit-node"),
        build_collectors(OPTIONAL_COLLECTORS, clock.now),
        interval=INTERVAL,
        nvml_timeout=0.5,
        clock=clock.now,
    )
    exporter.start_nvml()
    exporter.run_cycle()  # as gpu-exporter does before it serves
    loop = threading.Thread(target=exporter.run_forever, name="collection", daemon=True)
    loop.start()
    try:
        yield Live(exporter, driver, origin)
    finally:
        exporter.stop()
        loop.join(timeout=5)
        driver.release_hangs()
        exporter.close()
        assert not loop.is_alive()
        uninstall()


def driver_nvml(node: str) -> Any:
    from exporter.nvml import Nvml

    return Nvml(node)


def up_gpus(series: Series) -> set[str]:
    return {dict(k)["gpu"] for k, v in select(series, "gpu_up").items() if v == 1}


def watch(live: Live, until: float) -> list[tuple[float, Series]]:
    """(seconds after the fault origin, parsed exposition) every 5 ms until `until`."""
    seen: list[tuple[float, Series]] = []
    while (now := time.time() - live.origin) < until:
        seen.append((now, live.series()))
        time.sleep(0.005)
    return seen


def recovery_delay(seen: list[tuple[float, Series]], ok: Any) -> float:
    """Seconds from the fault's end until `ok(series)` held for good."""
    last_bad = max((t for t, s in seen if not ok(s)), default=FAULT_UNTIL)
    return max(0.0, last_bad - FAULT_UNTIL)


@pytest.mark.parametrize("kind", ["driver_not_loaded", "version_mismatch"])
def test_the_driver_going_away_is_survived_and_nvml_reopened_within_two_intervals(
    kind: str,
) -> None:
    with live_node([{"kind": kind, "at": FAULT_AT, "until": FAULT_UNTIL}]) as live:
        seen = watch(live, FAULT_UNTIL + 1.0)
        final = live.series()
    during = [s for t, s in seen if FAULT_AT + 2 * INTERVAL < t < FAULT_UNTIL]
    assert during, "no scrape fell inside the fault"
    for series in during:  # served throughout, NVML reported down, no made-up readings
        assert select(series, "gpu_exporter_nvml_up") == {frozenset({("node", "unit-node")}): 0}
        assert not up_gpus(series)
        assert not select(series, "gpu_temperature_celsius")
    delay = recovery_delay(
        seen, lambda s: up_gpus(s) == ALL_GPUS and select(s, "gpu_exporter_nvml_up")
    )
    assert delay <= 2 * INTERVAL, f"NVML back {delay:.3f} s after the driver"
    assert up_gpus(final) == ALL_GPUS
    assert len(select(final, "gpu_temperature_celsius")) == 5
    assert live.driver._refcount == 0, "nvmlInit and nvmlShutdown are not balanced"


def test_a_library_that_lost_its_initialisation_is_reopened_within_two_intervals() -> None:
    """NVML_ERROR_UNINITIALIZED from every call (another user shut the library down)."""
    with live_node([{"kind": "uninitialized", "at": FAULT_AT}]) as live:
        seen = watch(live, FAULT_AT + 1.0)
        errors = select(live.series(), "gpu_exporter_nvml_errors_total", kind="driver")
    # NVML is opened again in the very cycle that finds it closed and the cycle read again,
    # so the GPUs may never even show as down; the error count shows the fault happened.
    assert sum(errors.values()) >= 1, "the fault never happened: the test proves nothing"
    bad = [t for t, s in seen if t > FAULT_AT and up_gpus(s) != ALL_GPUS]
    assert max(bad, default=FAULT_AT) - FAULT_AT <= 2 * INTERVAL, "not reopened in time"
    assert up_gpus(seen[-1][1]) == ALL_GPUS
    assert live.driver._refcount == 0


def test_a_lost_gpu_is_down_while_the_others_report_and_back_within_two_intervals() -> None:
    with live_node([{"kind": "lost", "gpu": 2, "at": FAULT_AT, "until": FAULT_UNTIL}]) as live:
        seen = watch(live, FAULT_UNTIL + 1.0)
    during = [s for t, s in seen if FAULT_AT + 2 * INTERVAL < t < FAULT_UNTIL]
    assert during
    for series in during:
        assert up_gpus(series) == ALL_GPUS - {"2"}
        assert not select(series, "gpu_temperature_celsius", gpu="2")
        assert len(select(series, "gpu_temperature_celsius")) == 4
        assert select(series, "gpu_exporter_nvml_up") == {frozenset({("node", "unit-node")}): 1}
    delay = recovery_delay(seen, lambda s: up_gpus(s) == ALL_GPUS)
    assert delay <= 2 * INTERVAL, f"GPU 2 back {delay:.3f} s after the fault"


def test_a_gpu_lost_at_start_up_is_reported_down_then_enumerated_when_it_answers() -> None:
    with live_node([{"kind": "lost", "gpu": 2, "at": 0, "until": FAULT_UNTIL}]) as live:
        seen = watch(live, FAULT_UNTIL + 1.0)
        final = live.series()
    early = [s for t, s in seen if t < FAULT_UNTIL - 0.1]
    assert early
    for series in early:
        placeholder = select(series, "gpu_up", gpu="2")
        assert list(placeholder.values()) == [0]
        assert dict(next(iter(placeholder)))["uuid"] == ""
        assert up_gpus(series) == ALL_GPUS - {"2"}
    delay = recovery_delay(seen, lambda s: up_gpus(s) == ALL_GPUS)
    assert delay <= 2 * INTERVAL, f"GPU 2 enumerated {delay:.3f} s after it answered"
    (labels,) = select(final, "gpu_up", gpu="2")
    assert dict(labels)["uuid"].startswith("GPU-")
    assert len(select(final, "gpu_temperature_celsius")) == 5
