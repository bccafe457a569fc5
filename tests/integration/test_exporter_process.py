"""The exporter as an operator runs it: a real process, its exit codes and its shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

FLEET_PATH = Path(__file__).resolve().parents[1] / "fleets" / "integration.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_exporter(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.main", *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_exits_cleanly_within_seconds_of_a_stop_signal(
    exporter_process: Callable[..., Any], sig: signal.Signals
) -> None:
    exporter = exporter_process("mig-node", fleet=FLEET_PATH)
    assert requests.get(f"{exporter.url}/metrics", timeout=10).status_code == 200

    started = time.monotonic()
    exporter.process.send_signal(sig)
    code = exporter.process.wait(timeout=10)

    assert code == 0, exporter.log()
    assert time.monotonic() - started < 5
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{exporter.url}/healthz", timeout=2)


def test_unknown_node_is_refused_with_the_fleets_node_names() -> None:
    result = run_exporter("--simulate", str(FLEET_PATH), "--node", "no-such-node")
    assert result.returncode == 2
    assert "no-such-node" in result.stderr
    assert "mig-node" in result.stderr
    assert "mixed-node" in result.stderr


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = run_exporter(
            "--simulate",
            str(FLEET_PATH),
            "--node",
            "mig-node",
            "--web.listen-address",
            f"127.0.0.1:{port}",
        )
    assert result.returncode != 0
    assert str(port) in result.stderr
