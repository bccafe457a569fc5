"""Runs the real exporter over the simulated driver, in-process, on a manual clock."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.attribution import Attribution
from exporter.collection import Exporter
from exporter.collectors import OPTIONAL_COLLECTORS
from exporter.main import build_collectors
from exporter.nvml import Nvml
from exporter.podresources import PodResourcesClient
from exporter.pods import PodInformer, api_client_for_url
from exporter.procfs import ProcfsReader
from exporter.simulator import ManualClock, install, load_fleet, uninstall
from exporter.simulator.apiserver import HISTORY_LIMIT
from exporter.simulator.fleet import parse_fleet
from exporter.simulator.node import SimulatedNodeServices
from exporter.simulator.pods import pods_at

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
    services: SimulatedNodeServices | None = None
    informer: PodInformer | None = None

    def cycle(self, advance: float = 0.0) -> Series:
        """Advance the simulated clock, run one collection cycle, return the parsed output.

        With Kubernetes services, /proc is rewritten for the new time and the cycle waits
        until the informer has seen the pods that exist now (the fake API server pushes
        changes within a few milliseconds), so each cycle is compared with ground truth.
        """
        self.clock.advance(advance)
        if self.services is not None:
            self.services.sync()
            self.wait_for_informer()
        self.exporter.run_cycle()
        return parse(self.exporter.exposition())

    def wait_for_informer(self, timeout: float = 5.0) -> None:
        if self.informer is None or self.services is None:
            return
        want = {p.uid for p in pods_at(self.driver.fleet, self.driver.node.name, self.clock.now())}
        deadline = time.monotonic() + timeout
        while {p.uid for p in self.informer.pods()} != want:
            assert time.monotonic() < deadline, "the informer did not catch up with the pods"
            time.sleep(0.005)


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
def running_attributed_node(
    path: Path,
    node: str,
    *,
    start: float = T0,
    pod_labels: tuple[str, ...] = (),
    process_series_limit: int = 64,
    apiserver_history: int = HISTORY_LIMIT,
) -> Iterator[Node]:
    """The exporter on a simulated node with its fake kubelet, API server and /proc."""
    clock = ManualClock(start)
    driver = install(load_fleet(path), node, clock=clock)
    services = SimulatedNodeServices(
        driver, poll_interval=0.005, apiserver_history=apiserver_history
    )
    services.start(refresh_seconds=3600)  # the test syncs /proc itself, per cycle
    informer = PodInformer(
        api_client_for_url(services.apiserver_url), node, watch_timeout_seconds=3600
    )
    informer.start()
    attribution = Attribution(
        pod_resources=PodResourcesClient(str(services.kubelet_socket)),
        informer=informer,
        procfs=ProcfsReader(services.procfs_root),
        pod_labels=pod_labels,
    )
    exporter = Exporter(
        Nvml(node),
        build_collectors(OPTIONAL_COLLECTORS, clock.now, attribution, process_series_limit),
        interval=1.0,
        nvml_timeout=2.0,
        clock=clock.now,
        attribution=attribution,
    )
    try:
        exporter.start_nvml()
        handle = Node(exporter, driver, clock, services, informer)
        handle.wait_for_informer()
        yield handle
    finally:
        informer.stop()
        exporter.close()
        services.stop()
        uninstall()


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
