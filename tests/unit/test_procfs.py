"""pid -> pod attribution from /proc/<pid>/cgroup, process names, and the fake procfs tree."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from exporter.procfs import (
    ContainerRef,
    ProcfsReader,
    container_of,
    parse_cgroup,
    process_name,
    sanitize_command,
)
from exporter.simulator.procfs import (
    CGROUP_LAYOUTS,
    QOS_CLASSES,
    FakeProcess,
    cgroup_text,
    fake_container_id,
    write_procfs,
)

UID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
UID_ = UID.replace("-", "_")
CID = "4f8b0a1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c"
EXPECTED = ContainerRef(UID, CID)

# Real-looking /proc/<pid>/cgroup files, one per layout seen on Kubernetes GPU nodes.
POD_CGROUPS = {
    "v2 systemd containerd burstable": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        f"/cri-containerd-{CID}.scope\n"
    ),
    "v2 systemd containerd besteffort": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        f"/cri-containerd-{CID}.scope\n"
    ),
    "v2 systemd containerd guaranteed": (
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
    ),
    "v2 systemd crio": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        f"/crio-{CID}.scope\n"
    ),
    "v2 systemd crio with crun's container subgroup": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        f"/crio-{CID}.scope/container\n"
    ),
    "v2 systemd cri-dockerd": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        f"/docker-{CID}.scope\n"
    ),
    "v2 cgroupfs burstable": f"0::/kubepods/burstable/pod{UID}/{CID}\n",
    "v2 cgroupfs guaranteed": f"0::/kubepods/pod{UID}/{CID}\n",
    "v2 cgroupfs besteffort": f"0::/kubepods/besteffort/pod{UID}/{CID}\n",
    "v2 kind (kubelet.slice)": (
        "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice"
        f"/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
    ),
    "v2 kind guaranteed": (
        "0::/kubelet.slice/kubelet-kubepods.slice"
        f"/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
    ),
    "v2 kind cgroupfs under the node container": (
        f"0::/kubelet/kubepods/besteffort/pod{UID}/{CID}\n"
    ),
    "v2 docker-in-docker prefix": (
        "0::/docker/0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
        f"/kubepods/burstable/pod{UID}/{CID}\n"
    ),
    "v2 seen from a private cgroup namespace": (
        f"0::/../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        f"/cri-containerd-{CID}.scope\n"
    ),
    "containerd slice:prefix:id under containerd.service": (
        "0::/system.slice/containerd.service"
        f"/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}\n"
    ),
    "upper-case ids are normalised": f"0::/kubepods/burstable/pod{UID.upper()}/{CID.upper()}\n",
    "v1 cgroupfs docker, hybrid": "\n".join(
        [
            "13:misc:/",
            "12:rdma:/",
            f"11:pids:/kubepods/burstable/pod{UID}/{CID}",
            f"10:hugetlb:/kubepods/burstable/pod{UID}/{CID}",
            f"9:net_cls,net_prio:/kubepods/burstable/pod{UID}/{CID}",
            f"8:cpuset:/kubepods/burstable/pod{UID}/{CID}",
            f"7:memory:/kubepods/burstable/pod{UID}/{CID}",
            f"6:perf_event:/kubepods/burstable/pod{UID}/{CID}",
            f"5:blkio:/kubepods/burstable/pod{UID}/{CID}",
            f"4:freezer:/kubepods/burstable/pod{UID}/{CID}",
            f"3:devices:/kubepods/burstable/pod{UID}/{CID}",
            f"2:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}",
            "1:name=systemd:/system.slice/containerd.service",
            "0::/system.slice/containerd.service",
            "",
        ]
    ),
    "v1 systemd containerd": "\n".join(
        [
            "12:pids:/kubepods.slice/kubepods-burstable.slice"
            f"/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "11:memory:/kubepods.slice/kubepods-burstable.slice"
            f"/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "10:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice"
            f"/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "9:devices:/kubepods.slice/kubepods-burstable.slice"
            f"/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "1:name=systemd:/kubepods.slice/kubepods-burstable.slice"
            f"/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "",
        ]
    ),
    "v1 with cpu and cpuacct on separate lines, pod only in resource controllers": "\n".join(
        [
            "9:name=systemd:/",
            f"8:pids:/kubepods/pod{UID}/{CID}",
            "7:blkio:/",
            f"4:memory:/kubepods/pod{UID}/{CID}",
            f"2:cpuacct:/kubepods/pod{UID}/{CID}",
            f"1:cpu:/kubepods/pod{UID}/{CID}",
            "0::/",
        ]
    ),
    "v1 only a minor controller names the pod": "\n".join(
        ["3:pids:/", f"2:freezer:/kubepods/besteffort/pod{UID}/{CID}", "1:name=systemd:/"]
    ),
}

NOT_A_POD_CONTAINER = {
    "v2 sshd": "0::/system.slice/sshd.service\n",
    "v2 login session": "0::/user.slice/user-1000.slice/session-3.scope\n",
    "v2 root": "0::/\n",
    "v2 init": "0::/init.scope\n",
    "v2 containerd itself": "0::/system.slice/containerd.service\n",
    "v2 kubelet": "0::/system.slice/kubelet.service\n",
    "v2 plain docker container, not a pod": (
        "0::/system.slice/docker-0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
        ".scope\n"
    ),
    "v2 podman pod": (
        "0::/machine.slice/machine-libpod_pod_0a1b2c3d4e5f.slice/libpod-"
        "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9.scope\n"
    ),
    "v2 crio conmon (the monitor, not the container)": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        f"/crio-conmon-{CID}.scope\n"
    ),
    "v1 pod-level cgroup, no container": f"4:memory:/kubepods/burstable/pod{UID}\n",
    "v2 not a uuid after pod": f"0::/kubepods/burstable/podnotauid/{CID}\n",
    "v1 host process": "\n".join(
        [
            "12:pids:/system.slice/sshd.service",
            "11:memory:/system.slice/sshd.service",
            "2:cpu,cpuacct:/system.slice/sshd.service",
            "1:name=systemd:/system.slice/sshd.service",
            "0::/system.slice/sshd.service",
        ]
    ),
    "empty file": "",
    "garbage": "not a cgroup file\n\x00\xff::",
}


@pytest.mark.parametrize("text", POD_CGROUPS.values(), ids=POD_CGROUPS.keys())
def test_parse_cgroup_finds_pod_and_container_in_every_layout(text: str) -> None:
    assert parse_cgroup(text) == EXPECTED


@pytest.mark.parametrize("text", NOT_A_POD_CONTAINER.values(), ids=NOT_A_POD_CONTAINER.keys())
def test_parse_cgroup_returns_none_outside_a_pod_container(text: str) -> None:
    assert parse_cgroup(text) is None


def test_static_pod_uid_without_dashes_is_kept_as_the_kubelet_writes_it() -> None:
    # Static pods' UID is the 32-hex-digit manifest hash, with no dashes to restore.
    static = "6a1b4f2c9d0e3f4a5b6c7d8e9f0a1b2c"
    text = f"0::/kubepods.slice/kubepods-pod{static}.slice/cri-containerd-{CID}.scope\n"
    assert parse_cgroup(text) == ContainerRef(static, CID)


def test_resource_controllers_win_over_systemd_line_when_lines_disagree() -> None:
    other = "f" * 64
    text = (
        f"1:name=systemd:/kubepods/burstable/pod{UID}/{other}\n"
        f"5:pids:/kubepods/burstable/pod{UID}/{CID}\n"
    )
    assert parse_cgroup(text) == EXPECTED


# --- reading files under a procfs root -------------------------------------------------------


def _make_proc(root: Path, pid: int, cgroup: str, comm: str = "python3", start: int = 1000) -> None:
    proc = root / str(pid)
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "comm").write_text(comm + "\n")
    (proc / "cmdline").write_bytes(b"/usr/bin/" + comm.encode() + b"\0train.py\0")
    stat = f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560" + " 0" * 12 + f" {start} 0 0\n"
    (proc / "stat").write_text(stat)


def test_container_of_reads_the_pid_cgroup_file(tmp_path: Path) -> None:
    _make_proc(tmp_path, 4242, POD_CGROUPS["v2 systemd containerd burstable"])
    assert container_of(4242, tmp_path) == EXPECTED
    assert container_of(4242, str(tmp_path)) == EXPECTED


def test_container_of_a_host_process_is_none(tmp_path: Path) -> None:
    _make_proc(tmp_path, 1, NOT_A_POD_CONTAINER["v2 sshd"])
    assert container_of(1, tmp_path) is None


def test_gone_or_unreadable_pid_is_none_not_an_error(tmp_path: Path) -> None:
    assert container_of(999, tmp_path) is None
    assert process_name(999, tmp_path) is None
    assert ProcfsReader(tmp_path).describe(999) == (None, None)
    # A file that cannot be read (here a directory: EISDIR) is also just unknown.
    (tmp_path / "7" / "cgroup").mkdir(parents=True)
    (tmp_path / "7" / "comm").mkdir()
    assert container_of(7, tmp_path) is None
    assert process_name(7, tmp_path) is None
    # A symlink loop (ELOOP).
    (tmp_path / "8").mkdir()
    os.symlink("cgroup", tmp_path / "8" / "cgroup")
    assert container_of(8, tmp_path) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_none(tmp_path: Path) -> None:
    _make_proc(tmp_path, 5, POD_CGROUPS["v2 cgroupfs burstable"])
    (tmp_path / "5" / "cgroup").chmod(0)
    assert container_of(5, tmp_path) is None


def test_a_real_exited_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: /proc/<pid> is gone
    assert container_of(child.pid) is None
    assert process_name(child.pid) is None
    assert ProcfsReader().describe(child.pid) == (None, None)


def test_reads_the_real_proc_for_this_process() -> None:
    name, _container = ProcfsReader().describe(os.getpid())
    with open(f"/proc/{os.getpid()}/comm") as comm:
        assert name == sanitize_command(comm.read())


def test_process_name_is_sanitized_comm(tmp_path: Path) -> None:
    _make_proc(tmp_path, 10, "0::/\n", comm="python3")
    _make_proc(tmp_path, 11, "0::/\n", comm="my worker")
    assert process_name(10, tmp_path) == "python3"
    assert process_name(11, tmp_path) == "my"


def test_truncated_comm_is_completed_from_argv0_only(tmp_path: Path) -> None:
    proc = tmp_path / "12"
    proc.mkdir()
    (proc / "comm").write_text("text-generation\n")  # the kernel's 15 bytes
    (proc / "cmdline").write_bytes(
        b"/usr/local/bin/text-generation-launcher\0--api-key=secret\0/etc/secret/token\0"
    )
    assert process_name(12, tmp_path) == "text-generation-launcher"


def test_truncated_comm_ignores_argv0_that_does_not_match(tmp_path: Path) -> None:
    proc = tmp_path / "13"
    proc.mkdir()
    (proc / "comm").write_text("pt_main_thread_\n")
    # setproctitle can put a whole command line, spaces included, into argv[0].
    (proc / "cmdline").write_bytes(b"python train.py --password=secret /tmp/pt_main_thread_x\0")
    assert process_name(13, tmp_path) == "pt_main_thread_"


# --- sanitize_command ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("python3", "python3"),
        ("python3\n", "python3"),
        ("/usr/bin/python3.11", "python3.11"),
        ("python3 train.py --password=secret", "python3"),
        ("/opt/conda/bin/python -m torch.distributed.run --token abc", "python"),
        ("python3 --cfg=/etc/secret/token", "python3"),  # no base name taken from arguments
        ("python3\x00train.py\x00--password=secret", "python3"),
        ("  nvidia-cuda-mps-server", "nvidia-cuda-mps-server"),
        ("c++:worker+1.0-rc_2", "c++:worker+1.0-rc_2"),
        ("pythön", "pyth_n"),
        ("训练", "__"),
        ("evil\x1b[31mred", "evil__31mred"),
        ("a\x07b", "a_b"),
        ("name;rm -rf /", "name_rm"),
        ('lab"el}\\', "lab_el__"),
        ("/usr/bin/", "unknown"),
        ("", "unknown"),
        ("   ", "unknown"),
    ],
)
def test_sanitize_command_keeps_only_a_safe_program_name(raw: str, expected: str) -> None:
    assert sanitize_command(raw) == expected


def test_sanitize_command_never_leaks_arguments() -> None:
    for raw in (
        "python3 train.py --password=secret",
        "/usr/bin/python3 --password secret",
        "python3\ttrain.py\t--password=secret",
    ):
        result = sanitize_command(raw)
        assert "secret" not in result
        assert "password" not in result


def test_sanitize_command_bounds_length() -> None:
    assert sanitize_command("x" * 1000) == "x" * 64
    assert sanitize_command("abcdef", max_length=3) == "abc"
    with pytest.raises(ValueError):
        sanitize_command("abc", max_length=0)


# --- ProcfsReader cache ----------------------------------------------------------------------


def test_describe_caches_a_pid_while_it_lives(tmp_path: Path) -> None:
    _make_proc(tmp_path, 20, POD_CGROUPS["v2 cgroupfs burstable"], start=500)
    reader = ProcfsReader(tmp_path)
    assert reader.describe(20) == ("python3", EXPECTED)
    # Same process (same start time): the cached answer holds even if files change.
    (tmp_path / "20" / "cgroup").write_text("0::/system.slice/sshd.service\n")
    (tmp_path / "20" / "comm").write_text("renamed\n")
    reader.end_cycle([20])
    assert reader.describe(20) == ("python3", EXPECTED)


def test_reused_pid_with_new_start_time_is_resolved_again(tmp_path: Path) -> None:
    _make_proc(tmp_path, 21, POD_CGROUPS["v2 cgroupfs burstable"], comm="python3", start=500)
    reader = ProcfsReader(tmp_path)
    assert reader.describe(21) == ("python3", EXPECTED)
    reader.end_cycle([21])
    _make_proc(tmp_path, 21, "0::/user.slice/user-0.slice/session-1.scope\n", "bash", start=900)
    assert reader.describe(21) == ("bash", None)
    assert len(reader) == 1


def test_gone_pid_is_not_cached(tmp_path: Path) -> None:
    reader = ProcfsReader(tmp_path)
    assert reader.describe(30) == (None, None)
    _make_proc(tmp_path, 30, POD_CGROUPS["v2 cgroupfs burstable"])
    assert reader.describe(30) == ("python3", EXPECTED)


def test_end_cycle_forgets_pids_not_seen_so_memory_stays_bounded(tmp_path: Path) -> None:
    reader = ProcfsReader(tmp_path)
    for cycle in range(20):
        pids = range(1000 + cycle * 50, 1000 + cycle * 50 + 50)
        for pid in pids:
            _make_proc(tmp_path, pid, POD_CGROUPS["v2 cgroupfs burstable"], start=pid)
            reader.describe(pid)
        reader.end_cycle(pids)
        assert len(reader) == 50
    reader.end_cycle([])
    assert len(reader) == 0


# --- the simulator's fake procfs -------------------------------------------------------------


def _fleet(count: int = 6) -> list[FakeProcess]:
    processes = []
    for i in range(count):
        uid = f"{i:08x}-2fa1-11d2-883f-0016d3cca427"
        name = ["python3", "tritonserver", "text-generation-launcher"][i % 3]
        processes.append(
            FakeProcess(
                pid=3000 + i,
                name=name,
                cmdline=[f"/usr/bin/{name}", "serve", "--password=secret"],
                pod_uid=uid,
                container_id=fake_container_id(uid, "trainer"),
                start_ticks=10_000 + i,
            )
        )
    processes.append(
        FakeProcess(4000, "Xorg", ["/usr/lib/xorg/Xorg", ":0"], None, None, start_ticks=50)
    )
    return processes


@pytest.mark.parametrize("qos", QOS_CLASSES)
@pytest.mark.parametrize("layout", CGROUP_LAYOUTS)
def test_write_procfs_round_trips_through_the_reader_in_every_layout(
    tmp_path: Path, layout: str, qos: str
) -> None:
    processes = _fleet()
    write_procfs(tmp_path, processes, layout=layout, qos=qos)
    reader = ProcfsReader(tmp_path)
    for process in processes:
        name, container = reader.describe(process.pid)
        assert name == sanitize_command(process.name)
        if process.pod_uid is None:
            assert container is None
        else:
            assert container == ContainerRef(process.pod_uid, str(process.container_id))


def test_write_procfs_files_look_like_the_kernel_s(tmp_path: Path) -> None:
    process = _fleet()[2]  # text-generation-launcher: longer than comm holds
    write_procfs(tmp_path, [process], layout="v1-cgroupfs-docker")
    proc = tmp_path / str(process.pid)
    assert (proc / "comm").read_text() == "text-generation\n"
    assert (proc / "cmdline").read_bytes() == (
        b"/usr/bin/text-generation-launcher\0serve\0--password=secret\0"
    )
    stat = (proc / "stat").read_text().split()
    assert len(stat) == 52
    assert stat[21] == str(process.start_ticks)
    assert len((proc / "cgroup").read_text().splitlines()) == 14


def test_write_procfs_removes_exited_pids_and_replaces_reused_ones(tmp_path: Path) -> None:
    processes = _fleet()
    write_procfs(tmp_path, processes)
    reader = ProcfsReader(tmp_path)
    for process in processes:
        reader.describe(process.pid)
    reader.end_cycle([p.pid for p in processes])
    survivors = processes[:2]
    reused = FakeProcess(
        processes[0].pid, "bash", ["bash"], None, None, start_ticks=processes[0].start_ticks + 1
    )
    write_procfs(tmp_path, [reused, survivors[1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [str(reused.pid), str(survivors[1].pid)]
    )
    for gone in processes[2:]:
        assert reader.describe(gone.pid) == (None, None)
    assert reader.describe(reused.pid) == ("bash", None)
    reader.end_cycle([reused.pid, survivors[1].pid])
    assert len(reader) == 2


def test_write_procfs_is_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    processes = _fleet()
    write_procfs(tmp_path, processes)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    write_procfs(tmp_path, processes)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert before == after
    assert not [p for p in tmp_path.rglob(".*")]


def test_write_procfs_rejects_bad_input(tmp_path: Path) -> None:
    process = _fleet()[0]
    with pytest.raises(ValueError, match="layout"):
        write_procfs(tmp_path, [process], layout="v3-made-up")
    with pytest.raises(ValueError, match="QoS"):
        write_procfs(tmp_path, [process], qos="platinum")
    with pytest.raises(ValueError, match="duplicate"):
        write_procfs(tmp_path, [process, process])
    orphan = FakeProcess(1, "x", ["x"], pod_uid=UID, container_id=None, start_ticks=1)
    with pytest.raises(ValueError, match="container_id"):
        cgroup_text(orphan)


def test_host_process_cgroup_is_none_in_every_layout() -> None:
    host = _fleet()[-1]
    for layout in CGROUP_LAYOUTS:
        assert parse_cgroup(cgroup_text(host, layout)) is None


def test_process_that_exits_between_reads_is_not_cached(tmp_path: Path) -> None:
    _make_proc(tmp_path, 40, POD_CGROUPS["v2 cgroupfs burstable"])
    (tmp_path / "40" / "comm").unlink()  # stat was readable, then the process went away
    reader = ProcfsReader(tmp_path)
    assert reader.describe(40)[0] is None
    assert len(reader) == 0


def test_concurrent_rewrites_never_show_a_reader_half_a_process(tmp_path: Path) -> None:
    processes = _fleet(30)
    write_procfs(tmp_path, processes)
    expected = {p.pid: ContainerRef(p.pod_uid, str(p.container_id)) for p in processes[:-1]}
    stop = threading.Event()

    def churn() -> None:
        layouts = iter(CGROUP_LAYOUTS * 1000)
        while not stop.is_set():
            # Drop half the pids, then bring them back as new processes in another layout.
            write_procfs(tmp_path, processes[::2], layout=next(layouts))
            reborn = [
                FakeProcess(p.pid, p.name, p.cmdline, p.pod_uid, p.container_id, p.start_ticks + 1)
                for p in processes
            ]
            write_procfs(tmp_path, reborn, layout=next(layouts))

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(200):
            reader = ProcfsReader(tmp_path)  # fresh: every answer comes from disk
            for pid, ref in expected.items():
                name, container = reader.describe(pid)
                # Gone for the moment, or whole: never a name without its container.
                assert (name, container) == (None, None) or container == ref
    finally:
        stop.set()
        writer.join()
