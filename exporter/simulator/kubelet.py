"""A fake kubelet: a real gRPC server on a unix socket serving the v1 pod-resources API.

Tests and the demo point the exporter's real `PodResourcesClient` at it, so the bytes on the
wire, the method paths and the failure modes (socket gone, UNAVAILABLE, UNIMPLEMENTED,
deadlines) are the ones a real node shows. What it answers comes from provider callables
that are asked on every request, so answers follow the simulated clock.

Like the real kubelet (devicemanager's ``containerDevicesFromResourceDeviceInstances``), it
sends one ``ContainerDevices`` per device id, each with a NUMA topology, so a client must merge
entries that share a resource name.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from exporter.podresources import api_pb2, api_pb2_grpc

# sun_path is 108 bytes on Linux, one of them the terminating NUL.
_MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class ContainerDeviceSpec:
    """One container and the device ids it holds, per resource name."""

    name: str
    devices: Mapping[str, Sequence[str]]
    cpu_ids: Sequence[int] = field(default=())  # exclusive CPUs (static CPU manager policy)


@dataclass(frozen=True)
class PodDeviceSpec:
    """One pod as the kubelet lists it."""

    namespace: str
    name: str
    containers: Sequence[ContainerDeviceSpec]


def _container_devices(resource: str, device_ids: Sequence[str]) -> list[Any]:
    return [
        api_pb2.ContainerDevices(
            resource_name=resource,
            device_ids=[device_id],
            topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=0)]),
        )
        for device_id in device_ids
    ]


def _pod_message(pod: PodDeviceSpec) -> Any:
    return api_pb2.PodResources(
        name=pod.name,
        namespace=pod.namespace,
        containers=[
            api_pb2.ContainerResources(
                name=c.name,
                devices=[
                    d
                    for resource, ids in c.devices.items()
                    for d in _container_devices(resource, ids)
                ],
                cpu_ids=list(c.cpu_ids),
            )
            for c in pod.containers
        ],
    )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code``; ``context.abort`` raises, but grpc ships no types saying so."""
    context.abort(code, details)
    raise AssertionError("grpc.ServicerContext.abort returned")


class _Servicer(api_pb2_grpc.PodResourcesListerServicer):
    """The RPC handlers; all state lives in the FakeKubelet that owns it."""

    def __init__(self, owner: FakeKubelet) -> None:
        self._owner = owner

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._owner._enter("List", context)
        pods = self._owner._pods()
        return api_pb2.ListPodResourcesResponse(pod_resources=[_pod_message(p) for p in pods])

    def GetAllocatableResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._owner._enter("GetAllocatableResources", context)
        provider = self._owner._allocatable
        if provider is None:
            # What a kubelet without the KubeletPodResourcesGetAllocatable gate answers.
            _abort(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                "PodResources API GetAllocatableResources disabled",
            )
        devices = [
            d for resource, ids in provider().items() for d in _container_devices(resource, ids)
        ]
        return api_pb2.AllocatableResourcesResponse(devices=devices)

    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._owner._enter("Get", context)
        for pod in self._owner._pods():
            if pod.name == request.pod_name and pod.namespace == request.pod_namespace:
                return api_pb2.GetPodResourcesResponse(pod_resources=_pod_message(pod))
        # The kubelet returns a plain Go error here, which gRPC sends as UNKNOWN.
        _abort(
            context,
            grpc.StatusCode.UNKNOWN,
            f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
        )


class FakeKubelet:
    """Serves ``v1.PodResourcesLister`` on ``socket_path`` until stopped.

    ``allocatable=None`` plays an old kubelet whose GetAllocatableResources is UNIMPLEMENTED.
    ``calls`` counts every request received per method, including those answered with an
    error, so tests can check how often a client asks.
    """

    def __init__(
        self,
        socket_path: str | Path,
        pods: Callable[[], Sequence[PodDeviceSpec]],
        allocatable: Callable[[], Mapping[str, Sequence[str]]] | None,
        *,
        max_workers: int = 4,
    ) -> None:
        path = os.path.abspath(os.fspath(socket_path))
        if len(path.encode()) > _MAX_UNIX_PATH:
            raise ValueError(
                f"unix socket path is {len(path.encode())} bytes, over the {_MAX_UNIX_PATH}-byte "
                f"limit: {path}"
            )
        self.socket_path = path
        self._pods = pods
        self._allocatable = allocatable
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._unavailable = False
        self._latency = 0.0
        # Set on stop(), so a handler sleeping out its latency wakes up at once.
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self.calls: Counter[str] = Counter()

    def start(self) -> None:
        """Bind the socket and serve; a stale socket file from a previous run is replaced."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("FakeKubelet is already running")
            self._remove_socket()
            self._stopping.clear()
            server = grpc.server(
                futures.ThreadPoolExecutor(
                    max_workers=self._max_workers, thread_name_prefix="fake-kubelet"
                )
            )
            api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)
            server.add_insecure_port("unix://" + self.socket_path)
            server.start()
            self._server = server

    def stop(self) -> None:
        """Stop serving (in-flight calls are cancelled) and remove the socket file."""
        with self._lock:
            server, self._server = self._server, None
            self._stopping.set()
        if server is not None:
            server.stop(grace=None).wait()
        self._remove_socket()

    def set_unavailable(self, unavailable: bool) -> None:
        """While True, every call fails with UNAVAILABLE, as during a kubelet restart."""
        with self._lock:
            self._unavailable = unavailable

    def set_latency(self, seconds: float) -> None:
        """Delay every answer by ``seconds``, to run clients into their deadline."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, got {seconds}")
        with self._lock:
            self._latency = float(seconds)

    def __enter__(self) -> FakeKubelet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        """Count the call, then apply the configured latency and unavailability."""
        with self._lock:
            self.calls[method] += 1
            unavailable, latency = self._unavailable, self._latency
        if latency:
            self._stopping.wait(latency)
        if unavailable:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "kubelet pod-resources is unavailable")

    def _remove_socket(self) -> None:
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
