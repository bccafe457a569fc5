"""Fixtures that run the real parts: the Prometheus binary, promtool and exporter processes.

Nothing here is mocked. A missing binary fails the test with a message saying how to get it,
because a silently skipped integration test is a test that never runs.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLEET = REPO_ROOT / "examples" / "fleet.yaml"

PROMETHEUS_READY_TIMEOUT_S = 30.0
EXPORTER_READY_TIMEOUT_S = 20.0


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: a port in TIME_WAIT is usable, a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int = 1) -> int:
    """The first of ``size`` consecutive TCP ports on 127.0.0.1 that were free a moment ago.

    Ports come from below the kernel's ephemeral range, so the outgoing connections of
    concurrently running tests (which take ephemeral ports) cannot grab them before the
    server we start binds them.
    """
    high = _ephemeral_low() - size
    low = min(20000, high - 1000)
    for _ in range(200):
        base = random.randint(low, high)
        if all(_bindable(port) for port in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports found in {low}-{high + size}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (outside the ephemeral range)."""
    return free_port_block(1)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def _stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate a child process, then kill it if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run `make test`, which installs it", pytrace=False)
    return path


class PrometheusError(RuntimeError):
    """The Prometheus HTTP API answered with an error or an unexpected shape."""


@dataclass
class PrometheusServer:
    """A running Prometheus: its URL, process, working directory and HTTP API helpers."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    session: requests.Session = field(default_factory=requests.Session)

    def _api(self, path: str, params: dict[str, Any] | None = None) -> Any:
        response = self.session.get(f"{self.url}{path}", params=params, timeout=10)
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusError(
                f"GET {path} -> {response.status_code}: {response.text[:500]}"
            ) from exc
        if body.get("status") != "success":
            raise PrometheusError(
                f"GET {path} {params or ''} -> {body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    def query(self, promql: str, time: float | None = None) -> list[dict[str, Any]]:
        """Run an instant query; return the result list (vector elements) or raise."""
        params: dict[str, Any] = {"query": promql}
        if time is not None:
            params["time"] = time
        data = self._api("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(
        self, promql: str, start: float, end: float, step: float | str
    ) -> list[dict[str, Any]]:
        """Run a range query; return the result list (matrix elements) or raise."""
        params = {"query": promql, "start": start, "end": end, "step": step}
        return list(self._api("/api/v1/query_range", params)["result"])

    def targets(self) -> list[dict[str, Any]]:
        """Return the active scrape targets."""
        return list(self._api("/api/v1/targets", {"state": "active"})["activeTargets"])

    def wait_for_targets_up(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least ``n`` targets are up; raise with their last errors if not."""
        deadline = time.monotonic() + timeout
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self._check_alive()
            targets = self.targets()
            if sum(1 for t in targets if t["health"] == "up") >= n:
                return targets
            time.sleep(0.25)
        states = [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in targets]
        raise AssertionError(f"fewer than {n} targets up after {timeout} s: {states}")

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll an instant query until ``predicate(result)`` holds; return that result."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self._check_alive()
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{promql!r} did not satisfy the predicate in {timeout} s: {result}")

    def reload(self) -> None:
        """Ask Prometheus to re-read its configuration and rule files."""
        response = self.session.post(f"{self.url}/-/reload", timeout=10)
        response.raise_for_status()

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {self.process.returncode}:\n{_tail(self.log_path)}"
            )


