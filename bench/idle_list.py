"""Idle-list benchmark: the allocated-but-idle list over 512 GPUs and 7 days, from a real
Prometheus, side by side with the naive way.

    python -m bench.idle_list                       # 64 nodes x 8 GPUs, 7 days at 1 minute
    python -m bench.idle_list --days 2 --nodes 8 --runs 3     # a quick look

The fleet is `bench.cost_report.fleet_spec` with every workload given idle spells of 20 minutes
to 3 hours in half of its 6-hour windows, so many devices have spells worth listing. Its history
is backfilled at a 1-minute step (raw series with `promtool tsdb create-blocks-from
openmetrics`, then the generated pricing rules at 1m), and a Prometheus is run on it once until
its compaction of the overlapping blocks has finished, so no timed run competes with it. The
data directory is kept (`--data-dir`) and reused when its manifest matches.

- **ours**: `analytics.idle.find_idle` over the window (step 5 minutes beyond two days): one
  range query returns only the (pod, device, step) points whose peak activity in the step was
  under the threshold, then memory while idle, prices and the recorded unallocated cost.
- **naive**: what one would write without that query: range-query the raw activity
  (`gpu_utilization_ratio`, `gpu_mig_sm_activity_ratio`) at the samples' 1-minute spacing, so
  every sample is seen, and `gpu_allocation_info` at the 5-minute step; in pandas take each
  device's peak per 5-minute step, join the holders, and find the same spells.

Both must give the same spells (count, and total idle hours within 0.5%; checked). Runs are
interleaved and the median of each is reported, with where ours spends its time (per query, and
the pandas around them); figures go to bench/results/idle_list.json.

- **recorded** (the fix this benchmark measures, not yet in the service): find_idle's two range
  queries at the 1-minute step recorded by a rule every minute (backfilled once into the kept
  history), so a long window reads only the sparse recorded idle points: a step is idle when
  all its minutes were recorded idle. Its spells are compared with ours and reported, not
  required to match exactly (the rule group's evaluation offset shifts step edges by under a
  minute).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests
import yaml

from analytics import idle
from analytics.config import Config
from analytics.pricing import load_pricing, render_rules
from analytics.prometheus import PrometheusClient
from bench.common import BENCH_DIR
from bench.cost_report import PRICING, fleet_spec, prometheus, range_query
from exporter.simulator import load_fleet
from exporter.simulator.history import backfill, backfill_rules

RESULTS = BENCH_DIR / "results" / "idle_list.json"
#: Raw sample spacing and the pricing rules' interval.
SAMPLE_STEP = 60.0
RULES_INTERVAL = "1m"
#: Every workload of the fleet gets these idle spells.
IDLE_WORKLOAD = {"idle_every": "6h", "idle_probability": 0.5, "idle_length": ["20m", "3h"]}
TARGET_S = 2.0
TOLERANCE = 0.005
#: The fix measured here: find_idle's per-minute queries recorded by a rule (see idle_rules).
IDLE_RECORD = "pod:gpu_idle_activity:max1m"
IDLE_MEMORY_RECORD = "device:gpu_idle_memory_bytes:max1m"


def idle_fleet_spec(nodes: int) -> dict[str, Any]:
    """`fleet_spec(nodes)` with idle spells scheduled on every workload."""
    spec = fleet_spec(nodes)
    for node in spec["nodes"]:
        for group in node["gpus"]:
            group["workload"] = {"pattern": group["workload"], **IDLE_WORKLOAD}
    return spec


# -- history -----------------------------------------------------------------------------------


def _overlapping_blocks(data_dir: Path) -> int:
    """How many pairs of neighbouring TSDB blocks in `data_dir` overlap in time."""
    ranges = []
    for meta in data_dir.glob("*/meta.json"):
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue  # a block being written or deleted
        ranges.append((doc["minTime"], doc["maxTime"]))
    ranges.sort()
    return sum(1 for a, b in itertools.pairwise(ranges) if b[0] < a[1])


def settle(data_dir: Path, timeout: float = 3600.0) -> float:
    """Run Prometheus on `data_dir` until it has merged the overlapping (raw and rules) blocks;
    return the seconds it took. Prometheus compacts a minute after start, then block by block."""
    began = time.monotonic()
    with prometheus(data_dir, port=19391):
        time.sleep(75)
        quiet = 0
        while quiet < 3 and time.monotonic() - began < timeout:
            busy = _overlapping_blocks(data_dir) or any(data_dir.glob("*.tmp*"))
            quiet = 0 if busy else quiet + 1
            time.sleep(10)
    return time.monotonic() - began


def build_history(data_dir: Path, nodes: int, days: float, end: float) -> dict[str, Any]:
    """Backfill the fleet (raw series, recorded rules) into `data_dir`, let Prometheus compact
    it, and return the timings; reuse `data_dir` when its manifest matches."""
    rules_text = render_rules(load_pricing(PRICING), interval=RULES_INTERVAL)
    spec = idle_fleet_spec(nodes)
    manifest = {
        "nodes": nodes,
        "days": days,
        "end": end,
        "step": SAMPLE_STEP,
        "fleet": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(),
        "rules": hashlib.sha256(rules_text.encode()).hexdigest(),
    }
    stamp = data_dir / "bench-manifest.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("manifest") == manifest:
        return dict(json.loads(stamp.read_text())["timings"], reused=True)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    start = end - days * 86400
    with tempfile.TemporaryDirectory(prefix="bench-idle-fleet-") as tmp:
        fleet_file = Path(tmp) / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump(spec))
        rules = Path(tmp) / "pricing.yml"
        rules.write_text(rules_text)
        fleet = load_fleet(fleet_file)
        began = time.monotonic()
        backfill(fleet, data_dir, start=start, end=end, step=SAMPLE_STEP)
        raw_s = time.monotonic() - began
        print(f"raw series backfilled in {raw_s:.0f} s", flush=True)
        began = time.monotonic()
        backfill_rules(data_dir, [rules], start=start, end=end, rules_interval=RULES_INTERVAL)
        rules_s = time.monotonic() - began
        print(f"pricing rules backfilled in {rules_s:.0f} s", flush=True)
    compact_s = settle(data_dir)
    print(f"compacted in {compact_s:.0f} s", flush=True)
    timings = {
        "raw_backfill_s": round(raw_s, 1),
        "rules_backfill_s": round(rules_s, 1),
        "compaction_s": round(compact_s, 1),
        "data_dir_bytes": sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file()),
    }
    stamp.write_text(json.dumps({"manifest": manifest, "timings": timings}))
    return timings


# -- ours ------------------------------------------------------------------------------------


class TimedClient:
    """A PrometheusClient that records how long each query took, for the profile."""

    def __init__(self, client: PrometheusClient) -> None:
        self.client = client
        self.calls: list[tuple[str, float, int]] = []

    def query(self, promql: str, at: float | None = None) -> Any:
        began = time.perf_counter()
        result = self.client.query(promql, at=at)
        self.calls.append((_name(promql), time.perf_counter() - began, len(result)))
        return result

    def query_range(self, promql: str, start: float, end: float, step: float) -> Any:
        began = time.perf_counter()
        result = self.client.query_range(promql, start, end, step)
        points = sum(len(s.timestamps) for s in result)
        self.calls.append((_name(promql), time.perf_counter() - began, points))
        return result


def _name(promql: str) -> str:
    """A short name for one of find_idle's queries."""
    if "gpu_memory_used_bytes" in promql:
        return "memory while idle (range)"
    if "gpu_allocation_info" in promql:
        return "idle points (range)"
    if "count_over_time" in promql:
        return "unallocated seconds (instant)"
    if "sum_over_time" in promql:
        return "unallocated dollars (instant)"
    return "prices (instant)"


