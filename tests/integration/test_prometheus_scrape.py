"""A real Prometheus scrapes two simulated exporters; PromQL answers equal the ground truth.

Both exporters run with ``--simulate-time``, which freezes the simulated clock, so every value
is constant and can be compared exactly with what ``exporter.simulator`` computes for that
instant in this process. The fleet (``tests/fleets/integration.yaml``) has a fully
partitioned MIG GPU, a MIG-enabled GPU with no instances, MIG-disabled GPUs and a
seven-way split H100.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exporter.simulator import load_fleet
from exporter.simulator.fleet import Fleet, SimGpu
from exporter.simulator.models import remaining_capacity

FLEET_PATH = Path(__file__).resolve().parents[1] / "fleets" / "integration.yaml"
NODES = ("mig-node", "mixed-node")
# 2024-06-01 12:00:00 UTC; any instant works, a fixed one keeps failures reproducible.
SIM_TIME = 1_717_243_200.0
MIB = 1024 * 1024
DEVICE_LABELS = ("node", "gpu", "uuid", "model", "pci_bus_id")

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    """Prometheus, the exporters it scrapes, and the fleet they simulate."""

    prometheus: Any
    exporters: dict[str, Any]
    fleet: Fleet

    def gpus(self) -> list[tuple[str, SimGpu]]:
        return [(node, gpu) for node in NODES for gpu in self.fleet.nodes[node].gpus]

    def values(self, promql: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Instant query as {label values for ``keys``: value}; fails on duplicate keys."""
        out: dict[tuple[str, ...], float] = {}
        for sample in self.prometheus.query(promql):
            key = tuple(sample["metric"].get(k, "") for k in keys)
            assert key not in out, f"{promql}: two series for {dict(zip(keys, key, strict=True))}"
            out[key] = float(sample["value"][1])
        return out


@pytest.fixture(scope="module")
def stack(
    module_prometheus: Callable[..., Any], module_exporter_process: Callable[..., Any]
) -> Stack:
    fleet = load_fleet(FLEET_PATH)
    assert set(NODES) <= set(fleet.nodes)
    exporters = {
        node: module_exporter_process(
            node, fleet=FLEET_PATH, extra_args=["--simulate-time", str(SIM_TIME)]
        )
        for node in NODES
    }
    prometheus = module_prometheus([e.address for e in exporters.values()], scrape_interval="1s")
    # Each exporter has read its frozen instant before /healthz answered, so one successful
    # scrape of each target holds everything the tests ask about.
    prometheus.wait_for_targets_up(len(exporters), timeout=30)
    return Stack(prometheus, exporters, fleet)


def by_gpu(node: str, gpu: SimGpu) -> tuple[str, str]:
    return (node, str(gpu.index))


