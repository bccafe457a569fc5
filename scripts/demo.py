#!/usr/bin/env python3
"""Run the product on a simulated GPU fleet: one exporter per node and a real Prometheus.

``make demo`` runs this. It starts ``gpu-exporter --simulate`` for every node of
``examples/fleet.yaml``, writes a Prometheus configuration that scrapes them (plus the rules in
``rules/`` when there are any), starts Prometheus, waits until every target is up, prints where
to look and then runs until Ctrl-C or SIGTERM, when it stops everything it started.

``--once`` does the same, checks that a query returns data, prints the summary and exits 0:
the integration tests run the demo end to end that way.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FLEET = REPO_ROOT / "examples" / "fleet.yaml"
DEFAULT_WORKDIR = REPO_ROOT / ".demo"
RULES_DIR = REPO_ROOT / "rules"
DASHBOARDS_DIR = REPO_ROOT / "dashboards"

# Queries the summary suggests; each is shown with the number of series it returns now.
EXAMPLE_QUERIES = [
    ("GPU utilization, per GPU", "gpu_utilization_ratio"),
    ("mean utilization per node", "avg by (node) (gpu_utilization_ratio)"),
    ("memory used, per GPU", "gpu_memory_used_bytes"),
    ("memory used, per MIG instance", "gpu_mig_memory_used_bytes"),
    ("power draw per node, watts", "sum by (node) (gpu_power_watts)"),
    ("free MIG slots per profile", "sum by (mig_profile) (gpu_mig_instances_available)"),
    ("GPUs that are lost or failing", "gpu_up == 0"),
    ("GPU processes with their pods", "gpu_process_info"),
    ("GPU memory per namespace", "sum by (namespace) (gpu_process_memory_used_bytes)"),
    ("devices held per team", "count by (label_team) (gpu_allocation_info)"),
]


class DemoError(Exception):
    """A problem the user can fix; printed without a traceback."""


class Stop(Exception):
    """Raised by the SIGINT and SIGTERM handlers to unwind into the shutdown path."""


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when the demo dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """A process the demo started, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", type=Path, default=DEFAULT_FLEET, help="fleet YAML")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument(
        "--exporter-base-port",
        type=int,
        default=9401,
        help="the first node's exporter listens here, the next node's on the next port, ...",
    )
    parser.add_argument("--scrape-interval", default="15s", help="Prometheus scrape interval")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="where the Prometheus configuration, its data and the logs go",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="start everything, check that targets are up and data queryable, then stop",
    )
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for startup")
    parser.add_argument("--analytics-port", type=int, default=8080, help="gpu-analytics port")
    parser.add_argument(
        "--history-days",
        type=float,
        default=7.0,
        help="days of simulated history backfilled before Prometheus starts (0: none), so "
        "cost reports have data at once",
    )
    return parser.parse_args(argv)


def node_names(fleet: Path) -> list[str]:
    """The node names of a fleet file, in file order."""
    from exporter.simulator import FleetError, load_fleet

    try:
        return list(load_fleet(fleet).nodes)  # a dict keyed by node name, in file order
    except FleetError as exc:
        raise DemoError(str(exc)) from None


def is_healthy(url: str) -> bool:
    return http_get(url, timeout=2)[0] == 200