def ours(client: TimedClient, config: Config, start: float, end: float) -> idle.IdleReport:
    """The service's idle list for (start, end]."""
    return idle.find_idle(
        client,
        config.rule_inputs(),
        config.idle,
        start=start,
        end=end,
        team_label=config.team_label,
        rules_interval_seconds=config.rules_interval_seconds,
    )


# -- naive -----------------------------------------------------------------------------------


def _frame(result: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame:
    """A range-query result as one row per point: the labels, t and value."""
    frames = []
    for series in result:
        values = np.array(series["values"], dtype=float).reshape(-1, 2)
        frame = pd.DataFrame({"t": values[:, 0], "value": values[:, 1]})
        for name in labels:
            frame[name] = series["metric"].get(name, "")
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["t", "value", *labels])
    return pd.concat(frames, ignore_index=True)


def naive(
    url: str,
    start: float,
    end: float,
    settings: idle.IdleSettings,
    step: float | None = None,
) -> pd.DataFrame:
    """Idle spells from the raw series at `step` (default: find_idle's for the window): one
    row per spell (device, namespace, pod, start, end, seconds)."""
    step = step or idle.query_step(int(end - start))
    whole = _frame(range_query(url, "gpu_utilization_ratio", start, end, SAMPLE_STEP), ["uuid"])
    whole["device"] = whole["uuid"]
    mig = _frame(
        range_query(url, "gpu_mig_sm_activity_ratio", start, end, SAMPLE_STEP), ["mig_uuid"]
    )
    mig["device"] = mig["mig_uuid"]
    activity = pd.concat([whole[["device", "t", "value"]], mig[["device", "t", "value"]]])
    # Each sample belongs to the step (t - step, t] that ends at or after it.
    activity["t"] = start + np.ceil((activity["t"] - start) / step) * step
    peak = activity.groupby(["device", "t"], as_index=False)["value"].max()
    holders = _frame(
        range_query(url, "gpu_allocation_info", start, end, step),
        ["uuid", "mig_uuid", "namespace", "pod"],
    )
    holders["device"] = np.where(holders["mig_uuid"] != "", holders["mig_uuid"], holders["uuid"])
    holders = holders.drop_duplicates(["device", "namespace", "pod", "t"])
    held = holders.merge(peak, on=["device", "t"], suffixes=("_held", ""))
    limit = held["namespace"].map(settings.threshold_for)
    low = held[held["value"] < limit].sort_values(["device", "namespace", "pod", "t"])
    keys = ["device", "namespace", "pod"]
    new = (low[keys] != low[keys].shift()).any(axis=1) | (low["t"].diff() != step)
    low = low.assign(spell=new.cumsum())
    spells = low.groupby("spell").agg(
        device=("device", "first"),
        namespace=("namespace", "first"),
        pod=("pod", "first"),
        first=("t", "min"),
        end=("t", "max"),
        steps=("t", "size"),
    )
    spells["start"] = spells["first"] - step
    spells["seconds"] = spells["steps"] * float(step)
    spells = spells[spells["seconds"] >= settings.window_seconds]
    return spells[["device", "namespace", "pod", "start", "end", "seconds"]].reset_index(drop=True)


