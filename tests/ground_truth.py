"""What a simulated fleet's GPUs cost, straight from the fleet file and the pricing file.

The ground truth the cost reports are held to: at time t, each Running pod pays for the
devices it holds (whole GPUs at the model's price, MIG instances at their profile's price),
a device held by several pods (time-slicing) split evenly between them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from analytics.pricing import load_pricing
from exporter.simulator.fleet import GPM_SM_UTIL, Fleet
from exporter.simulator.history import DEFAULT_GPM_INTERVAL
from exporter.simulator.pods import PodSpec, allocations_at, pods_at

REPO = Path(__file__).resolve().parents[1]
PRICING = REPO / "examples" / "pricing.yaml"


def by_namespace(pod: PodSpec) -> str:
    return pod.namespace


def expected_cost_per_hour(
    fleet: Fleet, node: str, t: float, key: Callable[[PodSpec], str] = by_namespace
) -> dict[str, float]:
    """$/h at t per key (namespace by default) of the devices Running pods hold."""
    return _per_key(fleet, node, t, key, gpu_equivalents=False)


def expected_gpu_equivalents(
    fleet: Fleet, node: str, t: float, key: Callable[[PodSpec], str] = by_namespace
) -> dict[str, float]:
    """GPUs held at t per key: 1 per whole GPU, k/7 per MIG instance, split between holders."""
    return _per_key(fleet, node, t, key, gpu_equivalents=True)


def expected_utilized_equivalents(
    fleet: Fleet, node: str, t: float, key: Callable[[PodSpec], str] = by_namespace
) -> dict[str, float]:
    """Busy GPUs at t per key: the GPU-equivalents held times the device's activity as the
    exporter reports it (GPU utilization for whole GPUs, GPM SM activity for MIG instances)."""
    return _per_key(fleet, node, t, key, gpu_equivalents=True, utilized=True)


def _activity(fleet: Fleet, node: str, gpu: int, gpu_instance: int | None, t: float) -> float:
    if gpu_instance is None:
        return fleet.gpu_state(node, gpu, t).utilization_gpu / 100
    gpm = fleet.gpm_metrics(node, gpu, gpu_instance, t - DEFAULT_GPM_INTERVAL, t)
    return gpm[GPM_SM_UTIL] / 100


def _per_key(
    fleet: Fleet,
    node: str,
    t: float,
    key: Callable[[PodSpec], str],
    *,
    gpu_equivalents: bool,
    utilized: bool = False,
) -> dict[str, float]:
    pricing = load_pricing(PRICING)
    sim = fleet.nodes[node]
    running = {(p.namespace, p.name): p for p in pods_at(fleet, node, t) if p.phase == "Running"}
    holders: dict[tuple[int, int | None], set[tuple[str, str]]] = defaultdict(set)
    for a in allocations_at(fleet, node, t):
        if (a.namespace, a.pod) in running:
            holders[(a.claim.gpu, a.claim.gpu_instance)].add((a.namespace, a.pod))
    cost: dict[str, float] = defaultdict(float)
    for (gpu, gi), pods in holders.items():
        g = sim.gpus[gpu]
        instance = g.instance(gi) if gi is not None else None
        price: float | None
        if gpu_equivalents:
            price = 1.0 if instance is None else instance.profile.slice_count / 7
        elif instance is None:
            price = pricing.device_price(g.model.name)
        else:
            price = pricing.mig_price(g.model.name, instance.profile.key)
        assert price is not None
        if utilized:
            price *= _activity(fleet, node, gpu, gi, t)
        for pod in pods:
            cost[key(running[pod])] += price / len(pods)
    return dict(cost)
