"""A fake /proc tree for simulated GPU processes, read by the exporter's real procfs code.

Each simulated process gets `<root>/<pid>/{cgroup, comm, cmdline, stat}` with the contents a
real node writes for the chosen cgroup layout (version, kubelet cgroup driver, runtime), so
the simulated exporter resolves pid -> pod through exactly the code a GPU node runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CGROUP_LAYOUTS",
    "QOS_CLASSES",
    "FakeProcess",
    "cgroup_text",
    "fake_container_id",
    "write_procfs",
]

CGROUP_LAYOUTS = (
    "v2-systemd-containerd",  # current default: kubeadm, EKS AL2023, GKE COS
    "v2-systemd-crio",  # OpenShift, CRI-O clusters
    "v1-cgroupfs-docker",  # older nodes: dockershim / cri-dockerd with the cgroupfs driver
    "v1-systemd-containerd",  # EL7/EL8 era nodes with the systemd driver
    "v2-cgroupfs-containerd",  # k3s and others that keep the cgroupfs driver
    "v2-systemd-docker",  # cri-dockerd with the systemd driver
    "v2-kind-containerd",  # kind: the kubelet's tree nested under kubelet.slice
    "v1-containerd-service",  # containerd's "slice:prefix:id" form under containerd.service
)
QOS_CLASSES = ("guaranteed", "burstable", "besteffort")

# v1 hierarchies in the order a typical kernel lists them (/proc/cgroups), newest id first.
_V1_CONTROLLERS = (
    "misc",
    "rdma",
    "pids",
    "hugetlb",
    "net_cls,net_prio",
    "cpuset",
    "memory",
    "perf_event",
    "blkio",
    "freezer",
    "devices",
    "cpu,cpuacct",
)
# Controllers the kubelet does not place containers in on most nodes: they stay at the root.
_V1_ROOT_ONLY = {"misc", "rdma"}
_STAT_FIELDS = 52  # /proc/<pid>/stat has 52 fields since Linux 3.5
_COMM_MAX_BYTES = 15  # TASK_COMM_LEN - 1


@dataclass(frozen=True)
class FakeProcess:
    """A simulated process: its pid, name, arguments, pod container (if any) and start time."""

    pid: int
    name: str
    cmdline: Sequence[str]
    pod_uid: str | None  # None for a host process
    container_id: str | None  # required when pod_uid is set
    start_ticks: int  # /proc/<pid>/stat field 22; a new value with the same pid is a new process


def fake_container_id(pod_uid: str, container_name: str) -> str:
    """A deterministic 64-hex-digit container id, as containerd, CRI-O and Docker make them."""
    return hashlib.sha256(f"{pod_uid}/{container_name}".encode()).hexdigest()


def _pod_path(layout: str, pod_uid: str, qos: str) -> list[str]:
    """The path segments of the pod's cgroup, as the kubelet names them for this layout."""
    uid_ = pod_uid.replace("-", "_")  # systemd reads "-" as a slice separator
    # Guaranteed pods sit directly under kubepods; the other classes get their own level.
    if layout.endswith("cgroupfs-containerd") or layout == "v1-cgroupfs-docker":
        qos_level = [] if qos == "guaranteed" else [qos]
        return ["kubepods", *qos_level, f"pod{pod_uid}"]
    if layout == "v2-kind-containerd":
        prefix, top = "kubelet-kubepods", ["kubelet.slice", "kubelet-kubepods.slice"]
    else:
        prefix, top = "kubepods", ["kubepods.slice"]
    if qos == "guaranteed":
        return [*top, f"{prefix}-pod{uid_}.slice"]
    return [*top, f"{prefix}-{qos}.slice", f"{prefix}-{qos}-pod{uid_}.slice"]


def _container_path(layout: str, pod_uid: str, container_id: str, qos: str) -> str:
    pod = _pod_path(layout, pod_uid, qos)
    if layout == "v1-containerd-service":
        return "/" + "/".join(
            ["system.slice", "containerd.service", f"{pod[-1]}:cri-containerd:{container_id}"]
        )
    if "cgroupfs" in layout:
        leaf = container_id
    elif layout.endswith("crio"):
        leaf = f"crio-{container_id}.scope"
    elif layout.endswith("docker"):
        leaf = f"docker-{container_id}.scope"
    else:
        leaf = f"cri-containerd-{container_id}.scope"
    return "/" + "/".join([*pod, leaf])


def _host_path(process: FakeProcess) -> str:
    # GPU jobs run outside Kubernetes usually come from a login session.
    return f"/user.slice/user-1000.slice/session-{process.pid % 97 + 1}.scope"


