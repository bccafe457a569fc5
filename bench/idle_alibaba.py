"""Idle detection on a real trace: Alibaba's production Stable Diffusion pods (one day, 97 pods),
through the whole pipeline, checked against the same definition computed directly in pandas.

    python -m bench.idle_alibaba                 # data in ../shared/data
    python -m bench.idle_alibaba --data DIR      # data elsewhere

Each `series_id` of `alibaba-genai-2026/pod_gpu_util.csv.gz` becomes a pod holding one whole
NVIDIA A100-SXM4-80GB (priced by examples/pricing.yaml) on one of 13 synthetic 8-GPU nodes.
The trace is written as OpenMetrics as our exporter would publish it, shifted so the day ends
half an hour before now: `gpu_info` for every GPU over the whole day (the GPUs exist whether
or not a pod holds them), and `gpu_allocation_info`, `gpu_utilization_ratio` (percent / 100)
and `gpu_memory_used_bytes` only at the pod's own samples (its gaps stay gaps). That goes into
a real Prometheus with `promtool tsdb create-blocks-from openmetrics`, the pricing rules are
backfilled over it, and `analytics.idle.find_idle` runs over the day through a real
`PrometheusClient`.

The reference reads only the CSV: on the pipeline's step grid t = start + 60 s x k, a step
(t - 60 s, t] is idle when it holds at least one sample and every one is under 5%; a spell is
a run of consecutive idle steps lasting at least 30 minutes. Per pod, both must find the same
spells (count and idle GPU-hours; a boundary effect of at most one step per spell is
tolerated and listed). Figures go to bench/results/idle_alibaba.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from analytics import idle
from analytics.config import Config
from analytics.pricing import load_pricing, render_rules
from analytics.prometheus import PrometheusClient
from bench.common import BENCH_DIR
from bench.cost_report import PRICING, prometheus
from exporter.catalogue import CATALOGUE
from exporter.simulator.history import backfill_rules

REPO = BENCH_DIR.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
TRACE = Path("alibaba-genai-2026") / "pod_gpu_util.csv.gz"
RESULTS = BENCH_DIR / "results" / "idle_alibaba.json"
MODEL = "NVIDIA A100-SXM4-80GB"
GPUS_PER_NODE = 8
NAMESPACE = "sd-serving"
TEAMS = 4
WINDOW_S = 86_400
#: The trace's last sample lands this long before the window's end.
END_MARGIN_S = 30


@dataclass(frozen=True)
class Pod:
    """Where one trace series lives in the synthetic cluster."""

    series_id: str
    name: str
    team: str
    node: str
    gpu: int
    uuid: str

    def device_labels(self) -> list[tuple[str, str]]:
        return [
            ("node", self.node),
            ("gpu", str(self.gpu)),
            ("uuid", self.uuid),
            ("model", MODEL),
            ("pci_bus_id", f"00000000:{0x10 + self.gpu:02X}:00.0"),
        ]


def load_trace(path: Path) -> pd.DataFrame:
    """The trace, sorted by series and time."""
    if not path.exists():
        sys.exit(f"no trace at {path} (use --data DIR, the folder holding {TRACE.parent})")
    frame = pd.read_csv(path)
    return frame.sort_values(["series_id", "ts_anon"], kind="stable").reset_index(drop=True)


def place(series_ids: Sequence[str]) -> dict[str, Pod]:
    """Pod i holds GPU i % 8 of node i // 8; teams round-robin."""
    out = {}
    for i, series_id in enumerate(sorted(series_ids)):
        node = f"alibaba-node-{i // GPUS_PER_NODE:02d}"
        gpu = i % GPUS_PER_NODE
        out[series_id] = Pod(
            series_id=series_id,
            name=f"sd-{series_id[:12]}",
            team=f"team-{i % TEAMS}",
            node=node,
            gpu=gpu,
            uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_OID, f'{node}/{gpu}')}",
        )
    return out


# -- the trace as our exporter's series -------------------------------------------------------


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def _write_series(out: TextIO, head: str, values: Sequence[str], stamps: Sequence[int]) -> None:
    out.write("".join(f"{head} {v} {t}\n" for v, t in zip(values, stamps, strict=True)))


