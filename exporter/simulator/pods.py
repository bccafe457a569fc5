"""Simulated pods and GPU processes: who holds which device, and what runs on it, over time.

A node's `pods:` list in the fleet file says which pod's containers claim which GPU, MIG
instance or time-sliced share, when each pod exists (`present`), and which processes run in
each container (`runs`). Like every other simulated signal these are pure functions of
(seed, fleet, node, t): the driver answers the running-process queries from them, the fake
kubelet and API server serve them, the fake procfs names them, and tests and cost reports use
them as ground truth.

    pods:
      - name: llm-serve-0
        namespace: inference
        labels: {team: nlp}
        present: {every: 6h, for: 5h}   # optional; default always
        phase: Running                  # optional; a Succeeded pod holds devices but runs nothing
        containers:
          - name: server
            devices: [{gpu: 0}, {gpu: 1, gi: 7}, {gpu: 2, replica: 1}]
            processes:
              - {command: python3, args: [serve.py, --port, "8000"], runs: {every: 1h, for: 50m}}

Each process entry runs as one OS process per device of its container (one rank per GPU);
the device's memory in use and utilization are split between its running processes by
`weight`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fleet import Fleet, GpuState, MigState, SimGpu, _Ctx

CLOCK_TICKS = 100  # USER_HZ: /proc/<pid>/stat start times count these since boot
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")
PROCESS_KINDS = ("compute", "graphics", "mps")
CGROUP_LAYOUTS = (
    "v2-systemd-containerd",
    "v2-systemd-crio",
    "v1-cgroupfs-docker",
    "v1-systemd-containerd",
    "v2-cgroupfs-containerd",
)


@dataclass(frozen=True)
class Window:
    """A repeating window: active for `duration` seconds of every `every`, from `offset`."""

    every: float
    duration: float
    offset: float = 0.0

    def active(self, t: float) -> bool:
        return (t - self.offset) % self.every < self.duration

    def started(self, t: float) -> float:
        """When the run active at t began."""
        return t - (t - self.offset) % self.every


@dataclass(frozen=True)
class DeviceClaim:
    """One device a container holds: a whole GPU, a MIG GPU instance, or a time-sliced share."""

    gpu: int
    gpu_instance: int | None = None
    replica: int | None = None


@dataclass(frozen=True)
class ProcessSpec:
    command: str
    args: tuple[str, ...]
    weight: float
    kind: str
    runs: Window | None


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    container_id: str
    devices: tuple[DeviceClaim, ...]
    processes: tuple[ProcessSpec, ...]


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    phase: str
    present: Window | None
    containers: tuple[ContainerSpec, ...]

    def exists(self, t: float) -> bool:
        return self.present is None or self.present.active(t)


@dataclass(frozen=True)
class KubeletSpec:
    """How the node's device plugin names devices and how its container runtime nests cgroups."""

    device_ids: str = "uuid"  # "uuid" (MIG-<uuid>) or "legacy" (MIG-GPU-<uuid>/<gi>/<ci>)
    mig_strategy: str = "mixed"  # "mixed": nvidia.com/mig-<profile>; "single": nvidia.com/gpu
    shared_resource: str = "nvidia.com/gpu"  # time-sliced GPUs ("nvidia.com/gpu.shared" if renamed)
    cgroup_layout: str = "v2-systemd-containerd"


@dataclass(frozen=True)
class ProcessState:
    """One running GPU process at one time, with the pod that owns it (ground truth)."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    kind: str
    namespace: str
    pod: str
    pod_uid: str
    container: str
    container_id: str
    gpu: int
    gpu_instance: int | None
    memory_bytes: int
    sm_util: int
    memory_util: int
    encoder_util: int
    decoder_util: int
    start_ticks: int


@dataclass(frozen=True)
class Allocation:
    """A device the kubelet reports as assigned to a pod's container."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_id: str
    claim: DeviceClaim


# -- parsing ----------------------------------------------------------------------------------

_POD_KEYS = ("name", "namespace", "labels", "phase", "present", "containers")
_CONTAINER_KEYS = ("name", "devices", "processes")
_PROCESS_KEYS = ("command", "args", "weight", "type", "runs")
_KUBELET_KEYS = ("device_ids", "mig_strategy", "shared_resource", "cgroup_layout")


