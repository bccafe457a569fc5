"""Optimisation suggestions from usage figures: which pods fit a smaller MIG profile, which
share GPUs, what each saves a month, and how the savings add up."""

from __future__ import annotations

import dataclasses

import pytest

from analytics import optimize
from analytics.pricing import parse_pricing

A100 = "NVIDIA A100-SXM4-80GB"
PRICING = parse_pricing({"models": {A100: 3.5, "NVIDIA L4": 0.75}})
GB = 1e9


def holding(**changes: object) -> optimize.Holding:
    base = optimize.Holding(
        namespace="ml",
        pod="server",
        team="nlp",
        node="n1",
        uuid="GPU-1",
        model=A100,
        mig_profile="",
        mig_uuid="",
        holders=1,
        held_fraction=1.0,
        peak_memory=7 * GB,
        p95_activity=0.1,
        memory_total=85.1 * GB,  # an 80 GB A100 as NVML reports it
        price_per_hour=3.5,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "target"),
    [
        ({}, "1g.10gb"),  # 7 GB x 1.2 fits 10 GB; 10% x 1.2 of a GPU fits 1/7
        ({"p95_activity": 0.2}, "2g.20gb"),  # 24% of a GPU needs 2/7
        ({"peak_memory": 30 * GB}, "3g.40gb"),  # 36 GB needs a 40 GB profile
        ({"p95_activity": 0.7}, None),  # 84% of a GPU: nothing smaller fits
        ({"model": "NVIDIA L4", "memory_total": 24e9}, None),  # no MIG on an L4
        ({"holders": 3}, None),  # time-sliced: sharing already
        ({"peak_memory": None}, None),  # no reading, no suggestion
        # A 3g.40gb instance 20% busy uses 0.2 x 3/7 of the GPU: a 1g.10gb takes it.
        ({"mig_profile": "3g.40gb", "mig_uuid": "MIG-1", "p95_activity": 0.2}, "1g.10gb"),
        ({"mig_profile": "1g.10gb", "mig_uuid": "MIG-1"}, None),  # already the smallest
    ],
)
def test_smaller_profile_fits_peak_memory_and_activity_with_headroom(
    changes: dict[str, object], target: str | None
) -> None:
    assert optimize.smaller_profile(holding(**changes), headroom=0.2) == target


def test_rightsize_saving_is_the_price_difference_over_a_month() -> None:
    (found,) = optimize.rightsize_suggestions([holding()], PRICING, headroom=0.2)
    assert found["targetProfile"] == "1g.10gb"
    assert found["estimatedMonthlySavings"] == pytest.approx((3.5 - 3.5 / 7) * 730, abs=0.01)
    assert found["confidence"] == "high"


def test_consolidation_packs_quiet_pods_onto_fewer_gpus() -> None:
    quiet = [holding(pod=f"q{i}", uuid=f"GPU-{i}", peak_memory=12 * GB) for i in range(4)]
    busy = holding(pod="busy", uuid="GPU-9", p95_activity=0.6)
    short_lived = holding(pod="new", uuid="GPU-8", held_fraction=0.3)
    (found,) = optimize.consolidate_suggestions([*quiet, busy, short_lived])
    assert sorted(found["pods"]) == ["ml/q0", "ml/q1", "ml/q2", "ml/q3"]
    assert found["evidence"]["sharedGpus"] == 1  # 4 x 10% activity, 4 x 14% memory
    assert found["estimatedMonthlySavings"] == pytest.approx(3 * 3.5 * 730)


def test_potential_savings_counts_each_pod_once_and_stays_unknown_when_unpriced() -> None:
    release = {"type": "release", "namespace": "ml", "pod": "a", "estimatedMonthlySavings": 100.0}
    resize = {"type": "right-size", "namespace": "ml", "pod": "a", "estimatedMonthlySavings": 40.0}
    group = {"type": "consolidate", "pods": ["ml/b", "ml/c"], "estimatedMonthlySavings": 25.0}
    assert optimize.potential_savings([release, resize, group]) == 125.0
    unpriced = {**release, "estimatedMonthlySavings": None}
    assert optimize.potential_savings([unpriced]) is None
    assert optimize.potential_savings([]) == 0.0