def write_openmetrics(out: TextIO, trace: pd.DataFrame, pods: Mapping[str, Pod]) -> int:
    """The shifted trace (column `t`) as our exporter's series; returns the sample count."""
    target = lambda pod: [("instance", pod.node), ("job", "gpu-exporter")]  # noqa: E731
    day = np.arange(trace["t"].min(), trace["t"].max() + 1, 57).tolist()
    by_pod = {sid: group for sid, group in trace.groupby("series_id", sort=True)}
    count = 0

    def family(name: str) -> None:
        out.write(f"# TYPE {name} {CATALOGUE[name].type}\n")

    family("gpu_info")
    for pod in pods.values():
        info = [
            *pod.device_labels(),
            ("driver_version", "535.129.03"),
            ("cuda_driver_version", "12.2"),
            ("mig_mode", "disabled"),
            *target(pod),
        ]
        _write_series(out, "gpu_info" + _labels(info), ["1"] * len(day), day)
        count += len(day)
    family("gpu_allocation_info")
    for sid, pod in pods.items():
        pairs = [
            *pod.device_labels(),
            ("namespace", NAMESPACE),
            ("pod", pod.name),
            ("container", "diffusion"),
            ("resource", "nvidia.com/gpu"),
            ("label_team", pod.team),
            *target(pod),
        ]
        stamps = by_pod[sid]["t"].tolist()
        _write_series(out, "gpu_allocation_info" + _labels(pairs), ["1"] * len(stamps), stamps)
        count += len(stamps)
    family("gpu_utilization_ratio")
    for sid, pod in pods.items():
        group = by_pod[sid]
        values = [repr(p / 100.0) for p in group["gpu_util_pct"].tolist()]
        head = "gpu_utilization_ratio" + _labels([*pod.device_labels(), *target(pod)])
        _write_series(out, head, values, group["t"].tolist())
        count += len(values)
    family("gpu_memory_used_bytes")
    for sid, pod in pods.items():
        group = by_pod[sid].dropna(subset=["gpu_mem_used_bytes"])  # unavailable is not zero
        values = [str(int(b)) for b in group["gpu_mem_used_bytes"].tolist()]
        head = "gpu_memory_used_bytes" + _labels([*pod.device_labels(), *target(pod)])
        _write_series(out, head, values, group["t"].tolist())
        count += len(values)
    out.write("# EOF\n")
    return count


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the reference ---------------------------------------------------------------------------


def reference_spells(
    trace: pd.DataFrame,
    start: float,
    step: int,
    threshold_pct: float,
    window_s: float,
    bridge: int = 0,
) -> pd.DataFrame:
    """Spells straight from the samples: one row per spell (series_id, start, end, seconds).

    `bridge` > 0 is not the definition: it lets a spell run across up to that many steps
    without a sample (counted as idle), to show how much missing samples split spells."""
    k = np.ceil((trace["t"].to_numpy() - start) / step).astype(np.int64)
    steps = (
        pd.DataFrame({"series_id": trace["series_id"], "k": k, "pct": trace["gpu_util_pct"]})
        .groupby(["series_id", "k"], as_index=False)["pct"]
        .max()
    )
    low = steps["pct"] < threshold_pct
    new = (
        (steps["series_id"] != steps["series_id"].shift())
        | (steps["k"].diff() > 1 + bridge)
        | (low != low.shift())
    )
    runs = (
        steps.assign(run=new.cumsum())[low]
        .groupby("run")
        .agg(series_id=("series_id", "first"), first=("k", "min"), last=("k", "max"))
    )
    runs["seconds"] = (runs["last"] - runs["first"] + 1) * float(step)
    runs = runs[runs["seconds"] >= window_s]
    return pd.DataFrame(
        {
            "series_id": runs["series_id"],
            "start": start + (runs["first"] - 1) * step,
            "end": start + runs["last"] * step,
            "seconds": runs["seconds"],
        }
    ).reset_index(drop=True)


