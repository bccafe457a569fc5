"""Per-process metrics and pod attribution, through a real gRPC kubelet, a local Kubernetes
API server, a procfs tree and the simulated driver: the code a real node runs."""

from __future__ import annotations

import logging

import pytest

from exporter.catalogue import CATALOGUE
from exporter.main import build_attribution, build_parser
from exporter.simulator.pods import processes_at
from tests.unit.exporter_harness import FLEETS, T0, one, running_attributed_node, select

FLEET = FLEETS / "attribution.yaml"


def by_pod(samples: dict[frozenset[tuple[str, str]], float]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for labels in samples:
        as_dict = dict(labels)
        out.setdefault(as_dict.get("pod", ""), []).append(as_dict)
    return out


def test_each_process_is_published_with_its_pod_memory_and_utilization() -> None:
    with running_attributed_node(FLEET, "attr-node", pod_labels=("team",)) as node:
        series = node.cycle()
        truth = processes_at(node.driver.fleet, "attr-node", T0)
    published = {name for name, _ in series}
    kubernetes_families = {
        name for name, spec in CATALOGUE.items() if spec.group in ("process", "allocation")
    }
    assert kubernetes_families <= published
    info = select(series, "gpu_process_info")
    assert len(info) == len(truth) == 8
    for process in truth:
        (labels,) = (dict(k) for k in info if dict(k)["pid"] == str(process.pid))
        assert labels["namespace"] == process.namespace
        assert labels["pod"] == process.pod
        assert labels["container"] == process.container
        assert labels["gpu"] == str(process.gpu)
        assert labels["type"] == process.kind
        memory = one(series, "gpu_process_memory_used_bytes", pid=str(process.pid))
        assert memory == process.memory_bytes
        if process.gpu_instance is None:
            sm = one(series, "gpu_process_sm_utilization_ratio", pid=str(process.pid))
            assert sm == pytest.approx(process.sm_util / 100)
        else:
            assert labels["gpu_instance"] == str(process.gpu_instance)
            assert labels["mig_profile"] in ("3g.40gb", "4g.40gb")
            assert not select(series, "gpu_process_sm_utilization_ratio", pid=str(process.pid))
    trainer = [dict(k) for k in info if dict(k)["pod"] == "trainer-0"]
    assert {t["command"] for t in trainer} == {"python3", "data-loader", "Xorg"}
    assert {t["label_team"] for t in trainer} == {"vision"}
    assert one(series, "gpu_processes", gpu="2") == 3
    assert one(series, "gpu_node_processes") == 8


def test_arguments_never_reach_labels() -> None:
    with running_attributed_node(FLEET, "attr-node") as node:
        node.cycle()
        body = node.exporter.exposition().decode()
    assert "secret" not in body and "password" not in body and "train.py" not in body


def test_allocations_cover_whole_gpus_mig_slices_and_time_sliced_shares() -> None:
    with running_attributed_node(FLEET, "attr-node", pod_labels=("team",)) as node:
        series = node.cycle()
    allocations = by_pod(select(series, "gpu_allocation_info"))
    assert set(allocations) == {
        "trainer-0",
        "llm-small",
        "llm-large",
        "notebook-a",
        "notebook-b",
        "notebook-c",
    }
    assert "finished-job" not in allocations  # Succeeded pods are not credited
    (small,) = allocations["llm-small"]
    assert (small["gpu"], small["gpu_instance"], small["mig_profile"]) == ("1", "2", "3g.40gb")
    assert small["resource"] == "nvidia.com/mig-3g.40gb"
    assert small["label_team"] == "nlp"
    shared = [
        labels for pod in ("notebook-a", "notebook-b", "notebook-c") for labels in allocations[pod]
    ]
    assert {labels["uuid"] for labels in shared} == {allocations["notebook-a"][0]["uuid"]}
    assert all(labels["gpu_instance"] == "" for labels in shared) or all(
        "gpu_instance" not in labels for labels in shared
    )
    assert one(series, "gpu_allocatable_devices", resource="nvidia.com/gpu") == 6
    assert one(series, "gpu_allocatable_devices", resource="nvidia.com/mig-3g.40gb") == 1
    assert one(series, "gpu_exporter_attribution_up", source="kubelet") == 1
    assert one(series, "gpu_exporter_attribution_up", source="apiserver") == 1


def test_legacy_mig_ids_single_strategy_and_cgroup_v1_docker_attribute_too() -> None:
    with running_attributed_node(FLEET, "legacy-node") as node:
        series = node.cycle()
    allocations = by_pod(select(series, "gpu_allocation_info"))
    assert allocations["worker-7"][0]["gpu_instance"] == "7"
    assert allocations["worker-8"][0]["gpu_instance"] == "8"
    assert allocations["worker-7"][0]["resource"] == "nvidia.com/gpu"
    processes = by_pod(select(series, "gpu_process_info"))
    assert processes["worker-7"][0]["gpu_instance"] == "7"
    assert processes["worker-7"][0]["namespace"] == "batch"
    assert processes["worker-7"][0]["container"] == "main"


def test_process_series_are_capped_per_gpu_and_the_rest_counted() -> None:
    with running_attributed_node(FLEET, "attr-node", process_series_limit=1) as node:
        series = node.cycle()
    assert len(select(series, "gpu_process_info", gpu="0")) == 1
    assert len(select(series, "gpu_process_info", gpu="2")) == 1
    assert one(series, "gpu_processes", gpu="2") == 3  # the count is still the truth
    # GPU 0 drops two of three, GPU 1 (MIG) one of two, GPU 2 two of three.
    assert one(series, "gpu_exporter_process_series_dropped_total") == 5


def test_gpu_metrics_survive_the_kubelet_going_away_and_attribution_comes_back() -> None:
    with running_attributed_node(FLEET, "attr-node") as node:
        node.cycle()
        node.services.kubelet.set_unavailable(True)
        down = node.cycle(advance=5)
        node.services.kubelet.set_unavailable(False)
        back = node.cycle(advance=5)
    assert one(down, "gpu_exporter_attribution_up", source="kubelet") == 0
    assert one(down, "gpu_exporter_attribution_errors_total", source="kubelet") == 1
    assert len(select(down, "gpu_temperature_celsius")) == 5
    assert select(down, "gpu_process_info")  # processes still map through /proc and the API
    assert one(back, "gpu_exporter_attribution_up", source="kubelet") == 1
    assert len(by_pod(select(back, "gpu_allocation_info"))) == 6


def test_without_kubernetes_the_exporter_says_so_once_and_publishes_no_pod_labels(
    tmp_path, caplog
) -> None:  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(
        ["--kubelet-socket", str(tmp_path / "missing.sock"), "--kubeconfig", str(tmp_path / "none")]
    )
    with caplog.at_level(logging.WARNING):
        attribution, informer = build_attribution(args, "attr-node")
        attribution.announce()
    assert informer is None and attribution.pod_resources is None
    assert [r.getMessage() for r in caplog.records] == [
        "not on Kubernetes (no kubelet socket, no API access): pod labels off"
    ]