def sampled_naive_difference(
    url: str, start: float, end: float, settings: idle.IdleSettings
) -> dict[str, float]:
    """What a naive query at the 5-minute step alone gets: one sample per step (the last),
    not its peak. Not timed; reported to show why the naive way reads every sample."""
    step = idle.query_step(int(end - start))
    whole = _frame(range_query(url, "gpu_utilization_ratio", start, end, step), ["uuid"])
    mig = _frame(range_query(url, "gpu_mig_sm_activity_ratio", start, end, step), ["mig_uuid"])
    whole["device"], mig["device"] = whole["uuid"], mig["mig_uuid"]
    activity = pd.concat([whole[["device", "t", "value"]], mig[["device", "t", "value"]]])
    holders = _frame(
        range_query(url, "gpu_allocation_info", start, end, step),
        ["uuid", "mig_uuid", "namespace", "pod"],
    )
    holders["device"] = np.where(holders["mig_uuid"] != "", holders["mig_uuid"], holders["uuid"])
    held = holders.drop_duplicates(["device", "namespace", "pod", "t"]).merge(
        activity, on=["device", "t"], suffixes=("_held", "")
    )
    limit = held["namespace"].map(settings.threshold_for)
    low = held[held["value"] < limit].sort_values(["device", "namespace", "pod", "t"])
    keys = ["device", "namespace", "pod"]
    new = (low[keys] != low[keys].shift()).any(axis=1) | (low["t"].diff() != step)
    runs = low.assign(spell=new.cumsum()).groupby("spell")["t"].size() * float(step)
    runs = runs[runs >= settings.window_seconds]
    return {"spells": len(runs), "idle_hours": float(runs.sum() / 3600.0)}