def missing_steps(trace: pd.DataFrame, start: float, step: int) -> int:
    """Steps without a sample between a pod's first and last sample."""
    k = pd.Series(np.ceil((trace["t"].to_numpy() - start) / step).astype(np.int64))
    per_pod = k.groupby(trace["series_id"].to_numpy())
    return int((per_pod.max() - per_pod.min() + 1 - per_pod.nunique()).sum())


# -- comparison ------------------------------------------------------------------------------


def compare(
    pods: Mapping[str, Pod], found: pd.DataFrame, reference: pd.DataFrame, step: int
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Per pod: spells and idle GPU-hours of both ways; and every spell only one way has."""
    by_name = {pod.name: sid for sid, pod in pods.items()}
    mine = found.assign(series_id=found["pod"].map(by_name))[
        ["series_id", "start", "end", "seconds"]
    ]
    rows = []
    for sid in sorted(pods):
        a = mine[mine["series_id"] == sid]
        b = reference[reference["series_id"] == sid]
        rows.append(
            {
                "series_id": sid,
                "pod": pods[sid].name,
                "spells_pipeline": len(a),
                "spells_reference": len(b),
                "idle_gpu_hours_pipeline": float(a["seconds"].sum()) / 3600.0,
                "idle_gpu_hours_reference": float(b["seconds"].sum()) / 3600.0,
            }
        )
    table = pd.DataFrame(rows)
    table["hours_difference"] = (
        table["idle_gpu_hours_pipeline"] - table["idle_gpu_hours_reference"]
    ).abs()
    both = mine.merge(reference, on=["series_id", "start", "end"], how="outer", indicator=True)
    unmatched = [
        {
            "pod": pods[r.series_id].name,
            "start": float(r.start),
            "end": float(r.end),
            "only_in": "pipeline" if r._merge == "left_only" else "reference",
        }
        for r in both[both["_merge"] != "both"].itertuples()
    ]
    return table, unmatched


def within_tolerance(table: pd.DataFrame, step: int) -> bool:
    """Same spell count per pod, hours apart by at most one step per spell."""
    allowed = table["spells_reference"].clip(lower=1) * step / 3600.0
    same_count = (table["spells_pipeline"] == table["spells_reference"]).all()
    return bool(same_count and (table["hours_difference"] <= allowed + 1e-9).all())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_alibaba", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    args = parser.parse_args(argv)
    began_all = time.monotonic()
    timings: dict[str, float] = {}
    trace = load_trace(args.data / TRACE)
    pods = place(trace["series_id"].unique().tolist())
    end = math.floor(time.time() / 60) * 60.0 - 1800.0
    start = end - WINDOW_S
    shift = int(end) - END_MARGIN_S - int(trace["ts_anon"].max())
    trace["t"] = trace["ts_anon"] + shift
    config = Config()
    settings = config.idle
    step = idle.query_step(WINDOW_S)
    pricing = load_pricing(PRICING)
    with tempfile.TemporaryDirectory(prefix="bench-idle-alibaba-") as tmp:
        data_dir = Path(tmp) / "tsdb"
        data_dir.mkdir()
        began = time.monotonic()
        om = Path(tmp) / "trace.om"
        with om.open("w", encoding="utf-8", buffering=1 << 20) as out:
            samples = write_openmetrics(out, trace, pods)
        timings["write_openmetrics_s"] = time.monotonic() - began
        began = time.monotonic()
        command = ["promtool", "tsdb", "create-blocks-from", "openmetrics", "--quiet"]
        subprocess.run([*command, str(om), str(data_dir)], check=True)
        timings["raw_backfill_s"] = time.monotonic() - began
        rules = Path(tmp) / "pricing.yml"
        rules.write_text(render_rules(pricing, inputs=config.rule_inputs()))
        began = time.monotonic()
        backfill_rules(
            data_dir, [rules], start=start, end=end, rules_interval=config.rules_interval
        )
        timings["rules_backfill_s"] = time.monotonic() - began
        with prometheus(data_dir, port=_free_port()) as url:
            client = PrometheusClient(url, timeout=300, retries=0)
            began = time.monotonic()
            report = idle.find_idle(
                client,
                config.rule_inputs(),
                settings,
                start=start,
                end=end,
                team_label=config.team_label,
                rules_interval_seconds=config.rules_interval_seconds,
            )
            timings["find_idle_s"] = time.monotonic() - began
    began = time.monotonic()
    reference = reference_spells(
        trace, start, step, settings.threshold_for(NAMESPACE) * 100.0, settings.window_seconds
    )
    timings["reference_s"] = time.monotonic() - began
    sensitivity = {}
    for bridge in (1, 2):
        bridged = reference_spells(
            trace,
            start,
            step,
            settings.threshold_for(NAMESPACE) * 100.0,
            settings.window_seconds,
            bridge,
        )
        sensitivity[f"bridging_{bridge}_missing_steps"] = {
            "spells": len(bridged),
            "idle_gpu_hours": round(float(bridged["seconds"].sum()) / 3600.0, 2),
        }
    table, unmatched = compare(pods, report.spells, reference, step)
    ok = within_tolerance(table, step)
    price = pricing.device_price(MODEL)
    assert price is not None, f"{MODEL} has no price in {PRICING}"
    costs = [i.cost for i in report.items]
    memory = [i.memory_bytes for i in report.items if i.memory_bytes is not None]
    worst = table.loc[table["hours_difference"].idxmax()]
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "trace": str(TRACE),
        "samples_written": samples,
        "window": {"start": start, "end": end, "step_s": step, "hours": WINDOW_S / 3600},
        "definition": {
            "threshold": settings.threshold_for(NAMESPACE),
            "min_spell_minutes": settings.window_seconds / 60,
        },
        "pods": len(pods),
        "nodes": len({p.node for p in pods.values()}),
        "pods_with_idle_spells": int((table["spells_pipeline"] > 0).sum()),
        "pods_with_idle_spells_reference": int((table["spells_reference"] > 0).sum()),
        "spells": int(table["spells_pipeline"].sum()),
        "spells_reference": int(table["spells_reference"].sum()),
        "idle_gpu_hours": round(float(table["idle_gpu_hours_pipeline"].sum()), 4),
        "idle_gpu_hours_reference": round(float(table["idle_gpu_hours_reference"].sum()), 4),
        "held_gpu_hours": round(len(trace) * 57 / 3600.0, 1),
        "idle_cost_usd": None if None in costs else round(sum(c or 0.0 for c in costs), 2),
        "idle_cost_reference_usd": round(float(reference["seconds"].sum()) / 3600 * price, 2),
        "median_memory_held_while_idle_gib": (
            round(float(np.median(memory)) / 2**30, 1) if memory else None
        ),
        "largest_per_pod_difference": {
            "pod": worst["pod"],
            "gpu_hours": round(float(worst["hours_difference"]), 6),
            "spells": int((table["spells_pipeline"] - table["spells_reference"]).abs().max()),
        },
        "unmatched_spells": unmatched,
        "missing_steps_while_present": missing_steps(trace, start, step),
        "gap_sensitivity": sensitivity,
        "agree": ok,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "runtime_s": round(time.monotonic() - began_all, 1),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print()
    print("| figure | pipeline (find_idle) | reference (pandas on the CSV) |")
    print("|---|---:|---:|")
    print(f"| pods | {result['pods']} | {result['pods']} |")
    print(
        f"| pods with idle spells | {result['pods_with_idle_spells']} | "
        f"{result['pods_with_idle_spells_reference']} |"
    )
    print(f"| idle spells (>= 30 min) | {result['spells']} | {result['spells_reference']} |")
    print(
        f"| allocated-but-idle GPU-hours | {result['idle_gpu_hours']:.2f} | "
        f"{result['idle_gpu_hours_reference']:.2f} |"
    )
    print(
        f"| idle cost at ${price:g}/h | ${result['idle_cost_usd']} | "
        f"${result['idle_cost_reference_usd']} |"
    )
    print(
        f"| largest per-pod difference | {result['largest_per_pod_difference']['gpu_hours']} "
        f"GPU-h, {result['largest_per_pod_difference']['spells']} spells | |"
    )
    if not ok:
        print("pipeline and reference disagree beyond one step per spell", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
