"""Which pod and container runs a process, read from /proc/<pid>/cgroup; and the process name.

NVML reports GPU processes by host pid only. The kubelet puts every container in a cgroup whose
path names the pod UID and the runtime's container id, so the cgroup file is the one place on
the node that ties a pid to a pod without asking the container runtime. The layouts differ by
cgroup version (v1: one line per hierarchy; v2: one `0::` line), by the kubelet's cgroup driver
(cgroupfs: `/kubepods/<qos>/pod<uid>/<id>`; systemd: `kubepods-<qos>-pod<uid_>.slice/
<runtime>-<id>.scope`) and by runtime (containerd, CRI-O, Docker via cri-dockerd).

The process name is `/proc/<pid>/comm` (what `ps -o comm` and `top` show), never the command
line: arguments carry tokens and passwords, and label values must stay bounded.

Every read is one `open()` and one `read()`; a process that exits between reads, or that
`hidepid` hides, is simply unknown (None), never an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ContainerRef",
    "ProcfsReader",
    "container_of",
    "parse_cgroup",
    "process_name",
    "sanitize_command",
]

# The kernel keeps at most TASK_COMM_LEN - 1 = 15 bytes of the name in /proc/<pid>/comm.
COMM_MAX_BYTES = 15
# Larger than any cgroup file (v1 has about 13 lines of at most a few hundred bytes), so one
# read() returns the whole file; procfs files report size 0, so stat() cannot tell us.
_READ_LIMIT = 64 * 1024
# argv[0] is all we ever look at in cmdline; the rest are arguments and stay unread.
_CMDLINE_LIMIT = 4096

# A pod UID as the API server writes it (RFC 4122, lower-case) or, for static pods, the
# 32-hex-digit hash of the manifest that the kubelet uses as UID (the mirror pod carries it in
# its `kubernetes.io/config.mirror` annotation).
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
# cgroupfs driver: `pod<uid>` with the UID's dashes kept.
_POD_CGROUPFS = re.compile(r"pod(?P<uid>[0-9a-fA-F-]{32,36})")
# systemd driver: `kubepods[-<qos>]-pod<uid>.slice`, with the UID's dashes turned into
# underscores because systemd reads "-" in a slice name as the parent-slice separator. kind and
# some distributions nest it under another slice, which prefixes the name (`kubelet-kubepods-`).
_POD_SYSTEMD = re.compile(r"[\w-]*kubepods[\w-]*-pod(?P<uid>[0-9a-fA-F_]{32,36})\.slice")
# The container's own cgroup: a bare id (cgroupfs) or `<runtime>-<id>.scope` (systemd), e.g.
# `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` (cri-dockerd).
_CONTAINER_BARE = re.compile(r"[0-9a-fA-F]{12,128}")
_CONTAINER_SCOPE = re.compile(r"(?P<runtime>[a-z][a-z0-9-]*)-(?P<id>[0-9a-fA-F]{12,128})\.scope")
# Resource controllers the kubelet itself manages per container, best first: when v1 lines
# disagree (name=systemd or the hybrid `0::` line can point at the runtime's service instead),
# these are the ones that say where the kubelet put the process.
_CONTROLLER_RANK = {"pids": 0, "memory": 1, "cpu": 2, "cpuacct": 2, "devices": 3}
_OTHER_RANK = 4
_UNIFIED_RANK = 5

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._:+-]")
_WHITESPACE = re.compile(r"[\s\x00]")  # NUL too: it separates arguments in cmdline


@dataclass(frozen=True)
class ContainerRef:
    """A container on this node, named the way the kubelet and the runtime name it."""

    pod_uid: str  # canonical: lower-case, with dashes ("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    container_id: str  # the runtime's id (64 hex digits for containerd, CRI-O, Docker), no prefix


def _pod_uid(raw: str) -> str | None:
    uid = raw.replace("_", "-").lower()
    return uid if _UUID.fullmatch(uid) else None


def _pod_of_segment(segment: str) -> str | None:
    """The pod UID if this path segment is a pod's cgroup, under either cgroup driver."""
    match = _POD_SYSTEMD.fullmatch(segment) or _POD_CGROUPFS.fullmatch(segment)
    return _pod_uid(match["uid"]) if match else None


