"""Wedged NVML calls over a thousand cycles: the hung GPU and the hung node-wide read fail fast,
are named by the function they hang in, and threads and file descriptors stay bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil

from tests.unit.exporter_harness import fleet_document, one, running_node, select

CYCLES = 1000
STEP = 1.0  # simulated seconds per cycle
WEDGES = range(40, CYCLES, 40)  # when GPU 2's temperature reading wedges again
H100_MIG, A100_MIG, H100, L4, A100 = "0", "1", "2", "3", "4"


def test_a_thousand_hung_cycles_keep_threads_and_file_descriptors_bounded(
    record_property: Callable[[str, object], None],
) -> None:
    document = fleet_document()
    document["nodes"][0]["faults"] = [
        # GPU 4's power reading hangs for the whole run...
        {"gpu": 4, "kind": "hang", "function": "nvmlDeviceGetPowerUsage", "at": 1, "until": 5000},
        # ...GPU 2's temperature wedges for 10 s in every 40 s, over and over...
        *(
            {
                "gpu": 2,
                "kind": "hang",
                "function": "nvmlDeviceGetTemperature",
                "at": start,
                "until": start + 10,
            }
            for start in WEDGES
        ),
        # ...and the node-wide XID event wait wedges from 300 s to 600 s.
        {"gpu": 0, "kind": "hang", "function": "nvmlEventSetWait_v2", "at": 300, "until": 600},
    ]
    process = psutil.Process()
    with running_node(document, nvml_timeout=0.25) as node:
        node.cycle()
        assert not node.exporter.nvml.in_flight, "a finished call is still marked in flight"
        node.cycle(advance=STEP)  # GPU 4 wedges; every worker thread exists from here on
        threads_before, fds_before = threading.active_count(), process.num_fds()
        os_threads_before = process.num_threads()
        threads, fds, os_threads = [], [], []
        node_hung = node_back = None
        began = time.monotonic()
        for cycle in range(1, CYCLES + 1):
            series = node.cycle(advance=STEP)
            now = cycle * STEP + STEP  # simulated seconds since the faults' origin
            assert one(series, "gpu_up", gpu=A100) == 0
            for gpu in (H100_MIG, A100_MIG, L4):
                assert one(series, "gpu_up", gpu=gpu) == 1, f"cycle {cycle}: GPU {gpu} down"
            if now == 450:
                node_hung = series
            if now == 700:
                node_back = series
            if cycle % 50 == 0:
                threads.append(threading.active_count())
                os_threads.append(process.num_threads())
                fds.append(process.num_fds())
        elapsed = time.monotonic() - began
        in_flight = dict(node.exporter.nvml.in_flight)
    record_property("threads", f"{threads_before} -> max {max(threads)}")
    record_property("os_threads", f"{os_threads_before} -> max {max(os_threads)}")
    record_property("fds", f"{fds_before} -> {min(fds)}..{max(fds)}")
    record_property("seconds", round(elapsed, 1))
    assert max(threads) <= threads_before + 2, (threads_before, threads)
    assert max(os_threads) <= os_threads_before + 2, (os_threads_before, os_threads)
    assert max(fds) == fds_before == min(fds), (fds_before, fds)
    assert elapsed < 60, f"{CYCLES} hung cycles took {elapsed:.1f} s"
    # Only the wedged calls are in flight at the end: the power reading on GPU 4's worker.
    assert sorted(in_flight.values()) == ["nvmlDeviceGetPowerUsage"]
    assert node_hung is not None and node_back is not None
    timeouts = select(node_hung, "gpu_exporter_nvml_errors_total", kind="timeout")
    by_function = {dict(k)["function"]: v for k, v in timeouts.items()}
    assert by_function["nvmlDeviceGetPowerUsage"] == 1  # counted once, when it started
    assert by_function["nvmlEventSetWait_v2"] == 1
    assert by_function["nvmlDeviceGetTemperature"] == len([t for t in WEDGES if t < 450])
    assert "unknown" not in by_function
    assert one(node_hung, "gpu_exporter_collector_success", collector="xid") == 0
    assert one(node_hung, "gpu_exporter_collector_success", collector="device") == 1
    assert one(node_back, "gpu_exporter_collector_success", collector="xid") == 1