# -- the fix, measured: the idle points recorded every minute --------------------------------


def idle_rules_text(config: Config) -> str:
    """Recording rules holding find_idle's two range queries at the 1-minute step: the idle
    (pod, device) points with the minute's peak activity, and memory used while idle."""
    inputs = config.rule_inputs()
    threshold = config.idle.highest_threshold
    step = int(SAMPLE_STEP)
    points = idle.idle_points_query(
        inputs, step_seconds=step, threshold=threshold, team_label=config.team_label
    )
    memory = idle.memory_query(inputs, step_seconds=step, threshold=threshold)
    group = {
        "name": "gpu-idle",
        "interval": RULES_INTERVAL,
        "rules": [
            {"record": IDLE_RECORD, "expr": points},
            {"record": IDLE_MEMORY_RECORD, "expr": memory},
        ],
    }
    return yaml.safe_dump({"groups": [group]}, sort_keys=False, width=1000)


def add_idle_rules(data_dir: Path, config: Config, start: float, end: float) -> dict[str, Any]:
    """Backfill the idle rules into the kept history (once; stamped in its manifest)."""
    stamp = data_dir / "bench-manifest.json"
    doc = json.loads(stamp.read_text())
    text = idle_rules_text(config)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if "idle_rules" in doc:
        if doc["idle_rules"]["rules"] == digest:
            return dict(doc["idle_rules"]["timings"], reused=True)
        raise SystemExit(f"{data_dir} holds other idle rules: delete it and run again")
    with tempfile.TemporaryDirectory(prefix="bench-idle-rules-") as tmp:
        rules = Path(tmp) / "idle.yml"
        rules.write_text(text)
        began = time.monotonic()
        backfill_rules(data_dir, [rules], start=start, end=end, rules_interval=RULES_INTERVAL)
        backfill_s = time.monotonic() - began
    timings = {"idle_rules_backfill_s": round(backfill_s, 1), "compaction_s": 0.0}
    timings["compaction_s"] = round(settle(data_dir), 1)
    doc["idle_rules"] = {"rules": digest, "timings": timings}
    stamp.write_text(json.dumps(doc))
    return timings