def prometheus_config(
    targets: Sequence[str],
    scrape_interval: str = "1s",
    rule_files: Sequence[str | Path] = (),
    job: str = "gpu-exporter",
) -> dict[str, Any]:
    """A minimal Prometheus configuration: one static job, optional rule files."""
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]},
        ],
    }
    if rule_files:
        config["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
    return config


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """The ``free_port()`` helper, for tests that need a loopback port."""
    return free_port


@pytest.fixture(name="free_port_block")
def free_port_block_fixture() -> Callable[[int], int]:
    """The ``free_port_block(size)`` helper: the first of ``size`` consecutive free ports."""
    return free_port_block


@pytest.fixture
def promtool() -> str:
    """Path to the real ``promtool`` binary."""
    return _require_binary("promtool")


PrometheusFactory = Callable[..., PrometheusServer]


@contextlib.contextmanager
def prometheus_launcher(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusFactory]:
    """Start real Prometheus servers on demand; stop all of them on exit."""
    binary = _require_binary("prometheus")
    servers: list[PrometheusServer] = []

    def start(
        targets: Sequence[str] = (),
        scrape_interval: str = "1s",
        rule_files: Sequence[str | Path] = (),
        config: dict[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        openmetrics: str | Path | None = None,
        data_dir: str | Path | None = None,
    ) -> PrometheusServer:
        workdir = tmp_path_factory.mktemp("prometheus")
        config_path = workdir / "prometheus.yml"
        storage = workdir / "data" if data_dir is None else Path(data_dir)
        if openmetrics is not None:
            _backfill(Path(openmetrics), storage)
        if config is None:
            config = prometheus_config(targets, scrape_interval, rule_files)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        last_error = ""
        # The port can be taken between free_port() and Prometheus binding it: retry.
        for _attempt in range(3):
            port = free_port()
            log_path = workdir / f"prometheus-{port}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={storage}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--web.enable-lifecycle",
                        "--log.level=warn",
                        *extra_args,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                )
            server = PrometheusServer(
                url=f"http://127.0.0.1:{port}",
                process=process,
                workdir=workdir,
                log_path=log_path,
            )
            servers.append(server)
            if _wait_ready(server):
                return server
            last_error = _tail(log_path)
            _stop(process)
            if "address already in use" not in last_error:
                break
        pytest.fail(f"prometheus did not become ready:\n{last_error}", pytrace=False)

    try:
        yield start
    finally:
        for server in servers:
            _stop(server.process)
            server.session.close()


@pytest.fixture
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """Factory: start the real Prometheus on a free loopback port and wait until ready.

    ``prometheus(targets, scrape_interval="1s", rule_files=(), config=None, extra_args=(),
    openmetrics=None)`` returns a :class:`PrometheusServer`; every server started is stopped
    at teardown. Pass ``config`` (a dict) to replace the generated configuration entirely, and
    ``openmetrics`` (an OpenMetrics file ending in ``# EOF``) to backfill history into the
    TSDB with ``promtool tsdb create-blocks-from openmetrics`` before Prometheus starts.
    Pass ``data_dir`` to serve an existing TSDB directory (e.g. one filled by
    ``exporter.simulator.history.backfill``) instead of a fresh one; add
    ``--storage.tsdb.retention.time`` to ``extra_args`` when its history is longer than 15 days.
    """
    with prometheus_launcher(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def module_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """Like ``prometheus``, but servers live until the end of the test module."""
    with prometheus_launcher(tmp_path_factory) as start:
        yield start


def _backfill(openmetrics: Path, data_dir: Path) -> None:
    """Write TSDB blocks for an OpenMetrics file into ``data_dir``; fail with promtool's output."""
    data_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            _require_binary("promtool"),
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            str(openmetrics),
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"promtool could not backfill {openmetrics}:\n{result.stdout}{result.stderr}",
            pytrace=False,
        )


def _wait_ready(server: PrometheusServer) -> bool:
    deadline = time.monotonic() + PROMETHEUS_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        with contextlib.suppress(requests.RequestException):
            if server.session.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                return True
        time.sleep(0.1)
    return False


@dataclass
class ExporterProcess:
    """A running ``gpu-exporter`` on a simulated node."""

    node: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def metrics_text(self) -> str:
        """Fetch ``/metrics`` once and return the exposition text."""
        response = requests.get(f"{self.url}/metrics", timeout=10)
        response.raise_for_status()
        return response.text

    def log(self) -> str:
        return _tail(self.log_path, lines=200)


ExporterFactory = Callable[..., ExporterProcess]


def exporter_command(
    fleet: str | Path, node: str, port: int, extra_args: Sequence[str] = ()
) -> list[str]:
    """The command line of one simulated exporter, runnable from any virtualenv."""
    return [
        sys.executable,
        "-m",
        "exporter.main",
        "--simulate",
        str(fleet),
        "--node",
        node,
        "--web.listen-address",
        f"127.0.0.1:{port}",
        *extra_args,
    ]


@contextlib.contextmanager
def exporter_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterFactory]:
    """Start simulated exporters on demand; terminate all of them on exit."""
    started: list[ExporterProcess] = []
    logdir = tmp_path_factory.mktemp("exporters")

    def start(
        node: str, fleet: str | Path = EXAMPLE_FLEET, extra_args: Sequence[str] = ()
    ) -> ExporterProcess:
        last_output = ""
        for _attempt in range(3):
            port = free_port()
            log_path = logdir / f"{node}-{port}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    exporter_command(fleet, node, port, extra_args),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO_ROOT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            exporter = ExporterProcess(node=node, port=port, process=process, log_path=log_path)
            started.append(exporter)
            if _wait_healthy(exporter):
                return exporter
            _stop(process)
            last_output = exporter.log()
            if "address already in use" not in last_output.lower():
                break
        pytest.fail(
            f"gpu-exporter for node {node!r} did not become healthy within "
            f"{EXPORTER_READY_TIMEOUT_S:.0f} s (exit code {started[-1].process.returncode}):\n"
            f"{last_output}",
            pytrace=False,
        )

    try:
        yield start
    finally:
        for exporter in started:
            _stop(exporter.process)


@pytest.fixture
def exporter_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterFactory]:
    """Factory: start ``gpu-exporter --simulate FLEET --node NODE`` and wait for ``/healthz``.

    ``exporter_process(node, fleet=examples/fleet.yaml, extra_args=())`` returns an
    :class:`ExporterProcess`; all are terminated at teardown. If the process dies or
    ``/healthz`` is not 200 within 20 s, the test fails with the exporter's output.
    """
    with exporter_launcher(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def module_exporter_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ExporterFactory]:
    """Like ``exporter_process``, but exporters live until the end of the test module."""
    with exporter_launcher(tmp_path_factory) as start:
        yield start


def _wait_healthy(exporter: ExporterProcess) -> bool:
    deadline = time.monotonic() + EXPORTER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if exporter.process.poll() is not None:
            return False
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{exporter.url}/healthz", timeout=2).status_code == 200:
                return True
        time.sleep(0.1)
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration as ``integration``."""
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)
