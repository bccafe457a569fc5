"""`make demo` end to end: the demo script with ``--once`` on free ports.

It starts one simulated exporter per node of the example fleet and a real Prometheus, waits
until every target is up and data is queryable, prints the summary and stops everything.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from exporter.simulator import load_fleet

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "scripts" / "demo.py"
FLEET = REPO_ROOT / "examples" / "fleet.yaml"
#: An error in a log: the Python services' ` ERROR `/` CRITICAL ` level (their format is
#: `%(asctime)s %(levelname)s %(name)s: ...`), a traceback, or Prometheus' `level=error`.
BAD_LOG_LINE = re.compile(
    r" (ERROR|CRITICAL) |^Traceback |^\s+File \"|level=(error|fatal|crit)", re.MULTILINE
)


def bad_log_lines(logdir: Path) -> dict[str, list[str]]:
    """The error lines of each log in `logdir` (the demo writes one per process)."""
    found: dict[str, list[str]] = {}
    for path in sorted(logdir.glob("*.log")):
        lines = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if BAD_LOG_LINE.search(line)
        ]
        if lines:
            found[path.name] = lines[:20]
    return found


def _node_names() -> list[str]:
    return list(load_fleet(FLEET).nodes)


def _run_demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.usefixtures("promtool")  # fails with the install hint when Prometheus is missing
def test_demo_once_starts_fleet_and_prometheus_then_stops(
    tmp_path: Path, free_port_block: Callable[[int], int]
) -> None:
    nodes = _node_names()
    base = free_port_block(len(nodes) + 2)
    prometheus_port = base + len(nodes)
    analytics_port = prometheus_port + 1

    result = _run_demo(
        "--once",
        "--history-days",
        "1",
        "--analytics-port",
        str(analytics_port),
        "--prometheus-port",
        str(prometheus_port),
        "--exporter-base-port",
        str(base),
        "--scrape-interval",
        "1s",
        "--workdir",
        str(tmp_path / "demo"),
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"http://127.0.0.1:{prometheus_port}" in result.stdout
    for i, node in enumerate(nodes):
        assert node in result.stdout
        assert f"http://127.0.0.1:{base + i}/metrics" in result.stdout
    assert "demo stopped" in result.stdout
    # The analytics service answered a cost analysis over the backfilled day.
    assert f"http://127.0.0.1:{analytics_port}/api/v1" in result.stdout
    cost_lines = [line for line in result.stdout.splitlines() if "by namespace:" in line]
    assert cost_lines and "training $" in cost_lines[0], result.stdout
    # The GPU rules and alerts are loaded, and the summary says where the dashboards are.
    assert "gpu-alerts.yml" in result.stdout and "gpu-recording.yml" in result.stdout
    assert str(REPO_ROOT / "dashboards") in result.stdout
    assert "gpu-overview.json" in result.stdout
    config = yaml.safe_load((tmp_path / "demo" / "prometheus" / "prometheus.yml").read_text())
    assert str(REPO_ROOT / "rules" / "*.yml") in config["rule_files"]
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"127.0.0.1:{base + i}" for i in range(len(nodes))]
    # The gate: no process of the run (exporters, Prometheus, analytics) logged an error or a
    # traceback, start to shutdown.
    logdir = tmp_path / "demo" / "logs"
    logs = {path.name for path in logdir.glob("*.log")}
    assert {"prometheus.log", "analytics.log"} <= logs, logs
    assert {f"exporter-{node}.log" for node in nodes} <= logs, logs
    assert bad_log_lines(logdir) == {}
    assert not BAD_LOG_LINE.search(output), output
    # Everything it started has stopped: the ports are free again.
    for port in [prometheus_port, analytics_port, *range(base, base + len(nodes))]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_demo_names_the_port_that_is_taken(
    tmp_path: Path, free_port_block: Callable[[int], int]
) -> None:
    base = free_port_block(len(_node_names()) + 2)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", base))
        squatter.listen()

        result = _run_demo(
            "--once",
            "--prometheus-port",
            str(base + len(_node_names())),
            "--analytics-port",
            str(base + len(_node_names()) + 1),
            "--exporter-base-port",
            str(base),
            "--workdir",
            str(tmp_path / "demo"),
            timeout=60,
        )

    assert result.returncode != 0
    assert f"port {base} (exporter for node {_node_names()[0]})" in result.stderr
    assert "already in use" in result.stderr
