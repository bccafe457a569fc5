"""Exporter benchmark: scrape latency, cycle CPU, RSS and hang tolerance, side by side with the
baseline (module-level Gauges set in a loop, `generate_latest` per scrape).

    python -m bench.exporter_scrape            # full run (10,000 cycles per fleet; ~10 min)
    python -m bench.exporter_scrape --quick    # smoke run (fewer cycles and scrapes)

Both sides read the same simulated node through the same NVML calls and publish the same
series; each runs in its own process. Figures are medians over interleaved scrapes, so machine
noise hits both sides alike. Results go to stdout (Markdown) and bench/results/exporter.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import BENCH_DIR, FLEETS

RESULTS = BENCH_DIR / "results" / "exporter.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def concurrent_scrapes(port: int, scrapers: int, seconds: float) -> tuple[list[float], int]:
    """`scrapers` threads scraping as fast as they can for `seconds`: each scrape's latency, and
    how many failed to connect or read."""
    timings: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            try:
                took, _ = scrape(port)
            except OSError:
                with lock:
                    errors += 1
                continue
            with lock:
                timings.append(took)

    threads = [threading.Thread(target=client) for _ in range(scrapers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings, errors


def scrape(port: int) -> tuple[float, bytes]:
    """One scrape on a fresh connection: (seconds until the whole body arrived, body)."""
    began = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    body = connection.getresponse().read()
    connection.close()
    return time.perf_counter() - began, body


def wait_for(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"exporter exited: {process.stderr.read().decode() if process.stderr else ''}"
            )
        try:
            scrape(port)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def start_ours(fleet: Path, node: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "exporter.main",
        "--simulate",
        str(fleet),
        "--node",
        node,
        "--web.listen-address",
        f"127.0.0.1:{port}",
        "--collection-interval",
        "1s",
        "--log-level",
        "error",
        *extra,
    ]
    return subprocess.Popen(command, stderr=subprocess.PIPE)


def start_baseline(fleet: Path, node: str, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "bench.baseline_exporter",
        "--simulate",
        str(fleet),
        "--node",
        node,
        "--port",
        str(port),
    ]
    return subprocess.Popen(command, stderr=subprocess.PIPE)


def series_count(body: bytes, prefix: str = "gpu_") -> int:
    return sum(
        1
        for line in body.decode().splitlines()
        if line.startswith(prefix) and not line.startswith("gpu_exporter_")
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def scrape_latency(fleet_name: str, scrapes: int) -> dict[str, Any]:
    """Interleaved scrapes of both sides on the same node."""
    path, node = FLEETS[fleet_name]
    ours_port, base_port = free_port(), free_port()
    ours = start_ours(path, node, ours_port)
    base = start_baseline(path, node, base_port)
    try:
        wait_for(ours_port, ours)
        wait_for(base_port, base)
        time.sleep(2.5)  # both sides complete two 1 s cycles, so GPM activity is published
        timings: dict[str, list[float]] = {"ours": [], "baseline": []}
        bodies: dict[str, bytes] = {}
        for _ in range(scrapes):
            for side, port in (("ours", ours_port), ("baseline", base_port)):
                seconds, body = scrape(port)
                timings[side].append(seconds)
                bodies[side] = body
    finally:
        for process in (ours, base):
            process.terminate()
            process.wait(10)
    medians = {side: statistics.median(values) * 1000 for side, values in timings.items()}
    return {
        "scrape_ms_median": medians,
        "scrape_ms_p99": {side: percentile(v, 0.99) * 1000 for side, v in timings.items()},
        "ratio_baseline_over_ours": medians["baseline"] / medians["ours"],
        "series": {side: series_count(body) for side, body in bodies.items()},
        "body_bytes": {side: len(body) for side, body in bodies.items()},
    }


def cycle_costs(fleet_name: str, side: str, cycles: int) -> dict[str, Any]:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cycle_worker",
            "--side",
            side,
            "--fleet",
            fleet_name,
            "--cycles",
            str(cycles),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def hung_fleet(fleet_name: str, directory: Path) -> Path:
    """The benchmark fleet with GPU 0's power reading hanging from the start for 10 minutes."""
    path, node = FLEETS[fleet_name]
    data = yaml.safe_load(path.read_text())
    for entry in data["nodes"]:
        if entry["name"] == node:
            entry.setdefault("faults", []).append(
                {
                    "gpu": 0,
                    "kind": "hang",
                    "function": "nvmlDeviceGetPowerUsage",
                    "at": 0,
                    "until": 600,
                }
            )
    target = directory / f"{fleet_name}-hang.yaml"
    target.write_text(yaml.safe_dump(data))
    return target


