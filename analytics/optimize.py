"""Optimisation suggestions: the savings idle detection and the usage figures point to.

Three kinds, each with its estimated monthly saving (from the pricing), the evidence and a
confidence:

- **release**: a pod holds a GPU or MIG slice that sat idle for much of the window;
- **right-size**: a pod's peak memory and activity over the window, with headroom, fit a
  smaller MIG profile of its GPU model (moving a whole GPU or a larger slice onto it);
- **consolidate**: long-running low-activity pods on whole GPUs of one model that would fit,
  together, on fewer GPUs shared by time-slicing.

`potentialMonthlySavings` in the cost analysis is the sum of the suggestions' savings; a pod
in several suggestions counts once, with its largest saving. Pure functions; no Flask.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from analytics import idle
from analytics.pricing import MIG_SLICES, Pricing, compute_slices
from analytics.sources import RuleInputs

HOURS_PER_MONTH = idle.HOURS_PER_MONTH
DEFAULT_HEADROOM = 0.2
#: Consolidation candidates: p95 activity and peak memory under these shares of one GPU, held
#: for most of the window, packed so each shared GPU stays under PACK_LIMIT of both.
CONSOLIDATE_ACTIVITY = 0.3
CONSOLIDATE_MEMORY = 0.4
LONG_RUNNING = 0.8
PACK_LIMIT = 0.8
#: A release suggestion needs the device idle for at least this part of the window.
RELEASE_MIN_IDLE = 0.25

#: MIG profiles (compute slices, memory GB in the name) by the GPU's memory class in GB.
MIG_PROFILES: dict[int, tuple[str, ...]] = {
    40: ("1g.5gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"),
    80: ("1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    94: ("1g.12gb", "2g.24gb", "3g.47gb", "4g.47gb", "7g.94gb"),
    141: ("1g.18gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"),
}
_MIG_CAPABLE = re.compile(r"A100|A30|H100|H200|H20|B200|GB200|B100", re.IGNORECASE)
_PROFILE_MEMORY = re.compile(r"(?:^|\.)(\d+)gb$")


@dataclass(frozen=True)
class Holding:
    """One pod on one device over the window, with the device's usage figures."""

    namespace: str
    pod: str
    team: str | None
    node: str
    uuid: str
    model: str
    mig_profile: str  # "" for a whole GPU
    mig_uuid: str
    holders: int  # pods sharing the device now
    held_fraction: float  # of the window
    peak_memory: float | None  # bytes
    p95_activity: float | None  # 0-1 of the device (GPU or instance)
    memory_total: float | None  # bytes of the whole GPU
    price_per_hour: float | None  # the device's $/h (whole GPU or instance)


def memory_class(total_bytes: float | None, model: str) -> int | None:
    """The MIG memory class (40, 80, 94, 141 GB) of a GPU, by its size or its name."""
    if total_bytes:
        gb = total_bytes / 1e9
        best = min(MIG_PROFILES, key=lambda c: abs(c - gb))
        return best if abs(best - gb) / best < 0.15 else None
    found = re.search(r"(\d+)\s*GB", model, re.IGNORECASE)
    return int(found.group(1)) if found and int(found.group(1)) in MIG_PROFILES else None


def profile_memory_bytes(profile: str) -> float | None:
    """The memory of a MIG profile from its name (`3g.40gb` -> 40 GB)."""
    found = _PROFILE_MEMORY.search(profile)
    return float(found.group(1)) * 1e9 if found else None


def smaller_profile(h: Holding, headroom: float) -> str | None:
    """The smallest MIG profile of the pod's GPU model that its peak memory and p95 activity
    fit with `headroom`, if smaller than what it holds now."""
    if h.holders > 1 or h.peak_memory is None or h.p95_activity is None:
        return None
    if not _MIG_CAPABLE.search(h.model):
        return None
    current = MIG_SLICES if not h.mig_profile else compute_slices(h.mig_profile)
    profiles = MIG_PROFILES.get(memory_class(h.memory_total, h.model) or 0)
    if current is None or profiles is None:
        return None
    # Activity as a share of the whole GPU: an instance's activity scales by its slices.
    gpu_share = h.p95_activity * current / MIG_SLICES
    for profile in profiles:
        slices = compute_slices(profile)
        memory = profile_memory_bytes(profile)
        if slices is None or memory is None or slices >= current:
            continue
        if h.peak_memory * (1 + headroom) <= memory and gpu_share * (1 + headroom) <= (
            slices / MIG_SLICES
        ):
            return profile
    return None


def _confidence(score: float) -> str:
    return "high" if score >= 0.8 else "medium" if score >= 0.5 else "low"


