"""Allocated-but-idle GPUs: which pods hold a GPU or MIG slice that does nothing, since when,
for how long in a window, what that idle time cost, and the numbers that show it.

The definition (also recorded by the rules in `rules/`, so alerts fire without this service):
a device a pod holds is idle while the device's activity stays under a threshold (5% by
default, per namespace if configured); an idle *spell* counts once it lasts the idle window
(30 minutes by default). Activity is the best signal the source has: GPU utilization for whole
GPUs and GPM SM activity for MIG instances from our exporter, graphics-engine activity from
DCGM. A device with no reading is never idle: unknown is not idle.

Prometheus does the heavy part: one range query returns only the (pod, device, time) points
where a held device was under the threshold for the whole step, with the step's peak activity
as the value. Pure functions here turn those points into spells; no Flask in this module.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analytics.pricing import MIG_SLICES, compute_slices
from analytics.promql import matchers
from analytics.sources import RuleInputs

DEFAULT_THRESHOLD = 0.05
DEFAULT_WINDOW_SECONDS = 1800
#: Range-query steps: one minute for windows up to two days, five minutes beyond (a 30-minute
#: spell is then still six steps long).
FINE_STEP_S = 60
COARSE_STEP_S = 300
FINE_STEP_MAX_WINDOW_S = 2 * 86_400
HOURS_PER_MONTH = 730.0

#: Labels of the idle points: the device, the pod, its team.
_DEVICE_LABELS = ("node", "gpu", "uuid", "model", "mig_profile", "mig_uuid")
_POD_LABELS = ("namespace", "pod")

CSV_COLUMNS = (
    "category",
    "device_id",
    "node",
    "gpu",
    "model",
    "mig_profile",
    "namespace",
    "pod",
    "team",
    "idle_now",
    "idle_since",
    "idle_hours",
    "idle_spells",
    "gpu_equivalents",
    "idle_cost_usd",
    "max_activity",
    "memory_held_bytes",
)


@dataclass(frozen=True)
class IdleSettings:
    """The idle definition: threshold (0-1 activity) and how long a spell must last."""

    threshold: float = DEFAULT_THRESHOLD
    window_seconds: int = DEFAULT_WINDOW_SECONDS
    #: Per-namespace thresholds that replace `threshold` for that namespace.
    namespace_thresholds: Mapping[str, float] = field(default_factory=dict)

    def threshold_for(self, namespace: str) -> float:
        """The threshold that applies to pods of `namespace`."""
        return self.namespace_thresholds.get(namespace, self.threshold)

    @property
    def highest_threshold(self) -> float:
        """The loosest threshold of any namespace: what the query filters with."""
        return max([self.threshold, *self.namespace_thresholds.values()])


def rule_settings() -> IdleSettings:
    """The idle definition the alert rules are generated with (`monitoring/values.yaml`), so
    the service and the rules agree unless the analytics config says otherwise."""
    from monitoring.values import duration_seconds, load_values

    values = load_values()
    return IdleSettings(
        threshold=values.idle_threshold,
        window_seconds=int(duration_seconds(values.idle_window)),
        namespace_thresholds=dict(values.idle_namespace_thresholds),
    )


def query_step(window_seconds: int) -> int:
    """The range-query step for a window (see FINE_STEP_S / COARSE_STEP_S)."""
    return FINE_STEP_S if window_seconds <= FINE_STEP_MAX_WINDOW_S else COARSE_STEP_S


def _step_range(step_seconds: int) -> str:
    """One step as a range one millisecond short, so a step sees only its own samples."""
    return f"{step_seconds * 1000 - 1}ms"


def _team_by(team_label: str) -> str:
    return ", ".join((*_DEVICE_LABELS, *_POD_LABELS, team_label))


def idle_points_query(
    inputs: RuleInputs,
    *,
    step_seconds: int,
    threshold: float,
    team_label: str,
    filters: Mapping[str, str] | None = None,
) -> str:
    """(pod, device) points where the held device's peak activity in the step was under
    `threshold`; the value is that peak. `filters` (namespace, team label) are quoted."""
    extra = matchers(**dict(filters or {}))
    extra = f",{extra}" if extra else ""
    parts = []
    for kind, held in (("whole", 'mig_uuid=""'), ("mig", 'mig_uuid!=""')):
        key = inputs.key(kind)
        low = f"{inputs.activity(kind, 'max_over_time', _step_range(step_seconds))} < {threshold!r}"
        holders = f"max by ({_team_by(team_label)}) ({inputs.allocations}{{{held}{extra}}})"
        # group_right: one device, many holder pods (time-slicing); the pods' labels are kept
        # and the value is the device's (holders are 1).
        parts.append(f"(\n  ({low})\n  * on ({key}) group_right ()\n  {holders}\n)")
    return "\nor\n".join(parts)


def memory_query(inputs: RuleInputs, *, step_seconds: int, threshold: float) -> str:
    """Memory used (bytes) by each device while its activity was under `threshold`."""
    parts = []
    for kind in ("whole", "mig"):
        key = inputs.key(kind)
        low = f"{inputs.activity(kind, 'max_over_time', _step_range(step_seconds))} < {threshold!r}"
        parts.append(f"({inputs.memory(kind)} and on ({key}) ({low}))")
    return " or ".join(parts)


def points_frame(
    series: Sequence[tuple[Mapping[str, str], Sequence[float], Sequence[float]]],
    team_label: str,
) -> pd.DataFrame:
    """Range-query series (labels, timestamps, values) as one row per point."""
    columns = [*_DEVICE_LABELS, *_POD_LABELS, "team", "t", "activity"]
    frames = []
    for labels, timestamps, values in series:
        if not timestamps:
            continue
        frame = pd.DataFrame({"t": np.asarray(timestamps), "activity": np.asarray(values)})
        for name in (*_DEVICE_LABELS, *_POD_LABELS):
            frame[name] = labels.get(name, "")
        frame["team"] = labels.get(team_label) or None
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def find_spells(points: pd.DataFrame, step_seconds: int, settings: IdleSettings) -> pd.DataFrame:
    """Idle spells per (pod, device) from idle points, at least `settings.window_seconds` long.

    A point at t stands for the step (t - step, t]; points more than one step apart start a
    new spell (a gap in the data is not idle time). Returns one row per spell: the point
    labels, `start`, `end`, `seconds`, `max_activity`, `mean_activity`, `samples`, and the
    GPU-equivalents the pod held (k/7 for a MIG slice, split between the pods sharing it).
    """
    columns = [
        *_DEVICE_LABELS,
        *_POD_LABELS,
        "team",
        "start",
        "end",
        "seconds",
        "max_activity",
        "mean_activity",
        "samples",
        "share",
    ]
    if points.empty:
        return pd.DataFrame(columns=columns)
    frame = points.copy()
    frame["device"] = np.where(frame["mig_uuid"] != "", frame["mig_uuid"], frame["uuid"])
    # Pods sharing a device at t split it; all of them are idle with it (activity is per device).
    holders = frame.groupby(["device", "t"])["pod"].transform("size")
    slices = frame["mig_profile"].map(lambda p: compute_slices(p) if p else MIG_SLICES)
    frame["share"] = slices.fillna(MIG_SLICES).astype(float) / MIG_SLICES / holders
    limit = frame["namespace"].map(settings.threshold_for)
    frame = frame[frame["activity"] < limit]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    keys = ["device", "namespace", "pod"]
    frame = frame.sort_values([*keys, "t"], kind="stable")
    same = (frame[keys] == frame[keys].shift()).all(axis=1)
    gap = frame["t"].diff() > step_seconds * 1.5
    frame["spell"] = (~same | gap).cumsum()
    grouped = frame.groupby("spell", sort=False)
    spells = grouped.agg(
        first_t=("t", "min"),
        end=("t", "max"),
        samples=("t", "size"),
        max_activity=("activity", "max"),
        mean_activity=("activity", "mean"),
        share=("share", "mean"),
    )
    labels = grouped[[*_DEVICE_LABELS, *_POD_LABELS, "team"]].first()
    spells = labels.join(spells)
    spells["start"] = spells["first_t"] - step_seconds
    spells["seconds"] = spells["samples"] * float(step_seconds)
    spells = spells[spells["seconds"] >= settings.window_seconds]
    return spells[columns].reset_index(drop=True)


@dataclass(frozen=True)
class IdleItem:
    """One (pod, device) with idle time in the window, and why it counts as idle."""

    labels: Mapping[str, Any]
    idle_now: bool
    idle_since: float
    idle_seconds: float
    spells: int
    share: float
    max_activity: float
    mean_activity: float
    samples: int
    cost: float | None
    price_per_hour: float | None
    memory_bytes: float | None


def summarise(
    spells: pd.DataFrame,
    *,
    window_start: float,
    window_end: float,
    step_seconds: int,
    prices: Mapping[str, float],
    memory: Mapping[str, float],
) -> list[IdleItem]:
    """Spells -> one item per (pod, device), most idle cost first.

    `prices` maps a device (uuid or mig_uuid) to its $/h; the pod pays its share of it, so
    the idle cost is share x price x idle hours (None when the device has no price, never 0).
    The item is idle now when its latest spell reaches the window's last step.
    """
    if spells.empty:
        return []
    frame = spells.copy()
    frame["start"] = frame["start"].clip(lower=window_start)
    frame["seconds"] = frame["end"] - frame["start"]
    frame["device"] = np.where(frame["mig_uuid"] != "", frame["mig_uuid"], frame["uuid"])
    items: list[IdleItem] = []
    for (device, namespace, pod), group in frame.groupby(["device", "namespace", "pod"]):
        latest = group.loc[group["end"].idxmax()]
        seconds = float(group["seconds"].sum())
        share = float((group["share"] * group["seconds"]).sum() / seconds) if seconds else 0.0
        price = prices.get(str(device))
        cost = None if price is None else share * price * seconds / 3600.0
        weights = group["samples"].astype(float)
        items.append(
            IdleItem(
                labels={
                    **{name: latest[name] for name in _DEVICE_LABELS},
                    "namespace": namespace,
                    "pod": pod,
                    "team": latest["team"],
                    "device": device,
                },
                idle_now=bool(latest["end"] > window_end - step_seconds * 1.5),
                idle_since=float(latest["start"]),
                idle_seconds=seconds,
                spells=len(group),
                share=share,
                max_activity=float(group["max_activity"].max()),
                mean_activity=float((group["mean_activity"] * weights).sum() / weights.sum()),
                samples=int(weights.sum()),
                cost=cost,
                price_per_hour=None if price is None else share * price,
                memory_bytes=memory.get(str(device)),
            )
        )
    items.sort(key=lambda i: (-(i.cost or 0.0), -i.idle_seconds, i.labels["device"]))
    return items


def _iso(seconds: float) -> str:
    return pd.Timestamp(seconds, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def item_record(item: IdleItem, settings: IdleSettings) -> dict[str, Any]:
    """An idle item as the API serves it (camelCase, seed style)."""
    labels = item.labels
    mig = labels["mig_uuid"] != ""
    return {
        "category": "allocated_idle",
        "deviceId": labels["device"],
        "kind": "mig" if mig else "gpu",
        "node": labels["node"] or None,
        "gpu": labels["gpu"] or None,
        "model": labels["model"] or None,
        "migProfile": labels["mig_profile"] or None,
        "parentUuid": labels["uuid"] if mig else None,
        "namespace": labels["namespace"],
        "pod": labels["pod"],
        "team": labels["team"],
        "idleNow": item.idle_now,
        "idleSince": _iso(item.idle_since),
        "idleHours": round(item.idle_seconds / 3600.0, 6),
        "idleSpells": item.spells,
        "gpuEquivalents": round(item.share, 6),
        "idleCost": None if item.cost is None else round(item.cost, 6),
        "costPerHour": None if item.price_per_hour is None else round(item.price_per_hour, 6),
        "evidence": {
            "threshold": settings.threshold_for(labels["namespace"]),
            "windowMinutes": settings.window_seconds / 60,
            "maxActivity": round(item.max_activity, 6),
            "meanActivity": round(item.mean_activity, 6),
            "samples": item.samples,
            "memoryHeldBytes": None if item.memory_bytes is None else round(item.memory_bytes),
        },
    }


def unallocated_records(
    rows: Sequence[tuple[Mapping[str, str], float, float]], window_seconds: float
) -> list[dict[str, Any]]:
    """Devices with capacity no pod held: (labels, dollars, unheld seconds) -> API rows."""
    out = []
    for labels, dollars, seconds in sorted(rows, key=lambda r: (-r[1], r[0].get("uuid", ""))):
        if not math.isfinite(dollars):
            continue
        out.append(
            {
                "category": "unallocated",
                "deviceId": labels.get("uuid", ""),
                "node": labels.get("node") or None,
                "gpu": labels.get("gpu") or None,
                "model": labels.get("model") or None,
                "unallocatedHours": round(min(seconds, window_seconds) / 3600.0, 6),
                "cost": round(dollars, 6),
            }
        )
    return out


def monthly_saving(item: IdleItem, held_seconds: float) -> float | None:
    """What releasing the device would save a month: its price share at the fraction of the
    time the pod held it that it sat idle."""
    if item.price_per_hour is None or held_seconds <= 0:
        return None
    return item.price_per_hour * HOURS_PER_MONTH * min(item.idle_seconds / held_seconds, 1.0)


def idle_csv(records: Sequence[Mapping[str, Any]]) -> str:
    """Idle items as CSV (one row per item; missing numbers as empty cells, never 0)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        evidence = r["evidence"]
        cells = [
            r["category"],
            r["deviceId"],
            r["node"],
            r["gpu"],
            r["model"],
            r["migProfile"],
            r["namespace"],
            r["pod"],
            r["team"],
            str(r["idleNow"]).lower(),
            r["idleSince"],
            r["idleHours"],
            r["idleSpells"],
            r["gpuEquivalents"],
            r["idleCost"],
            evidence["maxActivity"],
            evidence["memoryHeldBytes"],
        ]
        writer.writerow(["" if c is None else c for c in cells])
    return buffer.getvalue()