def recorded(client: PrometheusClient, config: Config, start: float, end: float) -> pd.DataFrame:
    """find_idle's answer from the recorded idle points: a step is idle when every minute of
    it was recorded idle. The same four follow-up queries, then the same pandas."""
    from analytics import pricing

    window = int(end - start)
    step = idle.query_step(window)
    span = f"{step * 1000 - 1}ms"
    minutes = round(step / SAMPLE_STEP)
    query = (
        f"max_over_time({IDLE_RECORD}[{span}])"
        f" and count_over_time({IDLE_RECORD}[{span}]) >= {minutes}"
    )
    series = client.query_range(query, start + step, end, step)
    points = idle.points_frame([(s.labels, s.timestamps, s.values) for s in series], "label_team")
    spells = idle.find_spells(points, step, config.idle)
    whole = f"{window * 1000 - 1}ms"
    memory = {
        s.labels.get("mig_uuid") or s.labels.get("uuid", ""): s.value
        for s in client.query(f"avg_over_time({IDLE_MEMORY_RECORD}[{whole}])", at=end)
    }
    prices = {
        s.labels.get("mig_uuid") or s.labels.get("uuid", ""): s.value
        for s in client.query(
            f"max by (uuid) ({pricing.DEVICE_PRICE}) or max by (mig_uuid) ({pricing.MIG_PRICE})",
            at=end,
        )
    }
    unallocated = f"{pricing.DEVICE_UNALLOCATED}[{whole}]"
    client.query(f"sum by (node, gpu, uuid, model) (sum_over_time({unallocated}))", at=end)
    client.query(f"sum by (uuid) (count_over_time({unallocated}))", at=end)
    idle.summarise(
        spells,
        window_start=start,
        window_end=end,
        step_seconds=step,
        prices=prices,
        memory=memory,
    )
    return spells


def rule_evaluation_s(url: str, config: Config, at: float, runs: int = 5) -> float:
    """Median server time of one evaluation of both idle rules (what they cost each minute)."""
    doc = yaml.safe_load(idle_rules_text(config))
    seconds = []
    for _ in range(runs):
        total = 0.0
        for rule in doc["groups"][0]["rules"]:
            response = requests.post(
                f"{url}/api/v1/query",
                data={"query": rule["expr"], "time": at, "stats": "all"},
                timeout=600,
            )
            response.raise_for_status()
            total += response.json()["data"]["stats"]["timings"]["execTotalTime"]
        seconds.append(total)
    return statistics.median(seconds)


# -- comparison ------------------------------------------------------------------------------


def spell_keys(spells: pd.DataFrame) -> pd.DataFrame:
    """(device, namespace, pod, start, end, seconds) of each spell of a find_idle report."""
    frame = spells.copy()
    frame["device"] = np.where(frame["mig_uuid"] != "", frame["mig_uuid"], frame["uuid"])
    return frame[["device", "namespace", "pod", "start", "end", "seconds"]]


def compare(mine: pd.DataFrame, theirs: pd.DataFrame, other: str = "naive") -> dict[str, Any]:
    """Spell counts and idle hours of ours and `other`, and how many spells only one has."""
    keys = ["device", "namespace", "pod", "start", "end"]
    both = mine.merge(theirs, on=keys, how="outer", indicator=True)
    hours_mine = float(mine["seconds"].sum() / 3600.0)
    hours_theirs = float(theirs["seconds"].sum() / 3600.0)
    return {
        "spells_ours": len(mine),
        f"spells_{other}": len(theirs),
        "idle_hours_ours": round(hours_mine, 3),
        f"idle_hours_{other}": round(hours_theirs, 3),
        "relative_hours_difference": abs(hours_mine - hours_theirs) / max(hours_theirs, 1e-9),
        "spells_only_ours": int((both["_merge"] == "left_only").sum()),
        f"spells_only_{other}": int((both["_merge"] == "right_only").sum()),
        "devices_with_spells": int(mine["device"].nunique()),
        "pods_with_spells": int(mine[["namespace", "pod"]].drop_duplicates().shape[0]),
    }


