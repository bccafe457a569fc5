"""The baseline the exporter is measured against: how most Python GPU exporters are written.

Module-level `Gauge`s, set in a loop from NVML, and `generate_latest` over the registry on every
scrape (prometheus_client's own HTTP server). It reads the very same NVML values through the
same collectors, so both sides publish the same series; only the publishing differs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from exporter.catalogue import MetricSpec
from exporter.collectors import Collector
from exporter.nvml import Gpu, Nvml

REGISTRY = CollectorRegistry()
#: One module-level Gauge per metric, created with the labels it is first published with
#: (the catalogue's, plus any allowlisted pod labels).
GAUGES: dict[str, Gauge] = {}


def gauge(spec: MetricSpec) -> Gauge:
    if spec.name not in GAUGES:
        GAUGES[spec.name] = Gauge(spec.name, spec.help, spec.labels, registry=REGISTRY)
    return GAUGES[spec.name]


def read_and_set(nvml: Nvml, gpus: list[Gpu], collectors: list[Collector]) -> None:
    """One loop iteration: read every GPU and set a gauge per sample."""
    for gpu in gpus:
        for collector in collectors:
            for spec, labels, value in collector.read_gpu(nvml, gpu):
                gauge(spec).labels(*labels).set(value)
    for collector in collectors:
        for spec, labels, value in collector.read_node(nvml, gpus):
            gauge(spec).labels(*labels).set(value)


def main() -> None:
    from bench.common import node_services, open_simulated_node

    parser = argparse.ArgumentParser()
    parser.add_argument("--simulate", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    with node_services(Path(args.simulate), args.node) as attribution:
        nvml, gpus, collectors = open_simulated_node(Path(args.simulate), args.node, attribution)
        read_and_set(nvml, gpus, collectors)
        start_http_server(args.port, addr="127.0.0.1", registry=REGISTRY)
        while True:
            time.sleep(args.interval)
            read_and_set(nvml, gpus, collectors)


if __name__ == "__main__":
    main()
