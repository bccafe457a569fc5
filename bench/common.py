"""Shared set-up for the benchmarks: a simulated node opened exactly as `gpu-exporter` opens it."""

from __future__ import annotations

import time
from pathlib import Path

from exporter.collection import Exporter
from exporter.collectors import OPTIONAL_COLLECTORS, Collector
from exporter.main import build_collectors
from exporter.nvml import Gpu, Nvml
from exporter.simulator import install, load_fleet

BENCH_DIR = Path(__file__).resolve().parent
FLEETS = {
    "h100-mig": (BENCH_DIR / "fleets" / "h100-mig-node.yaml", "h100-mig"),
    "a100": (BENCH_DIR / "fleets" / "a100-node.yaml", "a100"),
}


def open_simulated_node(
    fleet_path: str | Path, node: str
) -> tuple[Nvml, list[Gpu], list[Collector]]:
    """NVML opened on the simulated node, its GPUs enumerated, every collector ready."""
    install(load_fleet(fleet_path), node)
    nvml = Nvml(node)
    nvml.init()
    gpus = nvml.enumerate_gpus()
    system = nvml.system_info()
    collectors = build_collectors(OPTIONAL_COLLECTORS, time.time)
    for collector in collectors:
        collector.on_enumerate(nvml, gpus, system)
    return nvml, gpus, collectors


def simulated_exporter(fleet_path: str | Path, node: str, interval: float = 1.0) -> Exporter:
    """Our exporter on the simulated node, NVML started, no HTTP server."""
    install(load_fleet(fleet_path), node)
    exporter = Exporter(
        Nvml(node),
        build_collectors(OPTIONAL_COLLECTORS, time.time),
        interval=interval,
        nvml_timeout=1.0,
    )
    exporter.start_nvml()
    return exporter
