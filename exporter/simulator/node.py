"""Everything around a simulated node that the exporter reads besides NVML.

`gpu-exporter --simulate FLEET --node NAME` brings up, for its node, a real gRPC kubelet
pod-resources server on a unix socket, a local HTTP server speaking the Kubernetes pod API,
and a procfs tree whose cgroup files name the pods, all served from the fleet's pods as the
simulated clock moves. The exporter then attributes devices and processes through the very
code a real node runs.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from .apiserver import HISTORY_LIMIT, FakeApiServer
from .driver import SimulatedDriver
from .kubelet import ContainerDeviceSpec, FakeKubelet, PodDeviceSpec
from .pods import allocatable, allocations_at, pod_object, pods_at
from .procfs import FakeProcess, write_procfs

log = logging.getLogger(__name__)


class SimulatedNodeServices:
    """The fake kubelet, API server and procfs of one simulated node."""

    def __init__(
        self,
        driver: SimulatedDriver,
        workdir: str | Path | None = None,
        *,
        poll_interval: float = 0.2,
        apiserver_history: int = HISTORY_LIMIT,
    ) -> None:
        self.driver = driver
        self.fleet = driver.fleet
        self.node = driver.node.name
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"gpu-sim-{self.node}-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.procfs_root = self.workdir / "proc"
        self.kubelet_socket = self.workdir / "pod-resources" / "kubelet.sock"
        self.kubelet_socket.parent.mkdir(parents=True, exist_ok=True)
        self.kubelet = FakeKubelet(self.kubelet_socket, self._pod_devices, self._allocatable)
        self.apiserver = FakeApiServer(
            self._pod_objects, poll_interval=poll_interval, history_limit=apiserver_history
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def apiserver_url(self) -> str:
        return self.apiserver.url

    def start(self, refresh_seconds: float = 0.25) -> None:
        """Serve, and keep the procfs tree following the clock every `refresh_seconds`."""
        self.sync()
        self.kubelet.start()
        self.apiserver.start()
        self._thread = threading.Thread(
            target=self._follow_clock, args=(refresh_seconds,), name="sim-procfs", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.kubelet.stop()
        self.apiserver.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def sync(self, t: float | None = None) -> None:
        """Write the procfs tree for the processes running at t (default: now)."""
        layout = self.fleet.nodes[self.node].kubelet.cgroup_layout
        processes = [
            FakeProcess(
                pid=p.pid,
                name=p.name,
                cmdline=p.cmdline,
                pod_uid=p.pod_uid,
                container_id=p.container_id,
                start_ticks=p.start_ticks,
            )
            for p in self.driver.running_processes(t)
        ]
        write_procfs(self.procfs_root, processes, layout=layout)

    def _follow_clock(self, refresh_seconds: float) -> None:
        while not self._stop.wait(refresh_seconds):
            try:
                self.sync()
            except Exception:  # keep serving; the next refresh may succeed
                log.exception("simulated procfs refresh failed")

    # -- providers, called per request so answers follow the simulated clock ------------------
    def _now(self) -> float:
        return self.driver.clock.now()

    def _pod_devices(self) -> list[PodDeviceSpec]:
        by_container: dict[tuple[str, str], dict[str, dict[str, list[str]]]] = {}
        for allocation in allocations_at(self.fleet, self.node, self._now()):
            pod = by_container.setdefault((allocation.namespace, allocation.pod), {})
            devices = pod.setdefault(allocation.container, {})
            devices.setdefault(allocation.resource, []).append(allocation.device_id)
        return [
            PodDeviceSpec(
                namespace=namespace,
                name=name,
                containers=[
                    ContainerDeviceSpec(name=container, devices=devices)
                    for container, devices in containers.items()
                ],
            )
            for (namespace, name), containers in by_container.items()
        ]

    def _allocatable(self) -> dict[str, list[str]]:
        return allocatable(self.fleet, self.node)

    def _pod_objects(self) -> list[dict[str, Any]]:
        return [pod_object(self.node, pod) for pod in pods_at(self.fleet, self.node, self._now())]


def main() -> None:
    """Serve one simulated node's kubelet, API server and /proc from a separate process.

    `python -m exporter.simulator.node --fleet F --node N` prints one JSON line with the
    socket, URL and procfs root, then serves until SIGTERM. Benchmarks use it so that the
    fake kubelet's CPU is not counted as the exporter's, as on a real node.
    """
    import argparse
    import json
    import signal

    from .clock import WallClock
    from .driver import SimulatedDriver
    from .fleet import load_fleet

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    driver = SimulatedDriver(load_fleet(args.fleet), args.node, WallClock(), resolution=0.05)
    services = SimulatedNodeServices(driver, args.workdir)
    services.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    endpoints = {
        "kubelet_socket": str(services.kubelet_socket),
        "apiserver_url": services.apiserver_url,
        "procfs_root": str(services.procfs_root),
    }
    print(json.dumps(endpoints), flush=True)
    stopped.wait()
    services.stop()


if __name__ == "__main__":
    main()