def parse_window(ctx: _Ctx, value: object, where: str) -> Window | None:
    if value is None or value == "always":
        return None
    spec = ctx.mapping(value, where, ("every", "for", "offset"))
    if "every" not in spec or "for" not in spec:
        raise ctx.fail(where, "give `every` and `for` (e.g. {every: 2h, for: 90m}) or `always`")
    every = ctx.duration(spec["every"], f"{where}.every")
    duration = ctx.duration(spec["for"], f"{where}.for")
    if every <= 0 or not 0 < duration <= every:
        raise ctx.fail(where, "`for` must be positive and at most `every`")
    return Window(every, duration, ctx.duration(spec.get("offset", 0), f"{where}.offset"))


def parse_kubelet(ctx: _Ctx, value: object, where: str) -> KubeletSpec:
    spec = ctx.mapping(value or {}, where, _KUBELET_KEYS)
    choices = {
        "device_ids": ("uuid", "legacy"),
        "mig_strategy": ("mixed", "single"),
        "shared_resource": ("nvidia.com/gpu", "nvidia.com/gpu.shared"),
        "cgroup_layout": CGROUP_LAYOUTS,
    }
    values = {}
    for key, allowed in choices.items():
        if key in spec:
            if spec[key] not in allowed:
                raise ctx.fail(f"{where}.{key}", f"{spec[key]!r}; use one of {', '.join(allowed)}")
            values[key] = spec[key]
    return KubeletSpec(**values)


def parse_pods(
    ctx: _Ctx,
    value: object,
    where: str,
    *,
    seed: int,
    node: str,
    gpus: Sequence[SimGpu],
    hash64: Any,
    uuid: Any,
) -> tuple[PodSpec, ...]:
    """Validate a node's `pods:` list against its GPUs and build the pod specs."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ctx.fail(where, "expected a list of pods")
    pods = []
    always_held: dict[DeviceClaim, str] = {}
    seen: set[tuple[str, str]] = set()
    for pi, pv in enumerate(value):
        pw = f"{where}[{pi}]"
        ps = ctx.mapping(pv, pw, _POD_KEYS)
        name = ctx.string(ps.get("name"), f"{pw}.name")
        namespace = ctx.string(ps.get("namespace", "default"), f"{pw}.namespace")
        if (namespace, name) in seen:
            raise ctx.fail(f"{pw}.name", f"pod {namespace}/{name} is listed twice")
        seen.add((namespace, name))
        labels = ps.get("labels") or {}
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ctx.fail(f"{pw}.labels", "expected a mapping of strings (quote numbers)")
        phase = ps.get("phase", "Running")
        if phase not in PHASES:
            raise ctx.fail(f"{pw}.phase", f"{phase!r}; use one of {', '.join(PHASES)}")
        present = parse_window(ctx, ps.get("present"), f"{pw}.present")
        containers_v = ps.get("containers")
        if not isinstance(containers_v, list) or not containers_v:
            raise ctx.fail(f"{pw}.containers", "expected a non-empty list of containers")
        containers = []
        for ci, cv in enumerate(containers_v):
            cw = f"{pw}.containers[{ci}]"
            cs = ctx.mapping(cv, cw, _CONTAINER_KEYS)
            cname = ctx.string(cs.get("name"), f"{cw}.name")
            claims = tuple(
                _claim(ctx, dv, f"{cw}.devices[{di}]", gpus)
                for di, dv in enumerate(cs.get("devices") or [])
            )
            for claim in claims:
                if claim.replica is None and present is None:
                    holder = always_held.get(claim)
                    if holder is not None:
                        raise ctx.fail(
                            f"{cw}.devices",
                            f"{_describe(claim)} is already held by {holder} at all times; "
                            "give one of the pods a `present` window or another device",
                        )
                    always_held[claim] = f"{namespace}/{name}"
            processes = tuple(
                _process(ctx, prv, f"{cw}.processes[{ri}]")
                for ri, prv in enumerate(cs.get("processes") or [])
            )
            if processes and not claims:
                raise ctx.fail(f"{cw}.processes", "a container with GPU processes needs devices")
            container_id = f"{hash64(seed, node, namespace, name, cname):016x}" * 4
            containers.append(ContainerSpec(cname, container_id, claims, processes))
        pod_uid = uuid(seed, node, "pod", namespace, name)
        pods.append(
            PodSpec(namespace, name, pod_uid, dict(labels), phase, present, tuple(containers))
        )
    return tuple(pods)


def _claim(ctx: _Ctx, value: object, where: str, gpus: Sequence[SimGpu]) -> DeviceClaim:
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"gpu": value}
    spec = ctx.mapping(value, where, ("gpu", "gi", "replica"))
    if "gpu" not in spec:
        raise ctx.fail(where, "missing key 'gpu' (the GPU index on this node)")
    index = ctx.integer(spec["gpu"], f"{where}.gpu", 0, len(gpus) - 1)
    gpu = gpus[index]
    if "gi" in spec:
        gi = ctx.integer(spec["gi"], f"{where}.gi", 0)
        if gpu.instance(gi) is None:
            ids = [m.gpu_instance_id for m in gpu.mig or ()]
            raise ctx.fail(f"{where}.gi", f"GPU {index} has no GPU instance {gi} (has {ids})")
        return DeviceClaim(index, gi, None)
    if gpu.mig is not None:
        raise ctx.fail(where, f"GPU {index} is in MIG mode: claim one of its instances with `gi`")
    if "replica" in spec:
        if not gpu.replicas:
            raise ctx.fail(f"{where}.replica", f"GPU {index} is not time-sliced (time_slicing)")
        replica = ctx.integer(spec["replica"], f"{where}.replica", 0, gpu.replicas - 1)
        return DeviceClaim(index, None, replica)
    if gpu.replicas:
        raise ctx.fail(where, f"GPU {index} is time-sliced: claim a share with `replica`")
    return DeviceClaim(index)


def _process(ctx: _Ctx, value: object, where: str) -> ProcessSpec:
    spec = ctx.mapping(value, where, _PROCESS_KEYS)
    command = ctx.string(spec.get("command"), f"{where}.command")
    args = spec.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ctx.fail(f"{where}.args", "expected a list of strings (quote numbers)")
    weight = ctx.number(spec.get("weight", 1.0), f"{where}.weight", 0.01, 1000)
    kind = spec.get("type", "compute")
    if kind not in PROCESS_KINDS:
        raise ctx.fail(f"{where}.type", f"{kind!r}; use one of {', '.join(PROCESS_KINDS)}")
    runs = parse_window(ctx, spec.get("runs"), f"{where}.runs")
    return ProcessSpec(command, tuple(args), weight, kind, runs)


def _describe(claim: DeviceClaim) -> str:
    if claim.gpu_instance is not None:
        return f"GPU {claim.gpu} instance {claim.gpu_instance}"
    return f"GPU {claim.gpu}"


# -- the pure functions of time ---------------------------------------------------------------


def device_id(fleet: Fleet, node: str, claim: DeviceClaim) -> str:
    """The id the device plugin gives this device, in the node's configured form."""
    gpu = fleet.gpu(node, claim.gpu)
    if claim.gpu_instance is not None:
        if fleet.nodes[node].kubelet.device_ids == "legacy":
            return f"MIG-{gpu.uuid}/{claim.gpu_instance}/0"
        instance = gpu.instance(claim.gpu_instance)
        assert instance is not None
        return instance.uuid
    if claim.replica is not None:
        return f"{gpu.uuid}::{claim.replica}"
    return gpu.uuid