def _table(result: Mapping[str, Any]) -> str:
    def runs(values: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in values) + " s"

    rows = [
        ("ours (find_idle)", "ours"),
        ("naive (raw series + pandas)", "naive"),
        ("fix: idle points recorded each minute", "recorded"),
    ]
    lines = [
        "| way | median | runs |",
        "|---|---:|---|",
        *[
            f"| {title} | {result[f'{key}_median_s']:.3f} s | {runs(result[f'{key}_runs_s'])} |"
            for title, key in rows
        ],
        "",
        "| part of ours | median |",
        "|---|---:|",
        *[
            f"| {name} | {seconds:.3f} s |"
            for name, seconds in result["ours_profile_median_s"].items()
        ],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_list", description=__doc__)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-bench-idle-tsdb"
    )
    args = parser.parse_args(argv)
    # A fixed end (midnight UTC before now) keeps the data directory reusable for a day.
    end = math.floor(time.time() / 86400) * 86400.0
    start = end - args.days * 86400
    config = Config()
    timings = build_history(args.data_dir, args.nodes, args.days, end)
    timings["idle_rules"] = add_idle_rules(args.data_dir, config, start, end)
    print(f"history: {args.nodes} nodes x 8 GPUs, {args.days} days at 1m: {timings}", flush=True)
    with prometheus(args.data_dir, port=19392) as url:
        client = TimedClient(PrometheusClient(url, timeout=600, retries=0))
        plain = PrometheusClient(url, timeout=600, retries=0)
        seconds: dict[str, list[float]] = {"ours": [], "naive": [], "recorded": []}
        parts: dict[str, list[float]] = defaultdict(list)
        report: idle.IdleReport | None = None
        theirs = fix = pd.DataFrame()
        for run in range(args.runs + 1):  # the first round warms all up and is not counted
            client.calls.clear()
            began = time.perf_counter()
            report = ours(client, config, start, end)
            elapsed = {"ours": time.perf_counter() - began}
            began = time.perf_counter()
            theirs = naive(url, start, end, config.idle)
            elapsed["naive"] = time.perf_counter() - began
            began = time.perf_counter()
            fix = recorded(plain, config, start, end)
            elapsed["recorded"] = time.perf_counter() - began
            if run:
                for key, value in elapsed.items():
                    seconds[key].append(value)
                for name, took, _ in client.calls:
                    parts[name].append(took)
                parts["pandas and parsing outside the queries"].append(
                    elapsed["ours"] - sum(took for _, took, _ in client.calls)
                )
            print(
                f"run {run}: " + ", ".join(f"{k} {v:.3f} s" for k, v in elapsed.items()),
                flush=True,
            )
        assert report is not None
        points = {name: count for name, _, count in client.calls}
        sampled = sampled_naive_difference(url, start, end, config.idle)
        fine = naive(url, start, end, config.idle, step=SAMPLE_STEP)
        rule_s = rule_evaluation_s(url, config, end)
    mine = spell_keys(report.spells)
    agreement = compare(mine, theirs)
    fix_agreement = compare(mine, spell_keys(fix), "recorded")
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "fleet": {
            "nodes": args.nodes,
            "gpus": args.nodes * 8,
            "days": args.days,
            "sample_step_s": SAMPLE_STEP,
            "query_step_s": report.step_seconds,
            "idle_workload": IDLE_WORKLOAD,
        },
        "history": timings,
        "runs": args.runs,
        **{f"{key}_median_s": round(value, 3) for key, value in medians.items()},
        "speedup_over_naive": round(medians["naive"] / medians["ours"], 1),
        "target_s": TARGET_S,
        **{f"{key}_runs_s": [round(x, 3) for x in values] for key, values in seconds.items()},
        "ours_profile_median_s": {k: round(statistics.median(v), 3) for k, v in parts.items()},
        "ours_points_or_series": points,
        "items": len(report.items),
        "agreement": agreement,
        "naive_sampled_at_query_step": sampled,
        "naive_at_sample_step": {
            "step_s": SAMPLE_STEP,
            "spells": len(fine),
            "idle_hours": round(float(fine["seconds"].sum()) / 3600.0, 3),
        },
        "recorded_fix": {
            "agreement_with_ours": fix_agreement,
            "rule_evaluation_s": round(rule_s, 3),
        },
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(_table(result))
    if (
        agreement["spells_ours"] != agreement["spells_naive"]
        or agreement["relative_hours_difference"] > TOLERANCE
    ):
        print("the two ways find different spells", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
