"""Shared set-up for the benchmarks: a simulated node opened exactly as `gpu-exporter` opens it.

The simulated driver runs in the benchmark's process (it is what libnvidia-ml would be); the
node's kubelet, API server and /proc run in a separate process, as they do on a real node, so
their CPU is not counted as the exporter's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.attribution import Attribution
from exporter.collection import Exporter
from exporter.collectors import OPTIONAL_COLLECTORS, Collector
from exporter.main import build_collectors
from exporter.nvml import Gpu, Nvml
from exporter.podresources import PodResourcesClient
from exporter.pods import PodInformer, api_client_for_url
from exporter.procfs import ProcfsReader
from exporter.simulator import install, load_fleet

BENCH_DIR = Path(__file__).resolve().parent
FLEETS = {
    "h100-mig": (BENCH_DIR / "fleets" / "h100-mig-node.yaml", "h100-mig"),
    "a100": (BENCH_DIR / "fleets" / "a100-node.yaml", "a100"),
    "h100-mig-pods": (BENCH_DIR / "fleets" / "h100-mig-pods.yaml", "h100-mig-pods"),
}


@contextmanager
def node_services(fleet_path: Path, node: str) -> Iterator[Attribution]:
    """The node's kubelet, API server and /proc in their own process, and an attribution
    reading them the way the exporter does (pod label `team` allowlisted)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter.simulator.node",
            "--fleet",
            str(fleet_path),
            "--node",
            node,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    endpoints = json.loads(process.stdout.readline())
    informer = PodInformer(api_client_for_url(endpoints["apiserver_url"]), node)
    informer.start()
    informer.wait_synced(timeout=10)
    attribution = Attribution(
        pod_resources=PodResourcesClient(endpoints["kubelet_socket"]),
        informer=informer,
        procfs=ProcfsReader(endpoints["procfs_root"]),
        pod_labels=("team",),
    )
    try:
        yield attribution
    finally:
        informer.stop()
        process.terminate()
        process.wait(10)


def open_simulated_node(
    fleet_path: Path, node: str, attribution: Attribution
) -> tuple[Nvml, list[Gpu], list[Collector]]:
    """NVML opened on the simulated node, its GPUs enumerated, every collector ready."""
    install(load_fleet(fleet_path), node)
    nvml = Nvml(node)
    nvml.init()
    gpus = nvml.enumerate_gpus()
    system = nvml.system_info()
    collectors = build_collectors(OPTIONAL_COLLECTORS, time.time, attribution)
    for collector in collectors:
        collector.on_enumerate(nvml, gpus, system)
    return nvml, gpus, collectors


def simulated_exporter(
    fleet_path: Path, node: str, attribution: Attribution, interval: float = 1.0
) -> Exporter:
    """Our exporter on the simulated node, NVML started, no HTTP server."""
    install(load_fleet(fleet_path), node)
    exporter = Exporter(
        Nvml(node),
        build_collectors(OPTIONAL_COLLECTORS, time.time, attribution),
        interval=interval,
        nvml_timeout=1.0,
        attribution=attribution,
    )
    exporter.start_nvml()
    return exporter