def _container_of_segment(segment: str) -> str | None:
    """The container id if this segment is a container's cgroup below a pod's."""
    if _CONTAINER_BARE.fullmatch(segment):
        return segment.lower()
    match = _CONTAINER_SCOPE.fullmatch(segment)
    # `crio-conmon-<id>.scope` holds CRI-O's conmon, the monitor that waits on the container:
    # it is charged to the pod but is not the container's workload, so it names no container.
    if match is None or match["runtime"].endswith("conmon"):
        return None
    return match["id"].lower()


def _parse_path(path: str) -> ContainerRef | None:
    """A container from one cgroup path, or None when the path is not inside a pod container.

    The pod segment is searched anywhere in the path, not at a fixed depth: kind and
    Docker-in-Docker nest the kubelet's tree under another prefix, and a reader in a private
    cgroup namespace sees other containers' paths relative to its own (`/../../kubepods-...`).
    """
    segments = path.strip().split("/")
    for i in range(len(segments) - 1, -1, -1):
        segment = segments[i]
        # containerd with the systemd driver but no systemd-managed scope writes the cgroup as
        # systemd's "slice:prefix:name" triple, e.g.
        # /system.slice/containerd.service/kubepods-burstable-pod<uid>.slice:cri-containerd:<id>
        if segment.count(":") == 2:
            slice_name, _runtime, container = segment.split(":")
            uid = _pod_of_segment(slice_name)
            if uid is not None and _CONTAINER_BARE.fullmatch(container):
                return ContainerRef(uid, container.lower())
            continue
        uid = _pod_of_segment(segment)
        if uid is None:
            continue
        # The container's cgroup is the child of the pod's. Deeper levels (crun's
        # `crio-<id>.scope/container`, or sub-cgroups a workload makes) still belong to it.
        if i + 1 >= len(segments):
            return None  # the pod-level cgroup itself: no container (cgroup v2 forbids this)
        container_id = _container_of_segment(segments[i + 1])
        return ContainerRef(uid, container_id) if container_id else None
    return None


