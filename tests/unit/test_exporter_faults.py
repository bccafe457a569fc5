"""How the exporter behaves when GPUs, NVML calls or the driver fail."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import threading
import time

import pytest

from tests.unit.exporter_harness import fleet_document, one, running_node, select

H100_MIG, A100_MIG, H100, L4, A100 = "0", "1", "2", "3", "4"


def test_a_lost_gpu_goes_down_while_the_others_keep_reporting() -> None:
    document = fleet_document()
    document["nodes"][0]["faults"] = [{"gpu": 2, "kind": "lost", "at": 60, "until": 180}]
    with running_node(document) as node:
        healthy = node.cycle()
        lost = node.cycle(advance=90)
        recovered = node.cycle(advance=120)
    assert one(healthy, "gpu_up", gpu=H100) == 1
    assert one(lost, "gpu_up", gpu=H100) == 0
    assert not select(lost, "gpu_temperature_celsius", gpu=H100)
    for other in (H100_MIG, A100_MIG, L4, A100):
        assert one(lost, "gpu_up", gpu=other) == 1
        assert select(lost, "gpu_temperature_celsius", gpu=other)
    assert len(select(lost, "gpu_mig_info", gpu=H100_MIG)) == 7
    assert one(lost, "gpu_exporter_nvml_errors_total", kind="gpu_lost") >= 1
    assert one(recovered, "gpu_up", gpu=H100) == 1
    assert select(recovered, "gpu_temperature_celsius", gpu=H100)


def test_a_hanging_call_marks_only_its_gpu_down_and_never_stalls_the_cycle() -> None:
    document = fleet_document()
    document["nodes"][0]["faults"] = [
        {"gpu": 4, "kind": "hang", "function": "nvmlDeviceGetPowerUsage", "at": 10, "until": 45}
    ]
    with running_node(document, nvml_timeout=0.3) as node:
        node.cycle()
        threads_before = threading.active_count()
        began = time.monotonic()
        hung = node.cycle(advance=20)
        first_hung_cycle = time.monotonic() - began
        began = time.monotonic()
        for _ in range(20):
            still_hung = node.cycle(advance=1)
        twenty_later_cycles = time.monotonic() - began
        threads_during = threading.active_count()
        node.clock.advance(10)  # past the hang window: the wedged call returns by itself
        time.sleep(0.5)
        back = node.cycle()
    assert first_hung_cycle < 1.0
    assert twenty_later_cycles < 2.0  # later cycles do not wait on the wedged GPU again
    assert threads_during <= threads_before + 1
    for series in (hung, still_hung):
        assert one(series, "gpu_up", gpu=A100) == 0
        for other in (H100_MIG, A100_MIG, H100, L4):
            assert one(series, "gpu_up", gpu=other) == 1
            assert select(series, "gpu_power_watts", gpu=other) or other in (H100_MIG, A100_MIG)
    timeouts = one(
        hung, "gpu_exporter_nvml_errors_total", function="nvmlDeviceGetPowerUsage", kind="timeout"
    )
    assert timeouts == 1
    assert one(back, "gpu_up", gpu=A100) == 1
    assert select(back, "gpu_power_watts", gpu=A100)


def test_missing_nvml_library_is_one_clear_line_and_a_nonzero_exit() -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has libnvidia-ml; the missing-library path cannot be shown")
    result = subprocess.run(
        [sys.executable, "-m", "exporter.main", "--web.listen-address", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "libnvidia-ml.so.1" in lines[0]
    assert "--simulate" in lines[0]


def test_a_bad_fleet_file_names_the_file_and_exits_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("seed: 1\nnodes:\n  - name: n1\n    gpus:\n      - model: V100\n")
    result = subprocess.run(
        [sys.executable, "-m", "exporter.main", "--simulate", str(fleet), "--node", "n1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert str(fleet) in result.stderr
    assert "model" in result.stderr


def test_driver_failure_is_survived_and_nvml_reinitialised() -> None:
    document = fleet_document()
    document["nodes"][0]["faults"] = [{"kind": "driver_not_loaded", "at": 30, "until": 90}]
    with running_node(document) as node:
        node.cycle()
        down = node.cycle(advance=40)
        still_down = node.cycle(advance=5)
        back = node.cycle(advance=60)
    assert one(down, "gpu_exporter_nvml_up") == 0
    assert all(v == 0 for v in select(down, "gpu_up").values())
    assert not select(still_down, "gpu_temperature_celsius")
    assert one(back, "gpu_exporter_nvml_up") == 1
    assert all(v == 1 for v in select(back, "gpu_up").values())
    assert len(select(back, "gpu_temperature_celsius")) == 5
