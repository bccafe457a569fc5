"""Who holds which GPU and who runs which process: kubelet, API server and /proc together.

Three sources, each optional, each allowed to fail without taking GPU metrics down:
- the kubelet's pod-resources API says which pod's container was assigned which device;
- /proc/<pid>/cgroup says which pod and container a GPU process runs in;
- one node-scoped pod informer turns pod UIDs into namespace, name, phase and labels, from
  memory, so a scrape never calls the API server.
Without Kubernetes (no socket, no API access) the exporter says so once and publishes GPU
metrics without attribution labels.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from exporter.nvml import bounded_label
from exporter.podresources import DeviceAssignment, PodResourcesClient, PodResourcesUnavailable
from exporter.pods import PodInfo, PodInformer
from exporter.procfs import ProcfsReader

log = logging.getLogger(__name__)

#: Most pod labels an operator may turn into metric labels (each one multiplies nothing, but
#: every one is carried on every per-process and allocation series).
MAX_POD_LABELS = 10
_LABEL_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def pod_label_metric_name(pod_label: str) -> str:
    """`app.kubernetes.io/name` → `label_app_kubernetes_io_name`, as kube-state-metrics does."""
    return "label_" + _LABEL_NAME_UNSAFE.sub("_", pod_label)


@dataclass(frozen=True)
class Owner:
    """The pod container a device or process belongs to, as label values."""

    namespace: str
    pod: str
    container: str
    pod_labels: tuple[str, ...]


class Attribution:
    """Answers "which pod" for devices and processes; refreshed once per collection cycle."""

    def __init__(
        self,
        *,
        pod_resources: PodResourcesClient | None,
        informer: PodInformer | None,
        procfs: ProcfsReader | None,
        pod_labels: Sequence[str] = (),
    ) -> None:
        if len(pod_labels) > MAX_POD_LABELS:
            raise ValueError(f"at most {MAX_POD_LABELS} pod labels may become metric labels")
        self.pod_resources = pod_resources
        self.informer = informer
        self.procfs = procfs
        self.pod_labels = tuple(pod_labels)
        self.label_names = tuple(pod_label_metric_name(label) for label in self.pod_labels)
        # Every configured source is published from the start, so a first failure is a rise.
        self.errors: Counter[str] = Counter(
            {
                source: 0
                for source, on in (("kubelet", pod_resources), ("apiserver", informer))
                if on
            }
        )
        self.up: dict[str, bool] = {}
        self.assignments: list[DeviceAssignment] = []
        self.allocatable: dict[str, int] = {}
        self._cycles = 0
        self._logged: set[str] = set()
        self._procfs_lock = threading.Lock()
        self._allocatable_supported = True

    def announce(self) -> None:
        """Say once, at start-up, which attribution sources are off and what that means."""
        if self.pod_resources is None and self.informer is None:
            log.warning("not on Kubernetes (no kubelet socket, no API access): pod labels off")
        elif self.pod_resources is None:
            log.warning("no kubelet pod-resources socket: device-to-pod attribution off")
        elif self.informer is None:
            log.warning("no Kubernetes API access: pod names, phases and labels off")

    # -- devices -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the kubelet's assignments (every cycle) and capacity (every 10th cycle)."""
        self._cycles += 1
        if self.informer is not None:
            self.up["apiserver"] = self.informer.synced and not self.informer.failing
            self.errors["apiserver"] = self.informer.errors
        if self.pod_resources is None:
            return
        try:
            self.assignments = self.pod_resources.list_assignments()
            self.up["kubelet"] = True
            self._recovered("kubelet")
        except PodResourcesUnavailable as error:
            self.errors["kubelet"] += 1
            self.up["kubelet"] = False
            self._say_once("kubelet-down", f"kubelet pod-resources unavailable: {error}")
            return
        if self._allocatable_supported and (self._cycles % 10 == 1 or not self.allocatable):
            try:
                self.allocatable = {
                    resource: len(devices)
                    for resource, devices in self.pod_resources.allocatable().items()
                }
            except PodResourcesUnavailable as error:
                if error.reason == "unimplemented":
                    # Kubelets before 1.23 lack it (feature gate): capacity stays unknown.
                    self._allocatable_supported = False
                    self._say_once("allocatable", "kubelet has no GetAllocatableResources")
                else:
                    self.errors["kubelet"] += 1

    def running_assignments(self) -> list[tuple[DeviceAssignment, Owner]]:
        """The kubelet's assignments, less pods the API server says are not Running.

        Kubelets have reported devices of terminated pods (kubernetes#119423); without the
        informer nothing can be checked and every assignment is credited.
        """
        out = []
        for assignment in self.assignments:
            info = self._pod(assignment.namespace, assignment.pod)
            checkable = self.informer is not None and self.informer.synced
            if checkable and (info is None or info.phase != "Running"):
                continue
            labels = self._label_values(info)
            owner = Owner(assignment.namespace, assignment.pod, assignment.container, labels)
            out.append((assignment, owner))
        return out

    # -- processes ---------------------------------------------------------------------------
    def process(self, pid: int) -> tuple[str | None, Owner | None]:
        """(process name, owning pod container) of a host pid; either may be unknown."""
        if self.procfs is None:
            return None, None
        with self._procfs_lock:  # GPUs are read on parallel threads; the reader is not safe
            name, ref = self.procfs.describe(pid)
        if ref is None or self.informer is None:
            return name, None
        info = self.informer.get(ref.pod_uid)
        if info is None:
            return name, None
        container = info.containers.get(ref.container_id, "")
        owner = Owner(info.namespace, info.name, container, self._label_values(info))
        return name, owner

    def end_cycle(self, seen_pids: Sequence[int]) -> None:
        if self.procfs is not None:
            with self._procfs_lock:
                self.procfs.end_cycle(seen_pids)

    # -- helpers -----------------------------------------------------------------------------
    def _pod(self, namespace: str, name: str) -> PodInfo | None:
        return None if self.informer is None else self.informer.find(namespace, name)

    def _label_values(self, info: PodInfo | None) -> tuple[str, ...]:
        if info is None:
            return ("",) * len(self.pod_labels)
        return tuple(bounded_label(info.labels.get(label, "")) for label in self.pod_labels)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message)

    def _recovered(self, source: str) -> None:
        if f"{source}-down" in self._logged:
            self._logged.discard(f"{source}-down")
            log.info("%s pod-resources answering again", source)