def assert_same_series(got: dict[tuple[str, ...], float], expected: dict[Any, float]) -> None:
    """The same label sets first (a readable diff of missing and extra series), then values."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert (missing, extra) == ([], []), f"missing series: {missing}; unexpected: {extra}"
    assert got == pytest.approx(expected)


def test_gpu_info_has_one_series_per_gpu_with_identity_labels(stack: Stack) -> None:
    got = {
        tuple(sample["metric"][label] for label in DEVICE_LABELS)
        for sample in stack.prometheus.query("gpu_info == 1")
    }
    expected = {
        (node, str(gpu.index), gpu.uuid, gpu.model.name, gpu.pci_bus_id)
        for node, gpu in stack.gpus()
    }
    assert got == expected
    assert len(stack.prometheus.query("gpu_info")) == len(expected)


def test_every_gpu_is_up(stack: Stack) -> None:
    up = stack.values("gpu_up", "node", "gpu")
    assert up == {by_gpu(node, gpu): 1.0 for node, gpu in stack.gpus()}


def test_memory_total_is_the_models_memory(stack: Stack) -> None:
    total = stack.values("gpu_memory_total_bytes", "node", "gpu")
    assert total == {
        by_gpu(node, gpu): float(gpu.model.memory_mib * MIB) for node, gpu in stack.gpus()
    }


def test_mig_info_has_one_series_per_instance_with_its_profile(stack: Stack) -> None:
    samples = stack.prometheus.query("gpu_mig_info")
    got = {
        (
            s["metric"]["node"],
            s["metric"]["gpu"],
            s["metric"]["gpu_instance"],
            s["metric"]["compute_instance"],
            s["metric"]["mig_profile"],
            s["metric"]["mig_uuid"],
        )
        for s in samples
    }
    expected = {
        (
            node,
            str(gpu.index),
            str(inst.gpu_instance_id),
            str(inst.compute_instance_id),
            inst.profile.key,
            inst.uuid,
        )
        for node, gpu in stack.gpus()
        for inst in gpu.mig or ()
    }
    assert got == expected
    assert len(samples) == len(expected)
    per_node = Counter((s["metric"]["node"], s["metric"]["mig_profile"]) for s in samples)
    assert per_node == Counter(
        {
            ("mig-node", "3g.40gb"): 1,
            ("mig-node", "2g.20gb"): 1,
            ("mig-node", "1g.10gb"): 2,
            ("mixed-node", "1g.10gb"): 7,
        }
    )


def test_utilization_is_absent_on_mig_enabled_gpus_and_true_elsewhere(stack: Stack) -> None:
    utilization = stack.values("gpu_utilization_ratio", "node", "gpu")
    expected = {
        by_gpu(node, gpu): stack.fleet.gpu_state(node, gpu.index, SIM_TIME).utilization_gpu / 100
        for node, gpu in stack.gpus()
        if not gpu.mig_enabled
    }
    assert_same_series(utilization, expected)
    # No MIG-instance series leaks into the device-level utilization either.
    assert stack.prometheus.query('gpu_utilization_ratio{mig_uuid!=""}') == []


# Ground truth per series, converted here from NVML units (mW, mJ, MHz, KiB/s).
DEVICE_TRUTH: dict[str, Callable[[Any], float]] = {
    "gpu_temperature_celsius": lambda s: float(s.temperature_c),
    "gpu_memory_used_bytes": lambda s: float(s.memory_used),
    "gpu_memory_free_bytes": lambda s: float(s.memory_free),
    "gpu_power_watts": lambda s: s.power_mw / 1000,
    "gpu_power_limit_watts": lambda s: s.power_limit_mw / 1000,
    "gpu_energy_joules_total": lambda s: s.energy_mj / 1000,
    'gpu_clock_hertz{clock="sm"}': lambda s: s.sm_clock_mhz * 1e6,
    'gpu_clock_hertz{clock="memory"}': lambda s: s.mem_clock_mhz * 1e6,
    "gpu_performance_state": lambda s: float(s.pstate),
    'gpu_pcie_throughput_bytes_per_second{direction="tx"}': lambda s: s.pcie_tx_kbps * 1024,
    'gpu_pcie_throughput_bytes_per_second{direction="rx"}': lambda s: s.pcie_rx_kbps * 1024,
}


@pytest.mark.parametrize("metric", DEVICE_TRUTH)
def test_device_values_equal_the_simulators_ground_truth(stack: Stack, metric: str) -> None:
    truth = DEVICE_TRUTH[metric]
    got = stack.values(metric, "node", "gpu")
    expected = {
        by_gpu(node, gpu): truth(stack.fleet.gpu_state(node, gpu.index, SIM_TIME))
        for node, gpu in stack.gpus()
    }
    assert_same_series(got, expected)


def test_mig_memory_equals_the_simulators_ground_truth(stack: Stack) -> None:
    used = stack.values("gpu_mig_memory_used_bytes", "node", "gpu", "gpu_instance")
    total = stack.values("gpu_mig_memory_total_bytes", "node", "gpu", "gpu_instance")
    expected_used = {}
    expected_total = {}
    for node, gpu in stack.gpus():
        for inst in gpu.mig or ():
            key = (node, str(gpu.index), str(inst.gpu_instance_id))
            state = stack.fleet.mig_state(node, gpu.index, inst.gpu_instance_id, SIM_TIME)
            expected_used[key] = float(state.memory_used)
            expected_total[key] = float(state.memory_total)
    assert_same_series(used, expected_used)
    assert_same_series(total, expected_total)


def test_mig_capacity_counts_match_the_layout(stack: Stack) -> None:
    instances = stack.values("gpu_mig_instances", "node", "gpu", "mig_profile")
    capacity = stack.values("gpu_mig_instance_capacity", "node", "gpu", "mig_profile")
    available = stack.values("gpu_mig_instances_available", "node", "gpu", "mig_profile")
    exp_instances: dict[tuple[str, ...], float] = {}
    exp_capacity: dict[tuple[str, ...], float] = {}
    exp_available: dict[tuple[str, ...], float] = {}
    for node, gpu in stack.gpus():
        if not gpu.mig_enabled:
            continue
        layout = Counter(inst.profile.key for inst in gpu.mig or ())
        placements = [inst.placement for inst in gpu.mig or ()]
        for profile in gpu.model.mig_profiles:
            key = (node, str(gpu.index), profile.key)
            exp_instances[key] = float(layout[profile.key])
            exp_capacity[key] = float(profile.instance_count)
            exp_available[key] = float(remaining_capacity(profile, placements))
    # Profiles with no instance may be left out of gpu_mig_instances; where present, they are 0.
    assert {k: v for k, v in instances.items() if v} == {
        k: v for k, v in exp_instances.items() if v
    }
    assert set(instances) <= set(exp_instances)
    assert capacity == exp_capacity
    assert available == exp_available
    # The full A100 has room for nothing; the empty one for everything.
    assert all(v == 0 for k, v in available.items() if k[:2] == ("mig-node", "0"))
    assert {k[2]: v for k, v in available.items() if k[:2] == ("mig-node", "1")} == {
        k[2]: v for k, v in capacity.items() if k[:2] == ("mig-node", "1")
    }


def test_every_collector_succeeds(stack: Stack) -> None:
    success = stack.values("gpu_exporter_collector_success", "node", "collector")
    assert success, "no gpu_exporter_collector_success series"
    assert {node for node, _ in success} == set(NODES)
    assert {k: v for k, v in success.items() if v != 1} == {}


@pytest.mark.parametrize("node", NODES)
def test_exposition_passes_promtool_check_metrics(stack: Stack, promtool: str, node: str) -> None:
    body = stack.exporters[node].metrics_text()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    problems = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, problems
    assert problems == ""
