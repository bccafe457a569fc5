"""API load benchmark: wrk against the served analytics app on loopback, cost analysis endpoint.

    apt-get install -y wrk prometheus        # Debian packages (wrk is not needed by the tests)
    python -m bench.api_load                   # 50 connections, 60 s, cached and uncached
    python -m bench.api_load --duration 10 --modes cached      # a quick look

A simulated fleet's history (tests/fleets/idle.yaml: 5 GPUs, 7 pods, MIG and time-slicing,
`--hours` of it, default 24) is backfilled with its pricing rules into a real Prometheus; the
real `gpu-analytics` console script (waitress, 8 threads) serves it with a bearer token; wrk
(`--connections`, default 50, 2 threads) requests `/api/v1/gpu/cost/analysis` for `--duration`
seconds. Two modes: `cached` (the default configuration: identical requests share one result
for 30 s) and `uncached` (`limits.cache_ttl_seconds: 0`: only requests in flight together share
one computation). Rate limits are turned off (`limits.requests_per_minute: 0`,
`token_requests_per_minute: 0`): one wrk client would otherwise be answered 429 past 5,000
requests a minute, which is the limiter working, not the service failing.

A wrk Lua script counts responses by status; the service's own
`gpu_analytics_http_requests_total` is read afterwards as a second count of 5xx. Figures go to
bench/results/api_load.json; the run fails (exit 1) on any 5xx or socket error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from analytics.config import Config
from analytics.pricing import load_pricing, render_rules
from bench.common import BENCH_DIR
from exporter.simulator import load_fleet
from exporter.simulator.history import backfill

REPO = BENCH_DIR.parent
FLEET = REPO / "tests" / "fleets" / "idle.yaml"
PRICING = REPO / "examples" / "pricing.yaml"
RESULTS = BENCH_DIR / "results" / "api_load.json"
PATH = "/api/v1/gpu/cost/analysis"
TOKEN = "bench-token-0123456789abcdef"
STEP = 60.0

# Counts responses by status in every wrk thread and prints them, with the latency
# percentiles (microseconds), as one JSON line at the end.
WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for key, count in pairs(thread:get("statuses")) do
      total[key] = (total[key] or 0) + count
    end
  end
  local parts = {}
  for key, count in pairs(total) do
    table.insert(parts, string.format('"%s": %d', key, count))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"statuses": {%s}, "requests": %d, "duration_us": %d, "p50_us": %d, ' ..
    '"p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    table.concat(parts, ", "), summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-2000:]}")


@contextlib.contextmanager
def running(command: list[str], ready_url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        wait_http(ready_url, process, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def build_history(work: Path, hours: float) -> tuple[Path, float]:
    """Backfill ``hours`` of the idle fleet ending half an hour ago; (TSDB dir, end)."""
    rules = work / "pricing.yml"
    rules.write_text(render_rules(load_pricing(PRICING), inputs=Config().rule_inputs()))
    end = math.floor(time.time() / STEP) * STEP - 1800.0
    data = work / "tsdb"
    backfill(
        load_fleet(FLEET), data, start=end - hours * 3600, end=end, step=STEP, rule_files=[rules]
    )
    return data, end


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels`` (regex values)."""
    total = 0.0
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(re.fullmatch(v, found.get(k, "")) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def run_mode(
    mode: str, prometheus_url: str, work: Path, connections: int, duration: int, threads: int
) -> dict[str, Any]:
    """Serve with the mode's configuration and load it with wrk; the figures."""
    config = work / f"analytics-{mode}.yaml"
    tokens = work / "tokens"
    tokens.write_text(f"- {TOKEN}\n")
    ttl = 30 if mode == "cached" else 0
    config.write_text(
        f"prometheus: {{url: '{prometheus_url}', timeout_seconds: 30, retries: 0}}\n"
        f"pricing_file: {PRICING}\n"
        f"api_tokens_file: {tokens}\n"
        "limits: {requests_per_minute: 0, token_requests_per_minute: 0, "
        f"cache_ttl_seconds: {ttl}}}\n"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    script = work / "status.lua"
    script.write_text(WRK_SCRIPT)
    executable = Path(sys.executable).with_name("gpu-analytics")
    command = [str(executable) if executable.exists() else sys.executable, "--config", str(config)]
    if not executable.exists():
        command[1:1] = ["-m", "analytics.main"]
    command += ["--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with running(command, f"{base}/healthz", work / f"gpu-analytics-{mode}.log"):
        warm = requests.get(f"{base}{PATH}", headers=headers, timeout=120)
        if warm.status_code != 200:
            raise RuntimeError(f"warm-up answered {warm.status_code}: {warm.text[:500]}")
        result = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{duration}s",
                "--timeout",
                "30s",
                "--latency",
                "-s",
                str(script),
                "-H",
                f"Authorization: Bearer {TOKEN}",
                f"{base}{PATH}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        metrics = requests.get(f"{base}/metrics", timeout=30).text
    line = next(li for li in result.stdout.splitlines() if li.startswith("WRK_JSON "))
    figures = json.loads(line.removeprefix("WRK_JSON "))
    statuses = {int(k): v for k, v in figures["statuses"].items()}
    server_5xx = metric_sum(
        metrics, "gpu_analytics_http_requests_total", endpoint=PATH, status="5.."
    )
    prometheus_queries = metric_sum(
        metrics, "gpu_analytics_prometheus_request_duration_seconds_count"
    )
    socket_errors = sum(figures["errors"][k] for k in ("connect", "read", "write", "timeout"))
    return {
        "mode": mode,
        "cache_ttl_seconds": ttl,
        "connections": connections,
        "threads": threads,
        "duration_s": round(figures["duration_us"] / 1e6, 2),
        "requests": figures["requests"],
        "requests_per_s": round(figures["requests"] / (figures["duration_us"] / 1e6), 1),
        "p50_ms": figures["p50_us"] / 1000,
        "p90_ms": figures["p90_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "p999_ms": figures["p999_us"] / 1000,
        "max_ms": figures["max_us"] / 1000,
        "statuses": statuses,
        "non_2xx": sum(v for k, v in statuses.items() if not 200 <= k < 300),
        "responses_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "server_counted_5xx": int(server_5xx),
        "socket_errors": socket_errors,
        "prometheus_queries": int(prometheus_queries),
        "wrk_output": result.stdout,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=int, default=60, help="seconds per mode")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--hours", type=float, default=24.0, help="history to backfill")
    parser.add_argument("--modes", default="cached,uncached")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for tool in ("wrk", "prometheus", "promtool"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install -y wrk prometheus", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="api-load-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        data, end = build_history(work, args.hours)
        backfill_s = time.monotonic() - started
        port = free_port()
        prometheus = [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=30d",
            "--log.level=warn",
        ]
        (work / "prometheus.yml").write_text("global: {scrape_interval: 15s}\n")
        url = f"http://127.0.0.1:{port}"
        runs = []
        with running(prometheus, f"{url}/-/ready", work / "prometheus.log"):
            for mode in args.modes.split(","):
                figures = run_mode(mode, url, work, args.connections, args.duration, args.threads)
                runs.append(figures)
                print(
                    f"{mode}: {figures['requests']} requests, {figures['requests_per_s']}/s, "
                    f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
                    f"max {figures['max_ms']:.1f} ms, statuses {figures['statuses']}, "
                    f"5xx {figures['responses_5xx']} (server {figures['server_counted_5xx']}), "
                    f"socket errors {figures['socket_errors']}, "
                    f"Prometheus queries {figures['prometheus_queries']}"
                )
    report = {
        "endpoint": PATH,
        "history_hours": args.hours,
        "backfill_s": round(backfill_s, 1),
        "history_end": end,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[
                0
            ],
        },
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = [
        r["mode"]
        for r in runs
        if r["responses_5xx"] or r["server_counted_5xx"] or r["socket_errors"]
    ]
    if failed:
        print(f"5xx or socket errors in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
