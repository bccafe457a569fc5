"""A real single-node VictoriaMetrics (Debian's `victoria-metrics`) for the scale-out tests, and
the copy of a Prometheus TSDB's raw samples into it.

The copy reads every raw sample (timestamps and values exactly as stored, the recorded pricing
series included) through Prometheus' own query API, as range-vector instant queries
`{__name__="m"}[range]`, and writes them to VictoriaMetrics' JSON-line import API
(`/api/v1/import`). Remote write cannot carry a backfilled history (Prometheus only forwards
what it ingests through its WAL), and this is what `vmctl prometheus` does from a snapshot.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import _require_binary, _stop, _tail, free_port

READY_TIMEOUT_S = 30.0


@dataclass
class VictoriaMetrics:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return _tail(self.log_path, 200)


@contextlib.contextmanager
def victoriametrics(workdir: Path) -> Iterator[VictoriaMetrics]:
    """Start `victoria-metrics` on a loopback port with its storage under ``workdir``.

    Its query cache is off (each query reads the storage, as the comparison needs), the
    retention covers any backfilled history, and `-search.latencyOffset` is 0 so data up to
    the query time is visible (the default hides the last 30 s, meant for live ingestion).
    """
    binary = _require_binary("victoria-metrics")
    last = ""
    for _attempt in range(3):
        port = free_port()
        log_path = workdir / f"victoria-metrics-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"-storageDataPath={workdir / 'vm-data'}",
                    f"-httpListenAddr=127.0.0.1:{port}",
                    "-retentionPeriod=100y",
                    "-search.disableCache",
                    "-search.latencyOffset=0s",
                    "-loggerLevel=WARN",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        server = VictoriaMetrics(f"http://127.0.0.1:{port}", process, log_path)
        if _wait_ready(server):
            try:
                yield server
            finally:
                _stop(process)
            return
        last = server.log()
        _stop(process)
        if "address already in use" not in last:
            break
    pytest.fail(f"victoria-metrics did not become ready:\n{last}", pytrace=False)


def _wait_ready(server: VictoriaMetrics) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                return True
        time.sleep(0.1)
    return False


def copy_prometheus(prometheus_url: str, vm_url: str, start: float, end: float) -> int:
    """Copy every raw sample Prometheus holds in [start, end] into VictoriaMetrics; return the
    number of samples copied. Staleness markers are not copied (the query API never returns
    them): VictoriaMetrics has its own staleness detection."""
    session = requests.Session()
    names = session.get(f"{prometheus_url}/api/v1/label/__name__/values", timeout=30).json()
    assert names["status"] == "success", names
    range_ms = math.ceil((end - start) * 1000) + 1
    copied = 0
    for name in names["data"]:
        body = session.get(
            f"{prometheus_url}/api/v1/query",
            params={"query": f'{{__name__="{name}"}}[{range_ms}ms]', "time": str(end)},
            timeout=120,
        ).json()
        assert body["status"] == "success", body
        lines = []
        for series in body["data"]["result"]:
            values = series["values"]
            lines.append(
                json.dumps(
                    {
                        "metric": series["metric"],
                        "values": [float(v) for _, v in values],
                        "timestamps": [round(float(t) * 1000) for t, _ in values],
                    }
                )
            )
            copied += len(values)
        if lines:
            response = session.post(
                f"{vm_url}/api/v1/import", data="\n".join(lines).encode(), timeout=300
            )
            assert response.status_code in (200, 204), response.text
    # Make what was imported searchable now (it is otherwise flushed within seconds).
    session.get(f"{vm_url}/internal/force_flush", timeout=60).raise_for_status()
    session.close()
    return copied