def resource_name(fleet: Fleet, node: str, claim: DeviceClaim) -> str:
    kubelet = fleet.nodes[node].kubelet
    if claim.gpu_instance is not None:
        if kubelet.mig_strategy == "single":
            return "nvidia.com/gpu"
        instance = fleet.gpu(node, claim.gpu).instance(claim.gpu_instance)
        assert instance is not None
        return f"nvidia.com/mig-{instance.profile.key}"
    if claim.replica is not None:
        return kubelet.shared_resource
    return "nvidia.com/gpu"


def allocatable(fleet: Fleet, node: str) -> dict[str, list[str]]:
    """Every device the device plugin advertises, by resource name."""
    out: dict[str, list[str]] = {}
    for gpu in fleet.nodes[node].gpus:
        claims: list[DeviceClaim]
        if gpu.mig is not None:
            claims = [DeviceClaim(gpu.index, m.gpu_instance_id) for m in gpu.mig]
        elif gpu.replicas:
            claims = [DeviceClaim(gpu.index, None, r) for r in range(gpu.replicas)]
        else:
            claims = [DeviceClaim(gpu.index)]
        for claim in claims:
            resource = resource_name(fleet, node, claim)
            out.setdefault(resource, []).append(device_id(fleet, node, claim))
    return out


def pods_at(fleet: Fleet, node: str, t: float) -> list[PodSpec]:
    return [pod for pod in fleet.nodes[node].pods if pod.exists(t)]