def parse_cgroup(text: str) -> ContainerRef | None:
    """The pod container a process belongs to, from the text of its /proc/<pid>/cgroup.

    Takes cgroup v1 (`hierarchy-id:controllers:path` per line), v2 (`0::path`) and hybrid
    files. None for a process outside any pod container: a host process, the container
    runtime, or CRI-O's conmon.
    """
    candidates: list[tuple[int, str]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            rank = _UNIFIED_RANK
        else:
            # v1 controllers come comma-joined ("cpu,cpuacct") or on separate lines.
            rank = min(
                (_CONTROLLER_RANK.get(c, _OTHER_RANK) for c in controllers.split(",")),
                default=_OTHER_RANK,
            )
        candidates.append((rank, path))
    candidates.sort(key=lambda candidate: candidate[0])  # stable: file order breaks ties
    for _rank, path in candidates:
        ref = _parse_path(path)
        if ref is not None:
            return ref
    return None


def _read(path: str, limit: int = _READ_LIMIT) -> bytes | None:
    """One open() and one read(); None when the file is gone or unreadable.

    FileNotFoundError: the pid exited (or hidepid hides it). ProcessLookupError (ESRCH): it
    exited between open() and read(). PermissionError: hidepid or another user's process.
    All are a normal race with process exit, not a failure.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _decode(data: bytes) -> str:
    # Names and paths are bytes to the kernel; a bad byte must not make the process unknown.
    return data.decode("utf-8", errors="replace")


def container_of(pid: int, procfs_root: str | Path = "/proc") -> ContainerRef | None:
    """The pod container that `pid` runs in; None for host processes and for gone pids."""
    data = _read(f"{os.fspath(procfs_root)}/{pid}/cgroup")
    return None if data is None else parse_cgroup(_decode(data))


def sanitize_command(name: str, max_length: int = 64) -> str:
    """A process name fit for the `command` label: the program's name, never its arguments.

    Everything from the first whitespace (or NUL) on is dropped *before* the base name is
    taken, so an argument holding a path (`--key=/etc/secret/token`) can never become the
    name. Characters outside [A-Za-z0-9._:+-] become "_" and the result is cut to max_length;
    an empty name is "unknown".
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    program = _WHITESPACE.split(name.strip(), maxsplit=1)[0]
    base = program.rsplit("/", 1)[-1]
    clean = _NAME_UNSAFE.sub("_", base)[:max_length]
    return clean or "unknown"


def process_name(pid: int, procfs_root: str | Path = "/proc") -> str | None:
    """The sanitized name of `pid` from /proc/<pid>/comm; None when the pid is gone.

    comm is cut by the kernel at 15 bytes; when it is that long and argv[0]'s base name
    starts with it, the longer argv[0] base name is used, as `ps` and psutil do (so
    `text-generation-launcher`, not `text-generation`). Only argv[0] is looked at.
    """
    proc = f"{os.fspath(procfs_root)}/{pid}"
    data = _read(f"{proc}/comm")
    if data is None:
        return None
    comm = data.rstrip(b"\n")
    if len(comm) >= COMM_MAX_BYTES:
        cmdline = _read(f"{proc}/cmdline", _CMDLINE_LIMIT)
        if cmdline:
            # Up to the first NUL or whitespace: setproctitle may put a whole command line,
            # spaces and all, into argv[0].
            argv0 = re.split(rb"[\s\x00]", cmdline, maxsplit=1)[0]
            base = argv0.rsplit(b"/", 1)[-1]
            if base.startswith(comm):
                comm = base
    return sanitize_command(_decode(comm))


def _start_ticks(proc: str) -> int | None:
    """Field 22 of /proc/<pid>/stat: start time in clock ticks after boot; None if gone.

    With the pid it names one process for the life of the machine, since pids are reused.
    Field 2 (comm, in parentheses) may itself hold spaces and ")", so fields are counted
    from the last ")".
    """
    data = _read(f"{proc}/stat")
    if data is None:
        return None
    _, sep, rest = data.rpartition(b")")
    fields = rest.split()
    # rest starts at field 3 (state), so field 22 is index 19.
    if not sep or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


class ProcfsReader:
    """Resolves pids to (name, container) once per process lifetime, for a collection loop.

    Entries are keyed by (pid, start time), so a reused pid is resolved afresh, and
    `end_cycle` forgets pids that were not seen, so memory stays bounded under churn. A
    process's name is read once and kept while it lives: a stable label value, even if the
    process later renames itself. Not thread-safe: one reader per collection loop.
    """

    def __init__(self, procfs_root: str | Path = "/proc") -> None:
        # Plain strings, not pathlib: Path interns every component, and pids churn.
        self._root = os.fspath(procfs_root)
        # pid -> (start ticks, name, container)
        self._cache: dict[int, tuple[int, str, ContainerRef | None]] = {}
        # pids whose start time was checked this cycle; a pid is not reused within a cycle.
        self._checked: set[int] = set()

    def describe(self, pid: int) -> tuple[str | None, ContainerRef | None]:
        """(sanitized name, container or None) for `pid`; (None, None) if it is gone.

        The start time is checked once per pid per cycle (one small read); the name and
        cgroup are read only the first time a process is seen.
        """
        cached = self._cache.get(pid)
        if cached is not None and pid in self._checked:
            return cached[1], cached[2]
        proc = f"{self._root}/{pid}"
        start = _start_ticks(proc)
        if start is None:
            # Gone (or hidden). Not cached: a later cycle may see it, e.g. after a hidepid fix.
            self._cache.pop(pid, None)
            return None, None
        self._checked.add(pid)
        if cached is not None and cached[0] == start:
            return cached[1], cached[2]
        name = process_name(pid, self._root)
        cgroup = _read(f"{proc}/cgroup")
        container = None if cgroup is None else parse_cgroup(_decode(cgroup))
        if name is None or cgroup is None:
            # It exited between reads: gone, and half an answer is not remembered.
            self._cache.pop(pid, None)
            self._checked.discard(pid)
            return None, None
        self._cache[pid] = (start, name, container)
        return name, container

    def end_cycle(self, seen_pids: Collection[int]) -> None:
        """Forget every pid not in `seen_pids`; call once per collection cycle."""
        seen = set(seen_pids)
        for pid in [pid for pid in self._cache if pid not in seen]:
            del self._cache[pid]
        self._checked.clear()

    def __len__(self) -> int:
        """How many processes are cached (for tests and a cache-size gauge)."""
        return len(self._cache)