def release_suggestions(
    items: Sequence[idle.IdleItem],
    window_seconds: float,
    held_seconds: Mapping[tuple[str, str, str], float] | None = None,
) -> list[dict[str, Any]]:
    """Release devices pods hold and do not use: idle for at least RELEASE_MIN_IDLE of the
    time they held them in the window (`held_seconds` by (namespace, pod, device); the whole
    window where unknown)."""
    out = []
    for item in items:
        labels = item.labels
        key = (str(labels["namespace"]), str(labels["pod"]), str(labels["device"]))
        held = (held_seconds or {}).get(key, window_seconds)
        held = max(held, item.idle_seconds)
        fraction = min(item.idle_seconds / held, 1.0) if held else 0.0
        if fraction < RELEASE_MIN_IDLE:
            continue
        saving = idle.monthly_saving(item, held)
        out.append(
            {
                "type": "release",
                "namespace": labels["namespace"],
                "pod": labels["pod"],
                "team": labels["team"],
                "deviceId": labels["device"],
                "model": labels["model"] or None,
                "migProfile": labels["mig_profile"] or None,
                "action": (
                    f"release the {'MIG slice' if labels['mig_uuid'] else 'GPU'} held by "
                    f"{labels['namespace']}/{labels['pod']}: idle "
                    f"{fraction:.0%} of the time it held it"
                ),
                "estimatedMonthlySavings": None if saving is None else round(saving, 2),
                "confidence": _confidence(fraction if item.idle_now else fraction * 0.7),
                "evidence": {
                    "idleFraction": round(fraction, 4),
                    "idleHours": round(item.idle_seconds / 3600, 3),
                    "idleNow": item.idle_now,
                    "maxActivity": round(item.max_activity, 4),
                    "memoryHeldBytes": item.memory_bytes,
                },
            }
        )
    return out


def rightsize_suggestions(
    holdings: Sequence[Holding], pricing: Pricing | None, headroom: float
) -> list[dict[str, Any]]:
    """Move pods whose peak use fits a smaller MIG profile onto it."""
    out = []
    for h in holdings:
        target = smaller_profile(h, headroom)
        if target is None:
            continue
        saving: float | None = None
        new_price = pricing.mig_price(h.model, target) if pricing is not None else None
        if h.price_per_hour is not None and new_price is not None:
            saving = max(h.price_per_hour - new_price, 0.0) * HOURS_PER_MONTH
        current = h.mig_profile or "a whole GPU"
        out.append(
            {
                "type": "right-size",
                "namespace": h.namespace,
                "pod": h.pod,
                "team": h.team,
                "deviceId": h.mig_uuid or h.uuid,
                "model": h.model,
                "migProfile": h.mig_profile or None,
                "targetProfile": target,
                "action": f"move {h.namespace}/{h.pod} from {current} to a {target} MIG slice",
                "estimatedMonthlySavings": None if saving is None else round(saving, 2),
                "confidence": _confidence(h.held_fraction),
                "evidence": {
                    "peakMemoryBytes": h.peak_memory,
                    "p95Activity": None if h.p95_activity is None else round(h.p95_activity, 4),
                    "headroom": headroom,
                    "heldFraction": round(h.held_fraction, 4),
                },
            }
        )
    return out


def consolidate_suggestions(holdings: Sequence[Holding]) -> list[dict[str, Any]]:
    """Pack long-running low-activity pods on whole GPUs of one model onto fewer, shared GPUs
    (first-fit decreasing by activity; each shared GPU under PACK_LIMIT of compute and memory)."""
    by_model: dict[str, list[Holding]] = {}
    for h in holdings:
        if (
            h.mig_profile
            or h.holders > 1
            or h.held_fraction < LONG_RUNNING
            or h.p95_activity is None
            or h.peak_memory is None
            or not h.memory_total
            or h.p95_activity >= CONSOLIDATE_ACTIVITY
            or h.peak_memory / h.memory_total >= CONSOLIDATE_MEMORY
        ):
            continue
        by_model.setdefault(h.model, []).append(h)
    out = []
    for model, pods in sorted(by_model.items()):
        if len(pods) < 2:
            continue
        bins: list[list[Holding]] = []
        loads: list[tuple[float, float]] = []
        for h in sorted(pods, key=lambda p: (-(p.p95_activity or 0.0), p.namespace, p.pod)):
            activity = h.p95_activity or 0.0
            memory = (h.peak_memory or 0.0) / (h.memory_total or 1.0)
            for index, (a, m) in enumerate(loads):
                if a + activity <= PACK_LIMIT and m + memory <= PACK_LIMIT:
                    bins[index].append(h)
                    loads[index] = (a + activity, m + memory)
                    break
            else:
                bins.append([h])
                loads.append((activity, memory))
        freed = len(pods) - len(bins)
        if freed <= 0:
            continue
        prices = [h.price_per_hour for h in pods if h.price_per_hour is not None]
        saving = (sum(prices) / len(prices)) * freed * HOURS_PER_MONTH if prices else None
        held = min(h.held_fraction for h in pods)
        out.append(
            {
                "type": "consolidate",
                "model": model,
                "pods": [f"{h.namespace}/{h.pod}" for h in pods],
                "action": (
                    f"share {len(bins)} {model} GPUs by time-slicing among {len(pods)} pods "
                    f"that each use little of one (frees {freed} GPUs)"
                ),
                "estimatedMonthlySavings": None if saving is None else round(saving, 2),
                "confidence": _confidence(held * 0.8),
                "evidence": {
                    "pods": len(pods),
                    "sharedGpus": len(bins),
                    "maxP95Activity": round(max(h.p95_activity or 0.0 for h in pods), 4),
                    "packing": [[f"{h.namespace}/{h.pod}" for h in b] for b in bins],
                },
            }
        )
    return out


