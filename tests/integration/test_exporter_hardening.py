"""The real gpu-exporter process under the conditions an operator meets: normal operation with a
clean log (the gate), SIGTERM while an NVML call is wedged, and scrapers hammering it while
a call hangs."""

from __future__ import annotations

import http.client
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_FLEET = REPO_ROOT / "examples" / "fleet.yaml"
SECRET = "hf_secret"  # an argument of a GPU process on gpu-node-h100 in the example fleet
#: A log line at ERROR or CRITICAL level, or a traceback, in the exporter's log format.
BAD_LINE = re.compile(r" (ERROR|CRITICAL) |^Traceback ", re.MULTILINE)


def hung_fleet(directory: Path, node: str, until: float = 600) -> Path:
    """The example fleet with GPU 0's power reading on `node` wedged from the start."""
    data = yaml.safe_load(EXAMPLE_FLEET.read_text())
    for entry in data["nodes"]:
        if entry["name"] == node:
            entry["faults"] = [
                {
                    "gpu": 0,
                    "kind": "hang",
                    "function": "nvmlDeviceGetPowerUsage",
                    "at": 0,
                    "until": until,
                }
            ]
    path = directory / "hung-fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stop(exporter: Any, timeout: float = 10) -> tuple[int, float]:
    """SIGTERM; (exit code, seconds until the process was gone)."""
    began = time.monotonic()
    exporter.process.send_signal(signal.SIGTERM)
    code = exporter.process.wait(timeout=timeout)
    return code, time.monotonic() - began


def test_normal_operation_logs_no_error_and_never_a_process_argument(
    exporter_process: Callable[..., Any],
) -> None:
    """The gate: a clean run of the real process, at debug level, on the demo's fleet."""
    exporter = exporter_process(
        "gpu-node-h100",
        fleet=EXAMPLE_FLEET,
        extra_args=["--collection-interval", "250ms", "--log-level", "debug"],
    )
    bodies = []
    for _ in range(8):
        bodies.append(requests.get(f"{exporter.url}/metrics", timeout=10).text)
        time.sleep(0.25)
    code, seconds = stop(exporter)
    log = exporter.log_path.read_text()
    assert code == 0, log[-3000:]
    assert seconds < 5
    assert not BAD_LINE.search(log), BAD_LINE.search(log)
    assert "serving /metrics" in log and "NVML shut down" in log
    assert 'command="python3"' in bodies[-1]  # the process with the secret is published...
    assert SECRET not in log and all(SECRET not in body for body in bodies)  # ...its args not


def test_sigterm_during_a_wedged_call_shuts_nvml_down_and_exits_within_5_s(
    exporter_process: Callable[..., Any],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    node = "gpu-node-a100"
    exporter = exporter_process(
        node,
        fleet=hung_fleet(tmp_path, node),
        extra_args=["--collection-interval", "500ms", "--nvml-timeout", "200ms"],
    )
    time.sleep(1.0)  # a few cycles with the call wedged
    body = requests.get(f"{exporter.url}/metrics", timeout=10).text
    code, seconds = stop(exporter)
    log = exporter.log_path.read_text()
    assert re.search(r'gpu_up\{[^}]*gpu="0"[^}]*\} 0\.0', body)
    assert code == 0, log[-3000:]
    record_property("exit_s", round(seconds, 2))
    assert seconds < 5, f"exit took {seconds:.2f} s"
    assert "nvmlDeviceGetPowerUsage hung" in log
    assert "NVML shut down" in log
    assert not BAD_LINE.search(log)


SCRAPERS = 4
SCRAPE_SECONDS = 10.0


def test_scrapes_stay_fast_and_threads_bounded_while_a_call_hangs(
    exporter_process: Callable[..., Any],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """p99 under 20 ms with 4 scrapers; the 60 s version is `python -m bench.exporter_hang`."""
    node = "gpu-node-h100"
    exporter = exporter_process(
        node,
        fleet=hung_fleet(tmp_path, node),
        extra_args=["--collection-interval", "1s", "--nvml-timeout", "200ms"],
    )
    process = psutil.Process(exporter.process.pid)
    time.sleep(1.5)  # every worker thread exists, GPU 0's is wedged
    threads_before, fds_before = process.num_threads(), process.num_fds()
    timings: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + SCRAPE_SECONDS

    def scraper() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=10)
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                response.read()
                connection.close()
                ok = response.status == 200
            except OSError:
                ok = False
            took = time.perf_counter() - began
            with lock:
                if ok:
                    timings.append(took)
                else:
                    errors += 1

    threads = [threading.Thread(target=scraper) for _ in range(SCRAPERS)]
    for thread in threads:
        thread.start()
    samples = []
    while any(thread.is_alive() for thread in threads):
        samples.append((process.num_threads(), process.num_fds()))
        time.sleep(0.5)
    for thread in threads:
        thread.join()
    body = requests.get(f"{exporter.url}/metrics", timeout=10).text
    code, _ = stop(exporter)
    timings.sort()
    p99 = timings[int(0.99 * len(timings))]
    record_property("scrapes", len(timings))
    record_property("p99_ms", round(p99 * 1e3, 2))
    record_property("median_ms", round(timings[len(timings) // 2] * 1e3, 2))
    assert errors == 0
    assert len(timings) > 500, f"only {len(timings)} scrapes in {SCRAPE_SECONDS} s"
    assert p99 < 0.020, f"p99 {p99 * 1e3:.1f} ms over {len(timings)} scrapes"
    assert re.search(r'gpu_up\{[^}]*gpu="0"[^}]*\} 0\.0', body)
    # Scrapers' connection threads come and go; what stays is bounded by the scrapers.
    assert max(t for t, _ in samples) <= threads_before + SCRAPERS + 2, (threads_before, samples)
    assert max(f for _, f in samples) <= fds_before + SCRAPERS + 2, (fds_before, samples)
    assert code == 0