def allocations_at(fleet: Fleet, node: str, t: float) -> list[Allocation]:
    """What the kubelet's pod-resources List answers at t (pods of any phase, as kubelets do)."""
    out = []
    for pod in pods_at(fleet, node, t):
        for container in pod.containers:
            for claim in container.devices:
                out.append(
                    Allocation(
                        pod.namespace,
                        pod.name,
                        container.name,
                        resource_name(fleet, node, claim),
                        device_id(fleet, node, claim),
                        claim,
                    )
                )
    return out


def processes_at(
    fleet: Fleet,
    node: str,
    t: float,
    gpu_state: Callable[[int, float], GpuState] | None = None,
    mig_state: Callable[[int, int, float], MigState] | None = None,
) -> list[ProcessState]:
    """Every GPU process running on the node at t, with its share of its device.

    The driver passes its own (cached, fault-aware) state functions; tests use the fleet's.
    """
    if gpu_state is None:
        gpu_state = functools.partial(fleet.gpu_state, node)
    if mig_state is None:
        mig_state = functools.partial(fleet.mig_state, node)
    running: list[tuple[PodSpec, ContainerSpec, int, ProcessSpec, DeviceClaim, float]] = []
    for pod in pods_at(fleet, node, t):
        if pod.phase != "Running":
            continue
        for container in pod.containers:
            for number, process in enumerate(container.processes):
                if process.runs is not None and not process.runs.active(t):
                    continue
                for claim in container.devices:
                    started = _start_time(pod, process, t)
                    running.append((pod, container, number, process, claim, started))
    weights: dict[tuple[int, int | None], float] = {}
    for _, _, _, process, claim, _ in running:
        key = (claim.gpu, claim.gpu_instance)
        weights[key] = weights.get(key, 0.0) + process.weight
    out = []
    for pod, container, number, process, claim, started in running:
        key = (claim.gpu, claim.gpu_instance)
        share = process.weight / weights[key]
        if claim.gpu_instance is None:
            state = gpu_state(claim.gpu, t)
            used, util, mem_util = (
                state.memory_used,
                state.utilization_gpu,
                state.utilization_memory,
            )
            enc, dec = state.encoder_util, state.decoder_util
        else:
            mig = mig_state(claim.gpu, claim.gpu_instance, t)
            used, util, mem_util, enc, dec = mig.memory_used, round(mig.activity), 0, 0, 0
        pid = _pid(fleet.seed, node, pod, container, number, claim, started)
        out.append(
            ProcessState(
                pid=pid,
                name=process.command.rsplit("/", 1)[-1][:15],  # comm keeps 15 characters
                cmdline=(process.command, *process.args),
                kind=process.kind,
                namespace=pod.namespace,
                pod=pod.name,
                pod_uid=pod.uid,
                container=container.name,
                container_id=container.container_id,
                gpu=claim.gpu,
                gpu_instance=claim.gpu_instance,
                memory_bytes=int(used * share),
                sm_util=math.floor(util * share),
                memory_util=math.floor(mem_util * share),
                encoder_util=math.floor(enc * share),
                decoder_util=math.floor(dec * share),
                start_ticks=int(started * CLOCK_TICKS) % (1 << 62),
            )
        )
    return out


def _start_time(pod: PodSpec, process: ProcessSpec, t: float) -> float:
    """When the process running at t started: its own window, else its pod's, else day 0."""
    if process.runs is not None:
        return process.runs.started(t)
    if pod.present is not None:
        return pod.present.started(t)
    return 0.0


def _pid(
    seed: int,
    node: str,
    pod: PodSpec,
    container: ContainerSpec,
    number: int,
    claim: DeviceClaim,
    started: float,
) -> int:
    """A pid that stays while the process runs and changes when it restarts."""
    from .fleet import _hash64

    key = (seed, node, pod.uid, container.name, number, claim, int(started))
    return 1000 + _hash64(*key) % 4_000_000


def pod_object(node: str, pod: PodSpec) -> dict[str, Any]:
    """The pod as the Kubernetes API serves it (the fields the exporter's informer reads)."""
    runtime = "containerd"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
            "labels": dict(pod.labels),
        },
        "spec": {"nodeName": node, "containers": [{"name": c.name} for c in pod.containers]},
        "status": {
            "phase": pod.phase,
            "containerStatuses": [
                {"name": c.name, "containerID": f"{runtime}://{c.container_id}"}
                for c in pod.containers
            ],
        },
    }
