"""The exporter's metrics, read through pynvml from the simulated driver."""

from __future__ import annotations

import pytest

from exporter.catalogue import CATALOGUE
from tests.unit.exporter_harness import T0, fleet_document, one, running_node, select

H100_MIG, A100_MIG, H100, L4, A100 = "0", "1", "2", "3", "4"


def test_every_catalogue_family_is_published_where_the_hardware_has_it() -> None:
    document = fleet_document()
    document["nodes"][0]["faults"] = [{"gpu": 2, "kind": "xid", "xid": 48, "at": 1}]
    with running_node(document) as node:
        node.cycle()
        series = node.cycle(advance=5)
    published = {name for name, _ in series}
    # Retired pages are pre-Ampere only; these boards remap rows instead (NVML: NOT_SUPPORTED).
    # Fans: SXM and L4 boards are passively cooled.
    absent_by_design = {"gpu_retired_pages", "gpu_fan_speed_ratio"}
    # This node has no Kubernetes around it: test_exporter_attribution covers those families.
    kubernetes = {
        name
        for name, spec in CATALOGUE.items()
        if spec.group in ("process", "allocation") or "attribution" in name
    }
    expected = set(CATALOGUE) - absent_by_design - kubernetes
    assert expected <= published, f"missing: {sorted(expected - published)}"
    assert not absent_by_design & published


def test_whole_gpu_values_equal_what_the_driver_reports() -> None:
    with running_node() as node:
        series = node.cycle()
        truth = node.driver.gpu_state(int(H100), T0)
    labels = {"gpu": H100}
    assert one(series, "gpu_utilization_ratio", **labels) == truth.utilization_gpu / 100
    assert one(series, "gpu_memory_utilization_ratio", **labels) == truth.utilization_memory / 100
    assert one(series, "gpu_memory_used_bytes", **labels) == truth.memory_used
    assert one(series, "gpu_memory_free_bytes", **labels) == truth.memory_free
    assert one(series, "gpu_memory_total_bytes", **labels) == truth.memory_total
    assert one(series, "gpu_temperature_celsius", **labels) == truth.temperature_c
    assert one(series, "gpu_power_watts", **labels) == truth.power_mw / 1000
    assert one(series, "gpu_power_limit_watts", **labels) == truth.power_limit_mw / 1000
    assert one(series, "gpu_energy_joules_total", **labels) == truth.energy_mj / 1000
    assert one(series, "gpu_clock_hertz", clock="sm", **labels) == truth.sm_clock_mhz * 1e6
    assert one(series, "gpu_clock_hertz", clock="memory", **labels) == truth.mem_clock_mhz * 1e6
    assert one(series, "gpu_performance_state", **labels) == truth.pstate
    tx = one(series, "gpu_pcie_throughput_bytes_per_second", direction="tx", **labels)
    assert tx == truth.pcie_tx_kbps * 1024
    idle = one(series, "gpu_clock_event_reason_active", reason="gpu_idle", **labels)
    assert idle == float(bool(truth.clocks_event_reasons & 0x1))
    assert one(series, "gpu_nvlink_transmitted_bytes_total", **labels) == truth.nvlink_tx_kib * 1024
    info = select(series, "gpu_info", **labels)
    (info_labels,) = info
    assert dict(info_labels)["model"] == "NVIDIA H100 80GB HBM3"
    assert dict(info_labels)["mig_mode"] == "disabled"
    assert dict(info_labels)["uuid"] == truth.uuid


def test_device_labels_identify_each_gpu_on_every_series() -> None:
    with running_node() as node:
        series = node.cycle()
    for (name, labels), _ in series.items():
        if CATALOGUE[name].labels[:5] == ("node", "gpu", "uuid", "model", "pci_bus_id"):
            keys = dict(labels)
            assert {"node", "gpu", "uuid", "model", "pci_bus_id"} <= keys.keys(), name
            assert keys["node"] == "unit-node"


def test_mig_instances_are_enumerated_with_profiles_ids_and_memory() -> None:
    with running_node() as node:
        series = node.cycle()
        states = {gi: node.driver.mig_state(int(H100_MIG), gi, T0) for gi in range(7, 14)}
    instances = select(series, "gpu_mig_info", gpu=H100_MIG)
    assert len(instances) == 7
    assert {dict(k)["mig_profile"] for k in instances} == {"1g.10gb"}
    by_gi = {dict(k)["gpu_instance"]: dict(k) for k in instances}
    for labels in by_gi.values():
        state = states[int(labels["gpu_instance"])]
        assert labels["mig_uuid"] == state.uuid
        assert labels["compute_instance"] == str(state.compute_instance_id)
        used = one(series, "gpu_mig_memory_used_bytes", mig_uuid=state.uuid)
        assert used == state.memory_used
        assert one(series, "gpu_mig_memory_total_bytes", mig_uuid=state.uuid) == state.memory_total
    a100 = select(series, "gpu_mig_info", gpu=A100_MIG)
    assert sorted(dict(k)["mig_profile"] for k in a100) == ["3g.40gb", "4g.40gb"]