def potential_savings(suggestions: Sequence[Mapping[str, Any]]) -> float | None:
    """The suggestions' monthly savings, each pod counted once (its largest saving).

    None when no suggestion has a priced saving (unknown, not zero); 0.0 when there are no
    suggestions at all.
    """
    if not suggestions:
        return 0.0
    per_pod: dict[str, float] = {}
    group_total = 0.0
    priced = False
    for s in suggestions:
        saving = s.get("estimatedMonthlySavings")
        if saving is None or not math.isfinite(saving):
            continue
        priced = True
        if "pod" in s:
            key = f"{s['namespace']}/{s['pod']}"
            per_pod[key] = max(per_pod.get(key, 0.0), saving)
        else:
            group_total += saving
    return round(sum(per_pod.values()) + group_total, 2) if priced else None


def gather_holdings(
    prometheus: Any,
    inputs: RuleInputs,
    *,
    start: float,
    end: float,
    team_label: str,
    rules_interval_seconds: float,
) -> list[Holding]:
    """Every pod holding a device at `end`, with the device's peak memory, p95 activity, size
    and price over (start, end]. Eight instant queries whatever the fleet size."""
    from analytics import pricing

    seconds = int(end - start)
    span = f"{seconds * 1000 - 1}ms"
    held = prometheus.query(
        f"count_over_time({pricing.POD_DEVICES}[{span}]) and {pricing.POD_DEVICES}", at=end
    )
    holders: dict[str, int] = {}
    for sample in held:
        key = sample.labels.get("mig_uuid") or sample.labels.get("uuid", "")
        holders[key] = holders.get(key, 0) + 1

    def by_key(query: str) -> dict[str, float]:
        return {
            (s.labels.get("mig_uuid") or s.labels.get("uuid", "")): s.value
            for s in prometheus.query(query, at=end)
        }

    peak: dict[str, float] = {}
    p95: dict[str, float] = {}
    for kind in ("whole", "mig"):
        peak |= by_key(inputs.memory(kind, "max_over_time", span))
        p95 |= by_key(inputs.activity(kind, "quantile_over_time", span, param="0.95"))
    totals = by_key(inputs.memory_total())
    prices = by_key(
        f"max by (uuid) ({pricing.DEVICE_PRICE}) or max by (mig_uuid) ({pricing.MIG_PRICE})"
    )
    out = []
    for sample in held:
        labels = sample.labels
        uuid, mig_uuid = labels.get("uuid", ""), labels.get("mig_uuid", "")
        key = mig_uuid or uuid
        out.append(
            Holding(
                namespace=labels.get("namespace", ""),
                pod=labels.get("pod", ""),
                team=labels.get(team_label) or None,
                node=labels.get("node", ""),
                uuid=uuid,
                model=labels.get("model", ""),
                mig_profile=labels.get("mig_profile", ""),
                mig_uuid=mig_uuid,
                holders=holders.get(key, 1),
                held_fraction=min(sample.value * rules_interval_seconds / seconds, 1.0),
                peak_memory=peak.get(key),
                p95_activity=p95.get(key),
                memory_total=totals.get(uuid),
                price_per_hour=prices.get(key),
            )
        )
    out.sort(key=lambda h: (h.namespace, h.pod, h.mig_uuid or h.uuid))
    return out


def suggestions(
    idle_items: Sequence[idle.IdleItem],
    holdings: Sequence[Holding],
    *,
    window_seconds: float,
    pricing: Pricing | None,
    headroom: float = DEFAULT_HEADROOM,
) -> list[dict[str, Any]]:
    """All suggestions, largest saving first. A pod told to release its device is not also
    told to resize it or share it."""
    held = {
        (h.namespace, h.pod, h.mig_uuid or h.uuid): h.held_fraction * window_seconds
        for h in holdings
    }
    released = release_suggestions(idle_items, window_seconds, held)
    gone = {(s["namespace"], s["pod"], s["deviceId"]) for s in released}
    rest = [h for h in holdings if (h.namespace, h.pod, h.mig_uuid or h.uuid) not in gone]
    found = [*released, *rightsize_suggestions(rest, pricing, headroom)]
    found += consolidate_suggestions(rest)
    found.sort(key=lambda s: (-(s["estimatedMonthlySavings"] or 0.0), s["type"]))
    return found