def port_in_use(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:port (or on all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers we start: a port in TIME_WAIT is usable, a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def check_ports(ports: dict[int, str]) -> None:
    taken = [f"port {port} ({what})" for port, what in ports.items() if port_in_use(port)]
    if taken:
        raise DemoError(
            "already in use: "
            + ", ".join(taken)
            + ". Stop whatever listens there, or choose other ports with "
            "--prometheus-port / --exporter-base-port."
        )


def exporter_command(fleet: Path, node: str, port: int) -> list[str]:
    """``gpu-exporter`` from the running virtualenv, or the module when it is not installed."""
    script = Path(sys.executable).parent / "gpu-exporter"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "exporter.main"]
    listen = f"127.0.0.1:{port}"
    return [
        *base,
        "--simulate",
        str(fleet),
        "--node",
        node,
        "--web.listen-address",
        listen,
        "--pod-labels",
        "team,app",
    ]


def prometheus_config(
    targets: Sequence[str], scrape_interval: str, analytics: str | None = None
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [
            {"job_name": "gpu-exporter", "static_configs": [{"targets": list(targets)}]},
        ],
    }
    if analytics is not None:
        # The analytics service's own metrics (gpu_analytics_*), for dashboards and alerts.
        config["scrape_configs"].append(
            {"job_name": "gpu-analytics", "static_configs": [{"targets": [analytics]}]}
        )
    rule_globs = [
        str(RULES_DIR / pattern) for pattern in ("*.yml", "*.yaml") if any(RULES_DIR.glob(pattern))
    ]
    if rule_globs:
        config["rule_files"] = rule_globs
    return config


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def prom_api(base: str, path: str, params: dict[str, str] | None = None) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = http_get(f"{base}{path}{query}")
    data = json.loads(body)
    if data.get("status") != "success":
        raise DemoError(f"Prometheus {path} answered {status}: {data.get('error')}")
    return data["data"]


class Demo:
    """Starts, watches and stops the demo's processes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.fleet: Path = args.fleet.resolve()
        self.workdir: Path = args.workdir.resolve()
        self.logdir = self.workdir / "logs"
        self.prom_dir = self.workdir / "prometheus"
        self.prom_url = f"http://127.0.0.1:{args.prometheus_port}"
        self.children: list[Child] = []
        self.exporters: dict[str, int] = {}

    def spawn(self, name: str, command: list[str]) -> Child:
        log_path = self.logdir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Own session: Ctrl-C reaches only the demo, which then stops children in order.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise DemoError(
                    f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
                    f"{child.log_tail()}"
                )

    def wait_until(
        self,
        what: str,
        ready: Callable[[], bool],
        timeout: float,
        detail: Callable[[], str] | None = None,
    ) -> None:
        """Poll ``ready`` until it holds; on timeout say what was awaited and what was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            with contextlib.suppress(OSError, ValueError):
                if ready():
                    return
            time.sleep(0.2)
        seen = ""
        if detail is not None:
            try:
                seen = f"; {detail()}"
            except (OSError, ValueError, DemoError) as exc:
                seen = f"; ({exc})"
        raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}{seen}")

    def start(self) -> None:
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise DemoError("prometheus not found on PATH: run `make demo`, which installs it")
        nodes = node_names(self.fleet)
        self.exporters = {node: self.args.exporter_base_port + i for i, node in enumerate(nodes)}
        ports = {self.args.prometheus_port: "Prometheus", self.args.analytics_port: "analytics"}
        for node, port in self.exporters.items():
            if port in ports:
                raise DemoError(f"port {port} is both {ports[port]} and exporter for {node}")
            ports[port] = f"exporter for node {node}"
        check_ports(ports)

        self.logdir.mkdir(parents=True, exist_ok=True)
        self.prom_dir.mkdir(parents=True, exist_ok=True)
        print(f"fleet {self.fleet}: {len(nodes)} nodes; logs in {self.logdir}", flush=True)
        self.backfill_history()

        for node, port in self.exporters.items():
            self.spawn(f"exporter-{node}", exporter_command(self.fleet, node, port))
        for node, port in self.exporters.items():
            url = f"http://127.0.0.1:{port}/healthz"
            self.wait_until(
                f"the exporter for {node} ({url})",
                functools.partial(is_healthy, url),
                self.args.timeout,
            )
        print(f"{len(nodes)} exporters healthy", flush=True)

        targets = [f"127.0.0.1:{port}" for port in self.exporters.values()]
        config = prometheus_config(
            targets, self.args.scrape_interval, f"127.0.0.1:{self.args.analytics_port}"
        )
        config_path = self.prom_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.spawn(
            "prometheus",
            [
                prometheus,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.args.prometheus_port}",
                "--web.enable-lifecycle",
                # Retention counts back from the newest block: keep all the backfilled days.
                f"--storage.tsdb.retention.time={max(15, int(self.args.history_days) + 8)}d",
            ],
        )
        self.wait_until(
            f"Prometheus ({self.prom_url}/-/ready)",
            functools.partial(is_healthy, f"{self.prom_url}/-/ready"),
            self.args.timeout,
        )
        print(f"Prometheus ready at {self.prom_url}; waiting for the first scrapes", flush=True)
        self.wait_until(
            f"all {len(targets)} targets to be up ({self.prom_url}/targets)",
            lambda: self.targets_up() == len(targets),
            self.args.timeout,
            detail=self.target_errors,
        )

        self.start_analytics()

    def backfill_history(self) -> None:
        """Days of the fleet's history, raw and recorded (the pricing rules), in a fresh TSDB.

        It ends now, with the labels the live scrape adds, so the live series continue it.
        """
        data = self.prom_dir / "data"
        shutil.rmtree(data, ignore_errors=True)
        days = self.args.history_days
        if days <= 0:
            return
        from exporter.simulator import load_fleet
        from exporter.simulator.history import backfill

        step = 300.0
        end = time.time() // step * step
        print(f"backfilling {days:g} days of history (about a minute)", flush=True)
        began = time.monotonic()
        backfill(
            load_fleet(self.fleet),
            data,
            start=end - days * 86400,
            end=end,
            step=step,
            target_labels=lambda node: {
                "job": "gpu-exporter",
                "instance": f"127.0.0.1:{self.exporters[node]}",
            },
            rule_files=sorted(RULES_DIR.glob("*.yml")),
        )
        print(f"history ready in {time.monotonic() - began:.0f} s", flush=True)

    def start_analytics(self) -> None:
        """gpu-analytics over this Prometheus, priced by examples/pricing.yaml."""
        config = {
            "prometheus": {"url": self.prom_url},
            "pricing_file": str(REPO_ROOT / "examples" / "pricing.yaml"),
            "listen": f"127.0.0.1:{self.args.analytics_port}",
        }
        config_path = self.workdir / "analytics.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        script = Path(sys.executable).parent / "gpu-analytics"
        base = [str(script)] if script.exists() else [sys.executable, "-m", "analytics.main"]
        self.spawn("analytics", [*base, "--config", str(config_path)])
        self.wait_until(
            f"the analytics service ({self.analytics_url}/healthz)",
            functools.partial(is_healthy, f"{self.analytics_url}/healthz"),
            self.args.timeout,
        )

    @property
    def analytics_url(self) -> str:
        return f"http://127.0.0.1:{self.args.analytics_port}"

    def cost_analysis(self) -> dict[str, Any]:
        """The 7-day cost analysis, as a user would fetch it."""
        status, body = http_get(f"{self.analytics_url}/api/v1/gpu/cost/analysis?days=7", 30)
        if status != 200:
            raise DemoError(f"cost analysis answered {status}: {body[:300]!r}")
        data: dict[str, Any] = json.loads(body)["data"]
        return data

    def targets_up(self) -> int:
        active = prom_api(self.prom_url, "/api/v1/targets", {"state": "active"})["activeTargets"]
        return sum(1 for target in active if target["health"] == "up")

    def target_errors(self) -> str:
        active = prom_api(self.prom_url, "/api/v1/targets", {"state": "active"})["activeTargets"]
        return "; ".join(
            f"{t['scrapeUrl']} is {t['health']} {t.get('lastError', '')}".strip() for t in active
        )

    def series_count(self, promql: str) -> int:
        return len(prom_api(self.prom_url, "/api/v1/query", {"query": promql})["result"])

    def nodes_reporting(self) -> set[str]:
        result = prom_api(self.prom_url, "/api/v1/query", {"query": "count by (node) (gpu_up)"})
        return {sample["metric"].get("node", "") for sample in result["result"]}

    def verify(self) -> None:
        """Check that the data arrived: Prometheus has gpu_up series from every node, and with
        history the analytics reports a cost for the last 7 days."""
        self.wait_until(
            "gpu_up series from every node",
            lambda: self.nodes_reporting() == set(self.exporters),
            self.args.timeout,
            detail=lambda: f"no gpu_up from {sorted(set(self.exporters) - self.nodes_reporting())}",
        )
        if self.args.history_days > 0 and not self.cost_analysis().get("totalCost"):
            raise DemoError("the 7-day cost analysis is empty despite the backfilled history")

    def summary(self) -> str:
        graph = f"{self.prom_url}/graph?g0.tab=0&g0.expr="
        lines = [
            "",
            "GPU monitor demo: simulated fleet, exporters and Prometheus are running.",
            "",
            f"  Prometheus        {self.prom_url}",
            f"  scrape targets    {self.prom_url}/targets",
            "",
            "  Exporters (metrics and health):",
        ]
        for node, port in self.exporters.items():
            lines.append(f"    {node:<16} http://127.0.0.1:{port}/metrics   /healthz")
        lines += ["", "  Example PromQL (series now):"]
        for title, promql in EXAMPLE_QUERIES:
            try:
                count = str(self.series_count(promql))
            except (DemoError, OSError, ValueError):
                count = "?"
            lines.append(f"    {promql:<58} {count:>4}   {title}")
        lines += [
            "",
            f"  Open one as a graph: {graph}{urllib.parse.quote('gpu_utilization_ratio')}",
            "",
            f"  Analytics API     {self.analytics_url}/api/v1   (OpenAPI: /api/v1/openapi.json)",
        ]
        lines += self.cost_summary()
        lines += self.monitoring_summary()
        lines += ["", f"  Logs and Prometheus data: {self.workdir}", ""]
        return "\n".join(lines)

    def monitoring_summary(self) -> list[str]:
        """Where the rules, alerts and Grafana dashboards are."""
        rule_files = ", ".join(p.name for p in sorted(RULES_DIR.glob("*.yml")))
        try:
            firing = str(self.series_count('ALERTS{alertstate="firing"}'))
        except (DemoError, OSError, ValueError):
            firing = "?"
        lines = [
            "",
            f"  Rules and alerts  {RULES_DIR}: {rule_files}",
            f"                    alerts firing now: {firing} ({self.prom_url}/alerts); "
            "what to do: docs/runbook.md",
            f"  Grafana dashboards (import the JSON files; see README): {DASHBOARDS_DIR}",
        ]
        for path in sorted(DASHBOARDS_DIR.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                lines.append(f"    {path.name:<22} {json.loads(path.read_text())['title']}")
        return lines

    def cost_summary(self) -> list[str]:
        try:
            analysis = self.cost_analysis()
        except (DemoError, OSError, ValueError) as exc:
            return [f"  (cost analysis not available yet: {exc})"]

        def money(value: Any) -> str:
            return "n/a" if value is None else f"${value:,.2f}"

        lines = [
            "",
            f"  GPU cost, last 7 days ({self.analytics_url}/api/v1/gpu/cost/analysis?days=7):",
            f"    per day {money(analysis['dailyCost'])}, projected per month "
            f"{money(analysis['monthlyCost'])}, unallocated capacity "
            f"{money((analysis.get('idleCost') or {}).get('unallocated'))}",
        ]
        for title, field in (("by namespace", "costByNamespace"), ("by team", "costByTeam")):
            parts = [f"{name} {money(value)}" for name, value in analysis[field].items()]
            lines.append(f"    {title}: " + ", ".join(parts))
        lines.append(
            f"    CSV by team: {self.analytics_url}/api/v1/gpu/cost/report"
            "?window=7d&aggregate=team&format=csv"
        )
        return lines

    def run_forever(self) -> None:
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            self.check_children()
            time.sleep(1)

    def stop(self) -> None:
        """Stop Prometheus first, then the exporters; kill what does not exit in 10 s."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + 10
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{child.name} did not exit in 10 s; killing it", file=sys.stderr)
                child.process.kill()
                child.process.wait()


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    demo = Demo(args)
    # Both stop the demo, even where SIGINT arrives ignored (started in the background).
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    code = 0
    try:
        demo.start()
        if args.once:
            demo.verify()
        print(demo.summary(), flush=True)
        if not args.once:
            demo.run_forever()
    except Stop:
        print("\nstopping", flush=True)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # Ignore a second Ctrl-C / SIGTERM while children are being stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.stop()
    if code == 0 and demo.children:
        print("demo stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
