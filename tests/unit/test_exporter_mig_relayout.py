"""MIG layouts changed at runtime (the MIG manager or `nvidia-smi mig` re-partitioning GPUs
under a running exporter): no crash, and after each change no series of an instance that is
gone, nor a value carried over from it."""

from __future__ import annotations

import logging
import random
import threading

import pytest

from exporter.simulator.models import place, remaining_capacity
from tests.unit.exporter_harness import Node, Series, running_node, select

RELAYOUTS = 100
#: GPUs of the unit node that can run MIG: 0 (H100, MIG on), 1 (A100, MIG on), 4 (A100, off).
MIG_GPUS = (0, 1, 4)


def random_layout(
    rng: random.Random, node: Node, gpu: int, mode_changes: bool = True
) -> list[str] | None:
    """A layout that fits: 0 to 7 instances, and now and then MIG disabled."""
    if mode_changes and rng.random() < 0.1:
        return None
    model = node.driver.node.gpus[gpu].model
    keys = [profile.key for profile in model.mig_profiles]
    layout: list[str] = []
    for _ in range(rng.randint(0, 7)):
        candidate = [*layout, rng.choice(keys)]
        if place(model, candidate) is not None:
            layout = candidate
    return layout


def mig_uuids(series: Series) -> set[str]:
    """Every MIG UUID any published series carries."""
    return {value for (_, labels) in series for key, value in labels if key == "mig_uuid" and value}


def check_matches_driver(node: Node, series: Series, new: set[str]) -> None:
    """The published MIG state is exactly the driver's, for every MIG-capable GPU."""
    truth: set[str] = set()
    for gpu in MIG_GPUS:
        sim = node.driver.node.gpus[gpu]
        labels = {"gpu": str(gpu)}
        (info,) = select(series, "gpu_info", **labels)
        assert dict(info)["mig_mode"] == ("enabled" if sim.mig is not None else "disabled")
        published = {dict(k)["mig_uuid"]: dict(k) for k in select(series, "gpu_mig_info", **labels)}
        expected = {m.uuid: m for m in sim.mig or ()}
        assert set(published) == set(expected), f"GPU {gpu}: stale or missing instances"
        for uuid, instance in expected.items():
            assert published[uuid]["gpu_instance"] == str(instance.gpu_instance_id)
            assert published[uuid]["mig_profile"] == instance.profile.key
        truth |= set(expected)
        if sim.mig is None:
            assert not select(series, "gpu_mig_instances", **labels)
            continue
        for profile in sim.model.mig_profiles:
            count = sum(1 for m in sim.mig if m.profile.key == profile.key)
            key = {"mig_profile": profile.key, **labels}
            assert select(series, "gpu_mig_instances", **key) == {
                k: float(count) for k in select(series, "gpu_mig_instances", **key)
            }
            (available,) = select(series, "gpu_mig_instances_available", **key).values()
            assert available == remaining_capacity(profile, [m.placement for m in sim.mig])
    assert mig_uuids(series) == truth, "a series names a MIG instance that no longer exists"
    # A new instance has no GPM activity yet: never a difference against its predecessor.
    for uuid in new:
        assert not select(series, "gpu_mig_sm_activity_ratio", mig_uuid=uuid)
    for (name, labels), value in series.items():
        if name == "gpu_exporter_collector_success":
            assert value == 1, f"collector {dict(labels)['collector']} failed"


def test_a_hundred_relayouts_leave_no_stale_series_and_no_carried_over_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(8)
    with caplog.at_level(logging.WARNING), running_node() as node:
        node.cycle()
        series = node.cycle(advance=5)
        for step in range(RELAYOUTS):
            gpu = MIG_GPUS[step % len(MIG_GPUS)]
            before = {m.uuid for m in node.driver.node.gpus[gpu].mig or ()}
            node.driver.set_mig_layout(gpu, random_layout(rng, node, gpu))
            after = {m.uuid for m in node.driver.node.gpus[gpu].mig or ()}
            series = node.cycle(advance=5)
            check_matches_driver(node, series, new=after - before)
            series = node.cycle(advance=5)  # and the next cycle has GPM for the new ones
            if node.driver.node.gpus[gpu].model.gpm:
                for uuid in after:
                    assert select(series, "gpu_mig_sm_activity_ratio", mig_uuid=uuid), uuid
        # GPM samples of destroyed instances were freed: one kept per live GPU instance.
        live_instances = sum(len(g.mig or ()) for g in node.driver.node.gpus)
        assert len(node.driver._gpm_samples) <= live_instances + len(node.driver.node.gpus)
    errors = select(series, "gpu_exporter_nvml_errors_total")
    assert not {dict(k)["kind"] for k in errors} - {"not_supported", "function_not_found"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_relayouts_racing_the_collection_cycle_never_crash_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Re-layouts land while GPUs are being read; a stale handle is an error, not a crash.

    MIG stays enabled here (after GPU 4's first layout): switching the mode takes a GPU
    reset, seconds on real hardware, never twice within one collection cycle.
    """
    rng = random.Random(9)
    stop = threading.Event()
    cycles = 0

    with caplog.at_level(logging.WARNING), running_node() as node:
        node.cycle()

        def collect() -> None:
            nonlocal cycles
            while not stop.is_set():
                node.exporter.run_cycle()
                cycles += 1

        collector = threading.Thread(target=collect)
        collector.start()
        try:
            for step in range(RELAYOUTS):
                gpu = MIG_GPUS[step % len(MIG_GPUS)]
                node.driver.set_mig_layout(gpu, random_layout(rng, node, gpu, False))
                stop.wait(0.003)
        finally:
            stop.set()
            collector.join(timeout=30)
        assert not collector.is_alive()
        settled = node.cycle(advance=5)
        check_matches_driver(node, settled, new=set())
    assert cycles >= 5, "the cycles did not overlap the re-layouts"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