def cgroup_text(
    process: FakeProcess, layout: str = "v2-systemd-containerd", qos: str = "burstable"
) -> str:
    """The /proc/<pid>/cgroup contents a real node shows for this process and layout."""
    if layout not in CGROUP_LAYOUTS:
        raise ValueError(f"unknown cgroup layout {layout!r}; known: {', '.join(CGROUP_LAYOUTS)}")
    if qos not in QOS_CLASSES:
        raise ValueError(f"unknown QoS class {qos!r}; known: {', '.join(QOS_CLASSES)}")
    if process.pod_uid is None:
        path = _host_path(process)
    elif process.container_id is None:
        raise ValueError(f"pid {process.pid}: a process in a pod needs a container_id")
    else:
        path = _container_path(layout, process.pod_uid, process.container_id, qos)
    if layout.startswith("v2"):
        return f"0::{path}\n"
    lines = []
    for n, controllers in enumerate(_V1_CONTROLLERS):
        hierarchy = len(_V1_CONTROLLERS) + 1 - n
        lines.append(f"{hierarchy}:{controllers}:{'/' if controllers in _V1_ROOT_ONLY else path}")
    # systemd's own named hierarchy, then the empty unified hierarchy of a hybrid setup, where
    # only systemd lives: containers show the runtime's service there, not their pod.
    lines.append(f"1:name=systemd:{path}")
    unified = "/system.slice/containerd.service" if process.pod_uid else path
    lines.append(f"0::{unified}")
    return "\n".join(lines) + "\n"


def _stat_text(process: FakeProcess, comm: str) -> str:
    fields = ["0"] * _STAT_FIELDS
    fields[0] = str(process.pid)
    fields[1] = f"({comm})"
    fields[2] = "S"  # state
    fields[3] = "1"  # ppid
    fields[4] = fields[5] = str(process.pid)  # pgrp, session
    fields[6] = "0"  # tty_nr
    fields[7] = "-1"  # tpgid
    fields[17] = "20"  # priority
    fields[19] = "8"  # num_threads
    fields[21] = str(process.start_ticks)  # field 22: starttime
    fields[22] = str(8 << 30)  # vsize
    fields[23] = "262144"  # rss (pages)
    return " ".join(fields) + "\n"


def _comm(name: str) -> str:
    # The kernel keeps 15 bytes and may cut a multi-byte character, as here.
    return name.encode()[:_COMM_MAX_BYTES].decode("utf-8", errors="ignore")


def _files(process: FakeProcess, layout: str, qos: str) -> dict[str, bytes]:
    """File name -> contents; `stat` comes last so a reader that sees it sees the rest."""
    comm = _comm(process.name)
    cmdline = b"".join(arg.encode() + b"\0" for arg in process.cmdline)
    return {
        "cgroup": cgroup_text(process, layout, qos).encode(),
        "comm": (comm + "\n").encode(),
        "cmdline": cmdline,
        "stat": _stat_text(process, comm).encode(),
    }


# Plain string paths: on Python 3.11 pathlib interns every path component, so a new pid a
# cycle would grow the interpreter's intern table for as long as the simulation runs.


def _write_atomic(path: str, data: bytes) -> None:
    """Replace `path` so a concurrent reader sees the old or the new file, never a part."""
    with contextlib.suppress(OSError), open(path, "rb") as current:
        if current.read() == data:
            return  # unchanged: no rewrite, so steady state costs reads only
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_dir(path: str) -> None:
    """Remove a pid directory: renamed away first, so it vanishes at once for readers."""
    doomed = tempfile.mkdtemp(prefix=".gone-", dir=os.path.dirname(path))
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, os.path.join(doomed, "pid"))
    shutil.rmtree(doomed, ignore_errors=True)


def _start_ticks_on_disk(proc: str) -> int | None:
    try:
        with open(os.path.join(proc, "stat"), "rb") as stat_file:
            stat = stat_file.read()
        return int(stat.rpartition(b")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def write_procfs(
    root: str | Path,
    processes: Sequence[FakeProcess],
    layout: str = "v2-systemd-containerd",
    qos: str = "burstable",
) -> None:
    """Make `root` show exactly `processes`: write their files, remove every other pid.

    New pids appear whole (built in a temp directory, then renamed into place); a pid whose
    start time changed is a new process and replaces the old directory; files of a living
    process are replaced one by one, atomically. Safe to call every cycle while an exporter
    reads the tree.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    wanted = {p.pid: p for p in processes}
    if len(wanted) != len(processes):
        raise ValueError("duplicate pids in processes")
    for entry in os.listdir(root):
        if entry.isdigit() and int(entry) not in wanted:
            _remove_dir(os.path.join(root, entry))
    for process in processes:
        files = _files(process, layout, qos)
        proc = os.path.join(root, str(process.pid))
        if os.path.isdir(proc) and _start_ticks_on_disk(proc) == process.start_ticks:
            for name, data in files.items():
                _write_atomic(os.path.join(proc, name), data)
            continue
        staging = tempfile.mkdtemp(prefix=f".new-{process.pid}-", dir=root)
        for name, data in files.items():
            with open(os.path.join(staging, name), "wb") as out:
                out.write(data)
        if os.path.exists(proc):
            _remove_dir(proc)  # the pid was reused: the old process is gone
        os.replace(staging, proc)