def test_utilization_is_omitted_on_mig_gpus_never_reported_as_zero() -> None:
    with running_node() as node:
        series = node.cycle()
    for gpu in (H100_MIG, A100_MIG):
        assert not select(series, "gpu_utilization_ratio", gpu=gpu)
        assert not select(series, "gpu_encoder_utilization_ratio", gpu=gpu)
        assert one(series, "gpu_up", gpu=gpu) == 1
    assert select(series, "gpu_utilization_ratio", gpu=A100)


def test_mig_activity_comes_from_gpm_on_hopper_and_is_absent_on_ampere() -> None:
    with running_node() as node:
        first = node.cycle()
        second = node.cycle(advance=10)
        expected = node.driver.node  # keep a reference for the fleet below
        fleet = node.driver.fleet
    del expected
    # GPM needs two samples: nothing after the first cycle, a value after the second.
    assert not select(first, "gpu_mig_sm_activity_ratio")
    hopper = select(second, "gpu_mig_sm_activity_ratio", gpu=H100_MIG)
    assert len(hopper) == 7
    for labels, value in hopper.items():
        gi = int(dict(labels)["gpu_instance"])
        metrics = fleet.gpm_metrics("unit-node", int(H100_MIG), gi, T0, T0 + 10)
        assert value == pytest.approx(metrics[2] / 100)  # NVML_GPM_METRIC_SM_UTIL
    assert not select(second, "gpu_mig_sm_activity_ratio", gpu=A100_MIG)
    assert select(second, "gpu_sm_activity_ratio", gpu=H100)
    assert not select(second, "gpu_sm_activity_ratio", gpu=A100)


def test_mig_capacity_counts_follow_the_layout() -> None:
    with running_node() as node:
        series = node.cycle()
    full = {"gpu": H100_MIG, "mig_profile": "1g.10gb"}
    assert one(series, "gpu_mig_instances", **full) == 7
    assert one(series, "gpu_mig_instance_capacity", **full) == 7
    assert one(series, "gpu_mig_instances_available", **full) == 0
    three = {"gpu": A100_MIG, "mig_profile": "3g.40gb"}
    assert one(series, "gpu_mig_instances", **three) == 1
    assert one(series, "gpu_mig_instance_capacity", **three) == 2
    assert one(series, "gpu_mig_instances_available", **three) == 0
    # Whole GPUs publish no MIG capacity.
    assert not select(series, "gpu_mig_instance_capacity", gpu=A100)


def test_not_supported_values_are_omitted_and_counted_once_per_gpu() -> None:
    with running_node() as node:
        node.cycle()
        node.cycle(advance=5)
        series = node.cycle(advance=5)
    assert not select(series, "gpu_fan_speed_ratio")
    fan = one(
        series,
        "gpu_exporter_nvml_errors_total",
        function="nvmlDeviceGetFanSpeed",
        kind="not_supported",
    )
    assert fan == 5  # five GPUs, asked once each across three cycles


def test_a_failing_call_drops_only_its_value() -> None:
    document = fleet_document()
    document["nodes"][0]["faults"] = [
        {
            "gpu": 4,
            "kind": "error",
            "function": "nvmlDeviceGetPowerUsage",
            "error": "UNKNOWN",
            "at": 0,
        }
    ]
    with running_node(document) as node:
        node.cycle()
        series = node.cycle(advance=5)
    assert not select(series, "gpu_power_watts", gpu=A100)
    assert select(series, "gpu_temperature_celsius", gpu=A100)
    assert one(series, "gpu_up", gpu=A100) == 1
    errors = one(
        series,
        "gpu_exporter_nvml_errors_total",
        function="nvmlDeviceGetPowerUsage",
        kind="unknown",
    )
    assert errors == 2  # unknown errors are retried (and counted) every cycle


def test_xid_events_count_per_code_with_last_seen_time() -> None:
    document = fleet_document()
    document["nodes"][0]["faults"] = [
        {"gpu": 3, "kind": "xid", "xid": 13, "at": 30},
        {"gpu": 3, "kind": "xid", "xid": 13, "at": 40},
        {"gpu": 2, "kind": "xid", "xid": 48, "at": 40},
    ]
    with running_node(document) as node:
        before = node.cycle()
        after = node.cycle(advance=45)
        later = node.cycle(advance=10)
    assert not select(before, "gpu_xid_errors_total")
    assert one(after, "gpu_xid_errors_total", gpu=L4, xid="13") == 2
    assert one(after, "gpu_xid_errors_total", gpu=H100, xid="48") == 1
    assert one(after, "gpu_xid_last_seen_timestamp_seconds", gpu=L4, xid="13") == T0 + 45
    assert one(later, "gpu_xid_errors_total", gpu=L4, xid="13") == 2


def test_collectors_can_be_switched_off() -> None:
    with running_node(collectors=("device",)) as node:
        series = node.cycle()
    names = {name for name, _ in series}
    assert "gpu_utilization_ratio" in names
    assert "gpu_up" in names
    assert not any(n.startswith(("gpu_mig_", "gpu_nvlink_", "gpu_ecc_")) for n in names)
    success = select(series, "gpu_exporter_collector_success")
    assert {dict(k)["collector"] for k in success} == {"device"}
