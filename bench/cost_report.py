"""Cost-report benchmark: a 30-day report by namespace and team over a large fleet, from the
recorded pricing series, side by side with the naive way on the same Prometheus.

    python -m bench.cost_report                  # 64 nodes x 8 GPUs, 30 days at 5 minutes
    python -m bench.cost_report --days 2 --nodes 8 --runs 3     # a quick look

The fleet's history is backfilled into a real Prometheus: raw series with `promtool tsdb
create-blocks-from openmetrics`, then the generated pricing rules (at the 5-minute resolution)
with `promtool tsdb create-blocks-from rules`. The data directory is kept (`--data-dir`) and
reused when its manifest matches, because the backfill takes much longer than the queries.

- **ours**: the service's `/api/v1/gpu/cost/report?window=30d&aggregate=namespace` and
  `aggregate=team` (Flask test client, the real Prometheus behind it): a few `sum_over_time`
  queries over the recorded series.
- **naive**: what one would write without the rules: range-query the raw device series
  (`gpu_info`, `gpu_mig_info`, `gpu_allocation_info`) at the 5-minute step (split so no query
  exceeds 11,000 points per series), price each sample in pandas, split shared devices evenly,
  sum by namespace and team.

Both must agree within 0.5% (checked), so the ratio compares two right answers. Runs are
interleaved and the median of each is reported; figures go to bench/results/cost_report.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests
import yaml

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from analytics.pricing import Pricing, load_pricing, render_rules
from bench.common import BENCH_DIR
from exporter.simulator import load_fleet
from exporter.simulator.history import backfill, backfill_rules

REPO = BENCH_DIR.parent
PRICING = REPO / "examples" / "pricing.yaml"
RESULTS = BENCH_DIR / "results" / "cost_report.json"
STEP = 300.0
MAX_POINTS = 11_000
NAMESPACES = 16
TEAMS = 8


def fleet_spec(nodes: int, seed: int = 7) -> dict[str, Any]:
    """A mixed fleet of `nodes` nodes x 8 GPUs: whole H100s, H100s carved into 1g.10gb MIG
    instances, A100s with time-sliced GPUs, L4s partly unallocated; pods in 16 namespaces and
    8 teams, some of them coming and going (churn)."""
    out: list[dict[str, Any]] = []
    pod_number = 0

    def pod(node: int, devices: list[Any], churn: bool = False) -> dict[str, Any]:
        nonlocal pod_number
        pod_number += 1
        namespace = f"ns-{pod_number % NAMESPACES:02d}"
        spec: dict[str, Any] = {
            "name": f"job-{node:02d}-{pod_number:04d}",
            "namespace": namespace,
            "labels": {"team": f"team-{pod_number % TEAMS}", "app": "bench"},
            "containers": [
                {"name": "main", "devices": devices, "processes": [{"command": "python3"}]}
            ],
        }
        if churn:
            spec["present"] = {"every": "1d", "for": "16h", "offset": f"{pod_number % 24}h"}
        return spec

    for index in range(nodes):
        kind = index % 4
        pods: list[dict[str, Any]] = []
        if kind == 0:
            gpus = [{"model": "H100-80GB-HBM3", "count": 8, "workload": "training"}]
            pods = [pod(index, [g, g + 1]) for g in range(0, 8, 2)]
        elif kind == 1:
            gpus = [
                {
                    "model": "H100-80GB-HBM3",
                    "count": 2,
                    "mig": "7x1g.10gb",
                    "workload": "inference",
                },
                {"model": "H100-80GB-HBM3", "count": 6, "workload": "batch"},
            ]
            # MIG GPU instance ids of a 7x1g.10gb layout are 7..13.
            pods = [
                pod(index, [{"gpu": g, "gi": gi}], churn=gi % 3 == 0)
                for g in (0, 1)
                for gi in range(7, 14)
            ]
            pods += [pod(index, [g], churn=g % 2 == 0) for g in range(2, 8)]
        elif kind == 2:
            gpus = [
                {"model": "A100-SXM4-80GB", "count": 6, "workload": "training"},
                {"model": "A100-SXM4-80GB", "count": 2, "time_slicing": 3, "workload": "inference"},
            ]
            pods = [pod(index, [g]) for g in range(6)]
            pods += [pod(index, [{"gpu": g, "replica": r}]) for g in (6, 7) for r in range(3)]
        else:
            gpus = [{"model": "L4", "count": 8, "workload": "batch"}]
            pods = [pod(index, [g], churn=True) for g in range(5)]  # GPUs 5-7 unallocated
        out.append({"name": f"bench-node-{index:02d}", "gpus": gpus, "pods": pods})
    return {"seed": seed, "nodes": out}


# -- Prometheus ------------------------------------------------------------------------------


@contextmanager
def prometheus(data_dir: Path, port: int = 19390) -> Iterator[str]:
    """A real Prometheus on the backfilled data, without scrape targets or rules."""
    with tempfile.TemporaryDirectory(prefix="bench-prom-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1m}\n")
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={data_dir}",
                "--storage.tsdb.retention.time=10y",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"prometheus exited with {process.returncode}")
                time.sleep(0.5)
            else:
                raise RuntimeError("prometheus did not become ready")
            yield url
        finally:
            process.terminate()
            process.wait(timeout=60)


def build_history(data_dir: Path, nodes: int, days: float, end: float) -> dict[str, Any]:
    """Backfill the fleet (raw series and recorded rules) into `data_dir`; return timings."""
    rules_text = render_rules(load_pricing(PRICING), interval="5m")
    manifest = {
        "nodes": nodes,
        "days": days,
        "end": end,
        "step": STEP,
        "rules": hashlib.sha256(rules_text.encode()).hexdigest(),
    }
    stamp = data_dir / "bench-manifest.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("manifest") == manifest:
        return dict(json.loads(stamp.read_text())["timings"], reused=True)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        fleet_file = Path(tmp) / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump(fleet_spec(nodes)))
        rules = Path(tmp) / "pricing.yml"
        rules.write_text(rules_text)
        fleet = load_fleet(fleet_file)
        began = time.monotonic()
        backfill(fleet, data_dir, start=end - days * 86400, end=end, step=STEP)
        raw_s = time.monotonic() - began
        began = time.monotonic()
        backfill_rules(data_dir, [rules], start=end - days * 86400, end=end, rules_interval="5m")
        rules_s = time.monotonic() - began
    timings = {"raw_backfill_s": round(raw_s, 1), "rules_backfill_s": round(rules_s, 1)}
    stamp.write_text(json.dumps({"manifest": manifest, "timings": timings}))
    return timings


# -- the two ways ------------------------------------------------------------------------------


def ours(client: Any, aggregate: str, end: float, days: int) -> dict[str, float]:
    """The service's report: allocated cost per key."""
    response = client.get(
        "/api/v1/gpu/cost/report",
        query_string={"window": f"{days}d", "aggregate": aggregate, "end": int(end)},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    rows = response.get_json()["data"]["rows"]
    return {row["key"]: row["cost"] for row in rows if row["kind"] == "allocated"}


def range_query(
    url: str, query: str, start: float, end: float, step: float = STEP
) -> list[dict[str, Any]]:
    """query_range over (start, end] at `step`, split so each part stays under MAX_POINTS."""
    out: list[dict[str, Any]] = []
    span = (MAX_POINTS - 1) * step
    t = start + step
    while t <= end:
        stop = min(end, t + span)
        response = requests.post(
            f"{url}/api/v1/query_range",
            data={"query": query, "start": t, "end": stop, "step": step},
            timeout=600,
        )
        response.raise_for_status()
        out.extend(response.json()["data"]["result"])
        t = stop + step
    return out


def _frame(result: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame:
    rows: list[pd.DataFrame] = []
    for series in result:
        times = np.array([float(v[0]) for v in series["values"]])
        frame = pd.DataFrame({"t": times})
        for name in labels:
            frame[name] = series["metric"].get(name, "")
        rows.append(frame)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["t", *labels])


def naive(url: str, pricing: Pricing, end: float, days: int) -> dict[str, dict[str, float]]:
    """Range-query the raw series, price every sample in pandas, sum by namespace and team."""
    start = end - days * 86400
    # Prometheus 2.x: a range query step sees the last sample within 5 minutes; the raw
    # samples sit on the same 5-minute grid, so each step is exactly one sample.
    gpus = _frame(range_query(url, "gpu_info", start, end), ["uuid", "model"])
    migs = _frame(range_query(url, "gpu_mig_info", start, end), ["uuid", "mig_uuid", "mig_profile"])
    allocs = _frame(
        range_query(url, "gpu_allocation_info", start, end),
        ["uuid", "mig_uuid", "namespace", "pod", "label_team"],
    )
    allocs = allocs.drop_duplicates(["t", "uuid", "mig_uuid", "namespace", "pod"])
    models = gpus.drop_duplicates("uuid").set_index("uuid")["model"]
    allocs["model"] = allocs["uuid"].map(models)
    profiles = migs.drop_duplicates("mig_uuid").set_index("mig_uuid")["mig_profile"]
    allocs["mig_profile"] = allocs["mig_uuid"].map(profiles).fillna("")
    prices = {
        (model, profile): (
            pricing.device_price(model) if not profile else pricing.mig_price(model, profile)
        )
        for model, profile in allocs[["model", "mig_profile"]]
        .drop_duplicates()
        .itertuples(index=False)
    }
    allocs["price"] = [
        prices[key] for key in zip(allocs["model"], allocs["mig_profile"], strict=True)
    ]
    device = np.where(allocs["mig_uuid"] != "", allocs["mig_uuid"], allocs["uuid"])
    allocs["device"] = device
    holders = allocs.groupby(["t", "device"])["pod"].transform("count")
    allocs["dollars"] = allocs["price"] / holders * STEP / 3600
    allocs["team"] = allocs["label_team"].replace("", "(none)")
    return {
        "namespace": allocs.groupby("namespace")["dollars"].sum().to_dict(),
        "team": allocs.groupby("team")["dollars"].sum().to_dict(),
    }


def _agree(a: dict[str, float], b: dict[str, float]) -> float:
    """The largest relative difference between two key -> dollars maps (inf if keys differ)."""
    if set(a) != set(b):
        return math.inf
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-9) for k in b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost_report", description=__doc__)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-bench-cost-tsdb"
    )
    args = parser.parse_args(argv)
    # A fixed end (midnight UTC before now) keeps the data directory reusable for a day.
    end = math.floor(time.time() / 86400) * 86400.0
    timings = build_history(args.data_dir, args.nodes, args.days, end)
    print(f"history: {args.nodes} nodes x 8 GPUs, {args.days} days at 5m: {timings}", flush=True)
    pricing = load_pricing(PRICING)
    with prometheus(args.data_dir) as url:
        config = Config(
            prometheus=PrometheusConfig(url=url, timeout_seconds=600, retries=0),
            rules_interval_seconds=STEP,
        )
        now = dt.datetime.fromtimestamp(end, tz=dt.UTC)
        client = create_app(config, clock=lambda: now).test_client()
        ours_s: list[float] = []
        naive_s: list[float] = []
        answers: dict[str, Any] = {}
        for run in range(args.runs + 1):  # the first round warms both up and is not counted
            began = time.perf_counter()
            mine = {agg: ours(client, agg, end, args.days) for agg in ("namespace", "team")}
            elapsed_ours = time.perf_counter() - began
            began = time.perf_counter()
            theirs = naive(url, pricing, end, args.days)
            elapsed_naive = time.perf_counter() - began
            if run:
                ours_s.append(elapsed_ours)
                naive_s.append(elapsed_naive)
            answers = {"ours": mine, "naive": theirs}
            print(f"run {run}: ours {elapsed_ours:.3f} s, naive {elapsed_naive:.3f} s", flush=True)
    differences = {
        agg: _agree(answers["ours"][agg], answers["naive"][agg]) for agg in ("namespace", "team")
    }
    result = {
        "date": dt.date.today().isoformat(),
        "fleet": {"nodes": args.nodes, "gpus": args.nodes * 8, "days": args.days, "step_s": STEP},
        "history": timings,
        "runs": args.runs,
        "ours_median_s": round(statistics.median(ours_s), 3),
        "naive_median_s": round(statistics.median(naive_s), 3),
        "speedup": round(statistics.median(naive_s) / statistics.median(ours_s), 1),
        "max_relative_difference": differences,
        "namespaces": len(answers["ours"]["namespace"]),
        "teams": len(answers["ours"]["team"]),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if any(d > 0.005 for d in differences.values()):
        print("the two ways disagree by more than 0.5%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
