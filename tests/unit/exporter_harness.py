"""Runs the real exporter over the simulated driver, in-process, on a manual clock."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.collection import Exporter
from exporter.collectors import OPTIONAL_COLLECTORS
from exporter.main import build_collectors
from exporter.nvml import Nvml
from exporter.simulator import ManualClock, install, uninstall
from exporter.simulator.fleet import parse_fleet

FLEETS = Path(__file__).resolve().parents[1] / "fleets"
UNIT_FLEET = FLEETS / "exporter-unit.yaml"
#: A fixed instant (a weekday afternoon, UTC) so every run reads the same values.
T0 = 1_767_715_200.0 + 14 * 3600


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Node:
    exporter: Exporter
    driver: Any
    clock: ManualClock

    def cycle(self, advance: float = 0.0) -> Series:
        """Advance the simulated clock, run one collection cycle, return the parsed output."""
        self.clock.advance(advance)
        self.exporter.run_cycle()
        return parse(self.exporter.exposition())


def parse(body: bytes) -> Series:
    series: Series = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return series


def select(series: Series, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples of one metric whose labels include `labels`."""
    wanted = set(labels.items())
    return {key: v for (n, key), v in series.items() if n == name and wanted <= key}


def one(series: Series, name: str, **labels: str) -> float:
    found = select(series, name, **labels)
    assert len(found) == 1, f"expected one {name}{labels}, found {len(found)}"
    return next(iter(found.values()))


def fleet_document(path: Path = UNIT_FLEET) -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(path.read_text()))


@contextmanager
def running_node(
    document: dict[str, Any] | None = None,
    node: str = "unit-node",
    *,
    start: float = T0,
    nvml_timeout: float = 1.0,
    collectors: tuple[str, ...] = OPTIONAL_COLLECTORS,
) -> Iterator[Node]:
    """The exporter started on a simulated node; NVML and the simulator torn down after."""
    fleet = parse_fleet(document or fleet_document(), "exporter-unit.yaml")
    clock = ManualClock(start)
    driver = install(fleet, node, clock=clock)
    exporter = Exporter(
        Nvml(node),
        build_collectors(collectors, clock.now),
        interval=1.0,
        nvml_timeout=nvml_timeout,
        clock=clock.now,
    )
    try:
        exporter.start_nvml()
        yield Node(exporter, driver, clock)
    finally:
        driver.release_hangs()
        exporter.close()
        uninstall()
