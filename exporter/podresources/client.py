"""A client of the kubelet's pod-resources v1 API: which container holds which GPU device.

The kubelet serves ``v1.PodResourcesLister`` on a unix socket; its ``List`` answer carries, per
container, the device ids the device plugin allocated. The exporter calls it every collection
cycle, so the client keeps one gRPC channel open across calls, puts a deadline on each call,
fails fast while the kubelet is down, and reconnects by itself once it is back.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from exporter.podresources import api_pb2, api_pb2_grpc
from exporter.podresources.devices import DeviceRef, parse_device_id

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-*")

# The kubelet's own pod-resources client allows 16 MiB answers; gRPC's default of 4 MiB could
# be reached on a dense node (every container's exclusive CPU ids and memory blocks are listed).
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # gRPC backs off up to 120 s between reconnects by default, and calls fail at once while
    # it waits; a unix socket is cheap to retry, so keep the wait short and attribution comes
    # back within a cycle or two of a kubelet restart.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# Bounds on the per-client caches and on the malformed ids kept for reporting: kubelet answers
# are trusted, but nothing read from them may grow memory without limit.
_CACHE_LIMIT = 4096
_LAST_MALFORMED_LIMIT = 32

_T = TypeVar("_T")


@dataclass(frozen=True)
class DeviceAssignment:
    """One device the kubelet has allocated to one container."""

    namespace: str
    pod: str
    container: str
    resource: str
    device: DeviceRef


class PodResourcesUnavailable(RuntimeError):
    """The kubelet's pod-resources API could not answer; GPU metrics go on without attribution.

    ``reason`` is a short, bounded token fit for a metric label: ``no_socket``, ``closed`` or
    the gRPC status code in lower case (``unavailable``, ``deadline_exceeded``,
    ``unimplemented``, ...).
    """

    def __init__(self, message: str, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason


class PodResourcesClient:
    """Lists the GPU devices the kubelet has handed to containers on this node.

    ``resources`` are exact extended-resource names or ``fnmatch`` globs; devices of any other
    resource (CPUs, FPGAs, NICs, ...) are ignored. Device ids that are not NVIDIA device ids
    are skipped, counted in ``malformed_device_ids_total`` and kept in ``last_malformed``, and
    logged once each, so one odd device never hides the others.
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        resources: Sequence[str] = DEFAULT_RESOURCES,
        timeout: float = 2.0,
    ) -> None:
        if isinstance(resources, str):
            raise TypeError("resources must be a sequence of names, not one string")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.socket_path = os.path.abspath(os.fspath(socket_path))
        self.resources: tuple[str, ...] = tuple(resources)
        self.timeout = float(timeout)
        self._exact = frozenset(r for r in self.resources if not _is_glob(r))
        self._globs = tuple(r for r in self.resources if _is_glob(r))
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._resource_cache: dict[str, bool] = {}
        self._device_cache: dict[str, DeviceRef | str] = {}
        self._warned: set[str] = set()
        self.malformed_device_ids_total = 0
        self.last_malformed: tuple[str, ...] = ()

    # -- public API -----------------------------------------------------------------------

    def list_assignments(self) -> list[DeviceAssignment]:
        """Call ``List``: one entry per (container, device id) of a matching resource.

        Order follows the kubelet's answer; a device id a container lists twice is kept once.
        Raises PodResourcesUnavailable when the kubelet cannot answer.
        """
        response = self._call("List", lambda stub: stub.List, api_pb2.ListPodResourcesRequest())
        out: list[DeviceAssignment] = []
        malformed: list[str] = []
        for pod in response.pod_resources:
            namespace, pod_name = pod.namespace, pod.name
            for container in pod.containers:
                seen: set[str] = set()
                for devices in container.devices:
                    resource = devices.resource_name
                    if not self._matches(resource):
                        continue
                    for raw in devices.device_ids:
                        if raw in seen:
                            continue
                        seen.add(raw)
                        ref = self._parse(raw, malformed)
                        if ref is not None:
                            out.append(
                                DeviceAssignment(namespace, pod_name, container.name, resource, ref)
                            )
        self._record_malformed(malformed)
        return out

    def allocatable(self) -> dict[str, list[DeviceRef]]:
        """Call ``GetAllocatableResources``: every device of a matching resource on the node.

        Needs a kubelet with that RPC (GA in 1.28; behind the KubeletPodResourcesGet-
        AllocatableResources gate from 1.21); older kubelets answer UNIMPLEMENTED, which is
        raised as PodResourcesUnavailable with reason ``unimplemented``.
        """
        response = self._call(
            "GetAllocatableResources",
            lambda stub: stub.GetAllocatableResources,
            api_pb2.AllocatableResourcesRequest(),
        )
        out: dict[str, list[DeviceRef]] = {}
        seen: dict[str, set[str]] = {}
        malformed: list[str] = []
        # The kubelet sends one ContainerDevices per device (each with its NUMA topology), so
        # the same resource name comes back many times; merge them.
        for devices in response.devices:
            resource = devices.resource_name
            if not self._matches(resource):
                continue
            refs = out.setdefault(resource, [])
            known = seen.setdefault(resource, set())
            for raw in devices.device_ids:
                if raw in known:
                    continue
                known.add(raw)
                ref = self._parse(raw, malformed)
                if ref is not None:
                    refs.append(ref)
        self._record_malformed(malformed)
        return out

    def close(self) -> None:
        """Close the channel; idempotent. A later call opens a fresh one."""
        with self._lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> PodResourcesClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PodResourcesClient(socket_path={self.socket_path!r}, "
            f"resources={self.resources!r}, timeout={self.timeout!r})"
        )

    # -- internals ------------------------------------------------------------------------

    def _call(self, method: str, pick: Callable[[Any], Callable[..., _T]], request: object) -> _T:
        """Run one unary call with the deadline, turning every failure into one exception."""
        self._check_socket()
        stub = self._get_stub()
        try:
            return pick(stub)(request, timeout=self.timeout)
        except grpc.RpcError as err:
            code = err.code() if callable(getattr(err, "code", None)) else None
            details = err.details() if callable(getattr(err, "details", None)) else None
            name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise PodResourcesUnavailable(
                f"kubelet pod-resources {method} at {self.socket_path} failed: "
                f"{name}: {details or 'no details'}",
                reason=name.lower(),
            ) from err
        except ValueError as err:
            # grpc raises ValueError for a call on a channel that close() shut concurrently.
            raise PodResourcesUnavailable(
                f"kubelet pod-resources {method} at {self.socket_path}: {err}", reason="closed"
            ) from err

    def _check_socket(self) -> None:
        """Fail with a plain message before gRPC turns a missing file into 'connection refused'."""
        try:
            mode = os.stat(self.socket_path).st_mode
        except FileNotFoundError:
            raise PodResourcesUnavailable(
                f"no kubelet pod-resources socket at {self.socket_path}", reason="no_socket"
            ) from None
        except OSError as err:
            raise PodResourcesUnavailable(
                f"cannot stat kubelet pod-resources socket at {self.socket_path}: {err}",
                reason="no_socket",
            ) from err
        if not stat.S_ISSOCK(mode):
            raise PodResourcesUnavailable(
                f"{self.socket_path} exists but is not a unix socket", reason="no_socket"
            )

    def _get_stub(self) -> Any:
        """The stub on the one shared channel, opened on first use."""
        with self._lock:
            if self._stub is None:
                self._channel = grpc.insecure_channel(
                    "unix://" + self.socket_path, options=_CHANNEL_OPTIONS
                )
                self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
            return self._stub

    def _matches(self, resource: str) -> bool:
        hit = self._resource_cache.get(resource)
        if hit is None:
            hit = resource in self._exact or any(
                fnmatch.fnmatchcase(resource, g) for g in self._globs
            )
            if len(self._resource_cache) >= _CACHE_LIMIT:
                self._resource_cache.clear()
            self._resource_cache[resource] = hit
        return hit

    def _parse(self, raw: str, malformed: list[str]) -> DeviceRef | None:
        """Parse with a cache (device ids repeat every cycle); a bad id goes to ``malformed``."""
        cached = self._device_cache.get(raw)
        if cached is None:
            try:
                cached = parse_device_id(raw)
            except ValueError as err:
                cached = str(err)
            if len(self._device_cache) >= _CACHE_LIMIT:
                self._device_cache.clear()
            self._device_cache[raw] = cached
        if isinstance(cached, DeviceRef):
            return cached
        malformed.append(raw)
        if raw not in self._warned and len(self._warned) < _CACHE_LIMIT:
            self._warned.add(raw)
            log.warning("skipping device from the kubelet: %s", cached)
        return None

    def _record_malformed(self, malformed: list[str]) -> None:
        with self._lock:
            self.malformed_device_ids_total += len(malformed)
            self.last_malformed = tuple(malformed[:_LAST_MALFORMED_LIMIT])


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")
