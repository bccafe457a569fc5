"""Exporter under a wedged NVML call for a full minute: scrape latency with four concurrent
scrapers, and the exporter process's threads and open file descriptors over about a thousand
hung collection cycles (issue 8).

The real `gpu-exporter` process runs the benchmark's 8 x H100 MIG node with GPU 0's power
reading wedged for the whole run and GPU 1's temperature reading wedging for 2 s in every 5 s
(so its worker is abandoned and comes back over and over). Two phases, each a fresh process:
- scrape latency: `--collection-interval 1s`, four threads scraping as fast as they can for
  60 s, each scrape on a fresh connection;
- hung cycles: `--collection-interval 50ms --nvml-timeout 20ms` until 1,000 cycles were seen
  (one scraper reads the last-collection timestamp every 10 ms); the exporter's threads and
  open descriptors are sampled along the way.

    .venv/bin/python -m bench.exporter_hang            # about 3 minutes
    .venv/bin/python -m bench.exporter_hang --seconds 10 --cycles 200
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.common import BENCH_DIR, FLEETS
from bench.exporter_scrape import (
    concurrent_scrapes,
    free_port,
    percentile,
    scrape,
    start_ours,
    wait_for,
)

RESULTS = BENCH_DIR / "results" / "exporter_hang.json"
INTERVAL = "50ms"  # of the hung-cycles phase
_LAST_COLLECTION = re.compile(
    rb"^gpu_exporter_last_collection_timestamp_seconds\{[^}]*\} (\S+)$", re.M
)


def wedged_fleet(directory: Path, seconds: float) -> tuple[Path, str]:
    path, node = FLEETS["h100-mig"]
    data = yaml.safe_load(path.read_text())
    horizon = seconds + 120
    faults: list[dict[str, Any]] = [
        {"gpu": 0, "kind": "hang", "function": "nvmlDeviceGetPowerUsage", "at": 0, "until": horizon}
    ]
    faults += [
        {"gpu": 1, "kind": "hang", "function": "nvmlDeviceGetTemperature", "at": t, "until": t + 2}
        for t in range(5, int(horizon), 5)
    ]
    for entry in data["nodes"]:
        if entry["name"] == node:
            entry["faults"] = faults
    target = directory / "h100-mig-wedged.yaml"
    target.write_text(yaml.safe_dump(data))
    return target, node


def _stamp(body: bytes) -> bytes | None:
    found = _LAST_COLLECTION.search(body)
    return found.group(1) if found else None


def scrape_latency(fleet: Path, node: str, seconds: float, scrapers: int) -> dict[str, Any]:
    """Phase 1: four scrapers for `seconds` while the calls hang, at the 1 s interval."""
    port = free_port()
    exporter = start_ours(fleet, node, port, "--collection-interval", "1s")
    try:
        wait_for(port, exporter)
        time.sleep(2.0)  # every worker exists; GPU 0's is wedged
        timings, errors = concurrent_scrapes(port, scrapers, seconds)
        _, body = scrape(port)
    finally:
        exporter.terminate()
        exporter.wait(10)
    return {
        "seconds": seconds,
        "scrapers": scrapers,
        "collection_interval": "1s",
        "scrapes": len(timings),
        "errors": errors,
        "scrape_ms_median": statistics.median(timings) * 1000,
        "scrape_ms_p99": percentile(timings, 0.99) * 1000,
        "scrape_ms_max": max(timings) * 1000,
        "hung_gpu_reported_down": bool(
            re.search(r'gpu_up\{[^}]*gpu="0"[^}]*\} 0\.0', body.decode())
        ),
    }


def hung_cycles(fleet: Path, node: str, cycles: int) -> dict[str, Any]:
    """Phase 2: collect every 50 ms until `cycles` cycles were seen; threads and descriptors."""
    port = free_port()
    exporter = start_ours(
        fleet, node, port, "--collection-interval", INTERVAL, "--nvml-timeout", "20ms"
    )
    try:
        wait_for(port, exporter)
        time.sleep(2.0)
        process = psutil.Process(exporter.pid)
        threads_start, fds_start = process.num_threads(), process.num_fds()
        stamps: set[bytes] = set()
        samples: list[tuple[int, int]] = []
        began = time.monotonic()
        while len(stamps) < cycles and time.monotonic() - began < 600:
            stamp = _stamp(scrape(port)[1])
            if stamp is not None:
                stamps.add(stamp)
            if len(stamps) % 50 == 0:
                samples.append((process.num_threads(), process.num_fds()))
            time.sleep(0.01)
        elapsed = time.monotonic() - began
        time.sleep(0.5)  # the last scrape's connection closed
        threads_end, fds_end = process.num_threads(), process.num_fds()
    finally:
        exporter.terminate()
        exporter.wait(10)
    return {
        "collection_interval": INTERVAL,
        "cycles_seen": len(stamps),
        "seconds": elapsed,
        "threads_start": threads_start,
        "threads_max": max(t for t, _ in samples),
        "threads_end": threads_end,
        "fds_start": fds_start,
        "fds_max": max(f for _, f in samples),
        "fds_end": fds_end,
    }


def run(seconds: float, scrapers: int, cycles: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        fleet, node = wedged_fleet(Path(directory), max(seconds, cycles * 0.1))
        return {
            "scrape": scrape_latency(fleet, node, seconds, scrapers),
            "cycles": hung_cycles(fleet, node, cycles),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scrapers", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=1000)
    args = parser.parse_args()
    result = run(args.seconds, args.scrapers, args.cycles)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
