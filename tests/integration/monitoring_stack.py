"""Helpers for the monitoring tests: rule variants, a static scrape target, the analytics
service as a process, a real Alertmanager and a webhook receiver, all on loopback.

Rule variants come from the same generators as the committed files, with overrides (short
intervals, short `for`), so the tests run what the values produce, only faster.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from analytics.pricing import parse_pricing, render_rules
from monitoring import rules as monitoring_rules
from monitoring.values import load_values
from tests.conftest import REPO_ROOT, free_port

EXAMPLE_PRICING = REPO_ROOT / "examples" / "pricing.yaml"


def rule_variant(
    directory: Path,
    overrides: Mapping[str, Any],
    pricing_interval: str,
    drop_models: tuple[str, ...] = (),
) -> list[Path]:
    """The pricing rules and the GPU rules, generated with `overrides` into `directory`.

    `drop_models` leaves GPU models out of the example pricing, so some devices are unpriced.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pricing_data = yaml.safe_load(EXAMPLE_PRICING.read_text())
    for model in drop_models:
        pricing_data["models"].pop(model)
        for override in pricing_data.get("node_overrides", []):
            override.get("prices", {}).pop(model, None)
    pricing = parse_pricing(pricing_data, str(EXAMPLE_PRICING))
    pricing_file = directory / "pricing.yml"
    pricing_file.write_text(render_rules(pricing, interval=pricing_interval))
    values = load_values(overrides=overrides)
    return [pricing_file, *monitoring_rules.write(values, directory)]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        body = self.server.body().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        payload = json.loads(self.rfile.read(length) or b"{}")
        self.server.received(self.path, payload)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        port: int,
        body: Callable[[], str] = str,
        received: Callable[[str, Any], None] = lambda path, payload: None,
    ) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.body = body
        self.received = received


@contextlib.contextmanager
def serve(server: _Server) -> Iterator[str]:
    """Run an HTTP server in a thread; yield its address."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def static_target(text: str) -> Iterator[str]:
    """A scrape target serving fixed exposition text (a stand-in for kube-state-metrics)."""
    with serve(_Server(free_port(), body=lambda: text)) as address:
        yield address


@dataclass
class Notification:
    """One webhook call from Alertmanager."""

    path: str
    payload: dict[str, Any]

    @property
    def receiver(self) -> str:
        return str(self.payload["receiver"])


@dataclass
class WebhookReceiver:
    """Collects Alertmanager's webhook calls; tests wait for the one they expect."""

    url: str = ""
    notifications: list[Notification] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def received(self, path: str, payload: Any) -> None:
        with self._cond:
            self.notifications.append(Notification(path, payload))
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[Notification, dict[str, Any]], bool], timeout: float
    ) -> tuple[Notification, dict[str, Any]]:
        """The first (notification, alert) that satisfies `predicate`; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for note in self.notifications:
                    for alert in note.payload.get("alerts", []):
                        if predicate(note, alert):
                            return note, alert
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [
                        (n.receiver, a["status"], a["labels"].get("alertname"))
                        for n in self.notifications
                        for a in n.payload.get("alerts", [])
                    ]
                    raise AssertionError(f"no matching notification in {timeout} s; got {seen}")
                self._cond.wait(min(left, 0.5))


@contextlib.contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """An HTTP endpoint on loopback that records every webhook call."""
    receiver = WebhookReceiver()
    with serve(_Server(free_port(), received=receiver.received)) as address:
        receiver.url = f"http://{address}"
        yield receiver


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    pytest.fail(f"{url} did not answer in {timeout:.0f} s:\n{tail}", pytrace=False)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def alertmanager(config: Mapping[str, Any], workdir: Path) -> Iterator[str]:
    """A real Alertmanager (prometheus-alertmanager) on loopback, clustering off; yield its
    address."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.fail("prometheus-alertmanager not found: run `make test`", pytrace=False)
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    port = free_port()
    log = workdir / "alertmanager.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/-/ready", process, log, 30)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)


@contextlib.contextmanager
def analytics_service(prometheus_url: str, port: int, workdir: Path) -> Iterator[str]:
    """`gpu-analytics` as a process over `prometheus_url`, refreshing every second."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "analytics.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "prometheus": {"url": prometheus_url, "retries": 0},
                "pricing_file": str(EXAMPLE_PRICING),
                "listen": f"127.0.0.1:{port}",
                "refresh_seconds": 1,
            }
        )
    )
    log = workdir / "analytics.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "analytics.main", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", process, log, 30)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)
