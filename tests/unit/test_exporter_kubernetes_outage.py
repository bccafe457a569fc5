"""The kubelet socket and the API server going away and coming back under a running exporter,
and a secret in a GPU process's arguments: GPU metrics are served throughout, attribution
errors are counted, attribution comes back by itself, and the secret is published nowhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from exporter.simulator.pods import allocations_at, processes_at
from tests.unit.exporter_harness import FLEETS, Node, Series, one, running_attributed_node, select

FLEET = FLEETS / "attribution.yaml"
NODE = "attr-node"


def attributed(series: Series) -> dict[str, str]:
    """pid -> pod of the published GPU processes."""
    return {dict(k)["pid"]: dict(k)["pod"] for k in select(series, "gpu_process_info")}


def truth(node: Node) -> tuple[dict[str, str], set[str]]:
    """(pid -> pod, pods credited with a device: the kubelet's, less pods not Running)."""
    now = node.clock.now()
    fleet = node.driver.fleet
    processes = {str(p.pid): p.pod for p in processes_at(fleet, NODE, now)}
    return processes, {a.pod for a in allocations_at(fleet, NODE, now)} - {"finished-job"}


def test_kubelet_and_api_server_gone_and_back_without_a_restart(
    caplog: pytest.LogCaptureFixture, record_property: Callable[[str, object], None]
) -> None:
    with caplog.at_level(logging.INFO), running_attributed_node(FLEET, NODE) as node:
        assert node.services is not None
        before = node.cycle()
        processes, holders = truth(node)
        assert attributed(before) == processes
        assert {dict(k)["pod"] for k in select(before, "gpu_allocation_info")} == holders
        errors_before = {
            source: one(before, "gpu_exporter_attribution_errors_total", source=source)
            for source in ("kubelet", "apiserver")
        }

        node.services.kubelet.stop()  # the socket file is removed, as when the kubelet exits
        node.services.apiserver.stop()  # listener closed, the informer's watch cut
        outage: list[Series] = []
        for _ in range(5):
            time.sleep(0.3)
            outage.append(node.cycle())

        node.services.kubelet.start()
        node.services.apiserver.start()  # same address, as a restarted API server
        returned = time.monotonic()
        while True:
            back = node.cycle()
            ups = [
                one(back, "gpu_exporter_attribution_up", source=s) for s in ("kubelet", "apiserver")
            ]
            if ups == [1, 1]:
                break
            assert time.monotonic() - returned < 20, "attribution did not come back"
            time.sleep(0.05)
        recovery = time.monotonic() - returned
        back = node.cycle()

    for series in outage:  # GPU metrics throughout, processes still named from /proc
        assert len(select(series, "gpu_temperature_celsius")) == 5
        assert all(v == 1 for v in select(series, "gpu_up").values())
        assert attributed(series) == processes  # the informer keeps what it knew
    last = outage[-1]
    assert one(last, "gpu_exporter_attribution_up", source="kubelet") == 0
    assert one(last, "gpu_exporter_attribution_up", source="apiserver") == 0
    for source in ("kubelet", "apiserver"):
        counted = one(last, "gpu_exporter_attribution_errors_total", source=source)
        assert counted > errors_before[source], f"{source} failures were not counted"
    assert attributed(back) == processes
    assert {dict(k)["pod"] for k in select(back, "gpu_allocation_info")} == holders
    record_property("recovery_s", round(recovery, 2))
    assert recovery < 10, f"attribution took {recovery:.1f} s to come back"
    # One warning per outage, one line when each source answers again; no error lines.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    kubelet_down = [r for r in caplog.records if "kubelet pod-resources unavailable" in r.message]
    assert len(kubelet_down) == 1


def test_a_secret_in_process_arguments_reaches_neither_metrics_nor_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG), running_attributed_node(FLEET, NODE) as node:
        node.cycle()
        node.cycle(advance=30)
        body = node.exporter.exposition().decode()
        assert node.services is not None
        cmdlines = b"".join(
            path.read_bytes() for path in node.services.procfs_root.glob("*/cmdline")
        )
    assert b"--password=secret" in cmdlines, "the fixture lost its secret: the test is void"
    logs = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "python3" in body  # the process is published, by its name
    for leaked in ("secret", "password", "train.py"):
        assert leaked not in body, f"{leaked!r} in /metrics"
        assert leaked not in logs, f"{leaked!r} in the logs"