@dataclass(frozen=True)
class IdleReport:
    """What `find_idle` found in a window."""

    start: float
    end: float
    step_seconds: int
    items: list[IdleItem]
    #: Every spell found (one row per spell, see `find_spells`), for evidence and tests.
    spells: pd.DataFrame
    #: (device labels, dollars, seconds) of capacity no pod held; empty when filtered.
    unallocated: list[tuple[Mapping[str, str], float, float]]


def find_idle(
    prometheus: Any,
    inputs: RuleInputs,
    settings: IdleSettings,
    *,
    start: float,
    end: float,
    team_label: str,
    rules_interval_seconds: float,
    filters: Mapping[str, str] | None = None,
) -> IdleReport:
    """Run the idle queries for (start, end] against `prometheus` (our client) and summarise.

    Four queries whatever the fleet size: idle points, memory while idle, device prices now,
    and (without filters) the recorded unallocated cost per device.
    """
    from analytics import pricing  # the recorded series' names

    window = int(end - start)
    step = query_step(window)
    threshold = settings.highest_threshold
    first = start + step
    series = prometheus.query_range(
        idle_points_query(
            inputs, step_seconds=step, threshold=threshold, team_label=team_label, filters=filters
        ),
        first,
        end,
        step,
    )
    points = points_frame([(s.labels, s.timestamps, s.values) for s in series], team_label)
    spells = find_spells(points, step, settings)
    prices: dict[str, float] = {}
    memory: dict[str, float] = {}
    if not spells.empty:
        # The last price in the window: a device gone by its end (a node scaled down, a MIG
        # layout changed) still has its idle time priced.
        span = f"{window * 1000 - 1}ms"
        for sample in prometheus.query(
            f"max by (uuid) (last_over_time({pricing.DEVICE_PRICE}[{span}]))"
            f" or max by (mig_uuid) (last_over_time({pricing.MIG_PRICE}[{span}]))",
            at=end,
        ):
            key = sample.labels.get("mig_uuid") or sample.labels.get("uuid", "")
            prices[key] = sample.value
        for found in prometheus.query_range(
            memory_query(inputs, step_seconds=step, threshold=threshold), first, end, step
        ):
            key = found.labels.get("mig_uuid") or found.labels.get("uuid", "")
            if found.values:
                memory[key] = float(np.mean(found.values))
    unallocated: list[tuple[Mapping[str, str], float, float]] = []
    if not filters:
        # (start, end], as the cost reports: a range one millisecond short of the window.
        span = f"{window * 1000 - 1}ms"
        by = "node, gpu, uuid, model"
        recorded = f"{pricing.DEVICE_UNALLOCATED}[{span}]"
        dollars = prometheus.query(f"sum by ({by}) (sum_over_time({recorded}))", at=end)
        counts = prometheus.query(f"sum by (uuid) (count_over_time({recorded}))", at=end)
        seconds = {s.labels.get("uuid", ""): s.value * rules_interval_seconds for s in counts}
        unallocated = [
            (s.labels, s.value * rules_interval_seconds / 3600.0, seconds.get(s.labels["uuid"], 0))
            for s in dollars
            if s.value > 0 and "uuid" in s.labels
        ]
    items = summarise(
        spells,
        window_start=start,
        window_end=end,
        step_seconds=step,
        prices=prices,
        memory=memory,
    )
    return IdleReport(start, end, step, items, spells, unallocated)