def hang_latency(fleet_name: str, seconds: float, scrapers: int = 4) -> dict[str, Any]:
    """p99 scrape latency with `scrapers` concurrent clients while one NVML call hangs."""
    _, node = FLEETS[fleet_name]
    with tempfile.TemporaryDirectory() as directory:
        port = free_port()
        ours = start_ours(
            hung_fleet(fleet_name, Path(directory)), node, port, "--nvml-timeout", "500ms"
        )
        try:
            wait_for(port, ours)
            timings, errors = concurrent_scrapes(port, scrapers, seconds)
            _, body = scrape(port)
        finally:
            ours.terminate()
            ours.wait(10)
    hung_gpu_down = any(
        line.startswith("gpu_up{") and 'gpu="0"' in line and line.endswith(" 0.0")
        for line in body.decode().splitlines()
    )
    return {
        "scrapers": scrapers,
        "seconds": seconds,
        "scrapes": len(timings),
        "errors": errors,
        "scrape_ms_median": statistics.median(timings) * 1000,
        "scrape_ms_p99": percentile(timings, 0.99) * 1000,
        "hung_gpu_reported_down": hung_gpu_down,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles and scrapes")
    args = parser.parse_args()
    cycles = 500 if args.quick else 10_000
    baseline_cycles = 200 if args.quick else 1_000
    scrapes = 50 if args.quick else 300
    hang_seconds = 5.0 if args.quick else 30.0

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {sys.platform}, Python {sys.version.split()[0]}",
        "fleets": {},
    }
    for fleet_name in FLEETS:
        print(f"# {fleet_name}", file=sys.stderr)
        report["fleets"][fleet_name] = {
            "scrape": scrape_latency(fleet_name, scrapes),
            "cycle": {
                "ours": cycle_costs(fleet_name, "ours", cycles),
                "baseline": cycle_costs(fleet_name, "baseline", baseline_cycles),
            },
            "hang": hang_latency(fleet_name, hang_seconds),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(render(report))


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Exporter benchmark, {report['date']}, {report['machine']}",
        "",
        "| node | series | scrape median ours / baseline (ms) | ratio | cycle CPU median ours / "
        "baseline (ms) | RSS ours after 1 / N/2 / N cycles (MiB) | p99 scrape, 4 scrapers, "
        "one NVML call hung (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, fleet in report["fleets"].items():
        scrape_result, cycle, hang = fleet["scrape"], fleet["cycle"], fleet["hang"]
        rss = " / ".join(f"{v:.1f}" for v in cycle["ours"]["rss_mib"].values())
        lines.append(
            f"| {name} | {scrape_result['series']['ours']} / {scrape_result['series']['baseline']} "
            f"| {scrape_result['scrape_ms_median']['ours']:.2f} / "
            f"{scrape_result['scrape_ms_median']['baseline']:.2f} "
            f"| {scrape_result['ratio_baseline_over_ours']:.1f}x "
            f"| {cycle['ours']['cycle_cpu_ms_median']:.1f} / "
            f"{cycle['baseline']['cycle_cpu_ms_median']:.1f} "
            f"| {rss} (N={cycle['ours']['cycles']}) "
            f"| {hang['scrape_ms_p99']:.2f} ({hang['scrapes']} scrapes, {hang['errors']} errors, "
            f"hung GPU down: {hang['hung_gpu_reported_down']}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
