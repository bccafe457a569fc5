"""The pod informer, run with the real `kubernetes` client against the fake API server.

Nothing is patched: the informer opens real HTTP list and watch requests to a local server that
answers like kube-apiserver (field selectors, resourceVersions, chunked watch streams, in-band
410 Gone), and the tests break that server the ways a cluster breaks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client
import kubernetes.watch
import pytest

from exporter.pods import (
    PodInformer,
    api_client_for_url,
    api_client_from_environment,
    strip_runtime_prefix,
)
from exporter.simulator.apiserver import FakeApiServer

NODE = "gpu-node-1"
OTHER_NODE = "gpu-node-2"
# The informer must see a change well within one scrape interval; tests allow this much.
PROPAGATION_LIMIT_S = 1.0


def make_pod(
    uid: str,
    name: str,
    *,
    namespace: str = "ml",
    node: str | None = NODE,
    phase: str = "Running",
    labels: dict[str, str] | None = None,
    containers: dict[str, str] | None = None,
    init_containers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Pod as the API server returns it (container name -> full runtime container id)."""

    def statuses(spec: dict[str, str] | None) -> list[dict[str, Any]]:
        return [{"name": n, "containerID": cid, "ready": True} for n, cid in (spec or {}).items()]

    pod: dict[str, Any] = {
        "metadata": {"uid": uid, "name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"containers": [{"name": n, "image": "x"} for n in containers or {}]},
        "status": {
            "phase": phase,
            "containerStatuses": statuses(containers),
            "initContainerStatuses": statuses(init_containers),
        },
    }
    if node is not None:
        pod["spec"]["nodeName"] = node
    return pod


class Cluster:
    """The pods the fake API server serves; tests change them as a cluster would."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, dict[str, Any]] = {}

    def put(self, pod: dict[str, Any]) -> None:
        with self._lock:
            self._pods[pod["metadata"]["uid"]] = pod

    def delete(self, uid: str) -> None:
        with self._lock:
            del self._pods[uid]

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._pods.values())


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - start


def query_of(path: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}


def lists(server: FakeApiServer) -> list[dict[str, str]]:
    return [q for q in map(query_of, server.requests) if q.get("watch") != "true"]


def watches(server: FakeApiServer) -> list[dict[str, str]]:
    return [q for q in map(query_of, server.requests) if q.get("watch") == "true"]


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster()
    c.put(
        make_pod(
            "uid-train",
            "train-0",
            labels={"team": "vision"},
            containers={"main": "containerd://aaa"},
        )
    )
    c.put(
        make_pod(
            "uid-serve", "serve-0", namespace="inference", containers={"srv": "containerd://bbb"}
        )
    )
    c.put(make_pod("uid-elsewhere", "other-0", node=OTHER_NODE))
    return c


@pytest.fixture
def server(cluster: Cluster) -> Iterator[FakeApiServer]:
    s = FakeApiServer(cluster.snapshot, poll_interval=0.02)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def start_informer(server: FakeApiServer) -> Iterator[Callable[..., PodInformer]]:
    started: list[PodInformer] = []

    def start(**kwargs: Any) -> PodInformer:
        kwargs.setdefault("backoff_max_seconds", 0.4)
        informer = PodInformer(api_client_for_url(server.url), NODE, **kwargs)
        informer.start()
        started.append(informer)
        wait_until(lambda: informer.synced)
        # The watch is open once the server has seen it; changes from here on are streamed.
        wait_until(lambda: len(watches(server)) >= 1)
        return informer

    yield start
    for informer in started:
        informer.stop()


def test_initial_list_fills_the_store_with_this_nodes_pods_only(
    server: FakeApiServer, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer()

    assert sorted(p.name for p in informer.pods()) == ["serve-0", "train-0"]
    train = informer.get("uid-train")
    assert train is not None
    assert (train.namespace, train.name, train.phase) == ("ml", "train-0", "Running")
    assert dict(train.labels) == {"team": "vision"}
    assert dict(train.containers) == {"aaa": "main"}
    assert informer.find("inference", "serve-0") == informer.get("uid-serve")
    assert informer.get("uid-elsewhere") is None
    assert informer.find("ml", "other-0") is None
    # One node-scoped list from the API server's cache, then a watch from the list's version.
    first_list, first_watch = lists(server)[0], watches(server)[0]
    assert first_list["fieldSelector"] == f"spec.nodeName={NODE}"
    assert first_list["resourceVersion"] == "0"
    assert first_watch["fieldSelector"] == f"spec.nodeName={NODE}"
    assert first_watch["resourceVersion"] != "0"


def test_added_changed_and_removed_pods_show_up_within_a_second(
    cluster: Cluster, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer()

    cluster.put(make_pod("uid-new", "new-0", phase="Pending"))
    added = wait_until(lambda: informer.get("uid-new") is not None, PROPAGATION_LIMIT_S)

    cluster.put(
        make_pod("uid-new", "new-0", labels={"team": "nlp"}, containers={"c": "cri-o://ccc"})
    )
    changed = wait_until(
        lambda: (p := informer.get("uid-new")) is not None and p.phase == "Running",
        PROPAGATION_LIMIT_S,
    )
    new = informer.get("uid-new")
    assert new is not None
    assert dict(new.labels) == {"team": "nlp"}
    assert dict(new.containers) == {"ccc": "c"}

    cluster.delete("uid-train")
    removed = wait_until(lambda: informer.get("uid-train") is None, PROPAGATION_LIMIT_S)
    assert informer.find("ml", "train-0") is None
    print(f"propagation: added {added:.3f}s changed {changed:.3f}s removed {removed:.3f}s")


def test_pods_on_other_nodes_are_not_seen_until_bound_here(
    cluster: Cluster, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer()

    cluster.put(make_pod("uid-far", "far-0", node=OTHER_NODE))
    cluster.put(make_pod("uid-unscheduled", "queued-0", node=None, phase="Pending"))
    cluster.put(make_pod("uid-marker", "marker-0"))
    wait_until(lambda: informer.get("uid-marker") is not None)
    assert informer.get("uid-far") is None
    assert informer.get("uid-unscheduled") is None

    # The scheduler binds the pending pod to this node: the field-selected watch reports ADDED.
    cluster.put(make_pod("uid-unscheduled", "queued-0", node=NODE, phase="Pending"))
    wait_until(lambda: informer.get("uid-unscheduled") is not None, PROPAGATION_LIMIT_S)


def test_a_pod_recreated_under_the_same_name_is_found_by_its_new_uid(
    cluster: Cluster, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer()

    # A StatefulSet replaces train-0: same name, new UID.
    cluster.delete("uid-train")
    cluster.put(make_pod("uid-train-2", "train-0"))
    wait_until(
        lambda: informer.get("uid-train") is None and informer.get("uid-train-2") is not None
    )
    found = informer.find("ml", "train-0")
    assert found is not None and found.uid == "uid-train-2"


def test_a_dropped_watch_resumes_from_the_last_version_without_a_relist(
    server: FakeApiServer, cluster: Cluster, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer()
    cluster.put(make_pod("uid-before", "before-0"))
    wait_until(lambda: informer.get("uid-before") is not None)

    server.drop_watches()
    wait_until(lambda: len(watches(server)) >= 2)
    cluster.put(make_pod("uid-after", "after-0"))
    wait_until(lambda: informer.get("uid-after") is not None, PROPAGATION_LIMIT_S)

    assert len(lists(server)) == 1
    resumed = watches(server)[1]
    assert int(resumed["resourceVersion"]) > int(watches(server)[0]["resourceVersion"])
    assert informer.errors == 0


def test_a_watch_ended_by_its_timeout_is_resumed_without_a_relist(
    server: FakeApiServer, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer(watch_timeout_seconds=1)

    wait_until(lambda: len(watches(server)) >= 2, timeout=3.0)

    assert watches(server)[0]["timeoutSeconds"] == "1"
    assert len(lists(server)) == 1
    assert informer.errors == 0


def test_410_gone_forces_a_consistent_relist_and_the_store_is_right_after_it(
    server: FakeApiServer, cluster: Cluster, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer()

    # Changes the informer cannot stream: the server is down while they happen, and its
    # history is compacted, so the watch resumed afterwards is answered with 410 Gone.
    server.stop()
    cluster.delete("uid-serve")
    cluster.put(make_pod("uid-late", "late-0"))
    server.expire_history()
    server.start()

    wait_until(lambda: len(lists(server)) == 2)
    wait_until(lambda: informer.get("uid-late") is not None and informer.get("uid-serve") is None)
    assert sorted(p.name for p in informer.pods()) == ["late-0", "train-0"]
    # After 410 the list must not be served from a cache older than what was watched.
    assert "resourceVersion" not in lists(server)[1]


def test_410_gone_on_an_open_connection_relists_without_counting_an_error(
    server: FakeApiServer, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer()

    server.expire_history()
    server.drop_watches()

    wait_until(lambda: len(lists(server)) == 2)
    wait_until(lambda: len(watches(server)) >= 3)  # first, the one answered 410, after re-list
    assert informer.errors == 0
    assert sorted(p.name for p in informer.pods()) == ["serve-0", "train-0"]


def test_api_server_down_counts_errors_keeps_the_store_and_recovers_on_its_return(
    server: FakeApiServer,
    cluster: Cluster,
    start_informer: Callable[..., PodInformer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    informer = start_informer()
    caplog.set_level(logging.INFO, logger="exporter.pods")

    assert not informer.failing
    server.stop()
    wait_until(lambda: informer.errors >= 3)
    assert informer.failing
    # Stale but present: attribution keeps working from what was last known.
    assert informer.get("uid-train") is not None
    assert sorted(p.name for p in informer.pods()) == ["serve-0", "train-0"]
    lost = [r for r in caplog.records if "lost connection" in r.getMessage()]
    assert len(lost) == 1, "the outage is logged once, not per retry"

    cluster.put(make_pod("uid-while-down", "later-0"))
    server.start()  # same port, same history: the watch resumes from its last version
    wait_until(lambda: informer.get("uid-while-down") is not None)
    assert not informer.failing
    errors = informer.errors
    time.sleep(0.3)
    assert informer.errors == errors
    assert len(lists(server)) == 1
    assert sum("restored" in r.getMessage() for r in caplog.records) == 1


def test_wait_synced_blocks_until_the_first_list_or_the_timeout(server: FakeApiServer) -> None:
    informer = PodInformer(api_client_for_url(server.url), NODE)
    assert informer.wait_synced(timeout=0.05) is False  # not started: never synced
    informer.start()
    try:
        assert informer.wait_synced(timeout=2.0) is True
        assert informer.synced and informer.get("uid-train") is not None
    finally:
        informer.stop()


def test_lookups_never_touch_the_api_server(
    server: FakeApiServer, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer()
    requests_before, served_before = informer.requests, len(server.requests)

    for _ in range(10_000):
        informer.get("uid-train")
        informer.get("uid-missing")
        informer.find("ml", "train-0")
    informer.pods()

    assert informer.requests == requests_before == 2  # one list, one watch
    assert len(server.requests) == served_before


def test_stop_returns_within_a_second_from_an_open_watch(
    start_informer: Callable[..., PodInformer],
) -> None:
    informer = start_informer(watch_timeout_seconds=300)
    time.sleep(0.2)

    started = time.monotonic()
    informer.stop()
    elapsed = time.monotonic() - started

    assert elapsed < 1.0
    assert not any(t.name.startswith("pod-informer-") for t in threading.enumerate())
    print(f"stop latency mid-watch: {elapsed * 1000:.1f} ms")


def test_stop_returns_within_a_second_while_backing_off(
    server: FakeApiServer, start_informer: Callable[..., PodInformer]
) -> None:
    informer = start_informer(backoff_max_seconds=30.0)
    server.stop()
    wait_until(lambda: informer.errors >= 1)

    started = time.monotonic()
    informer.stop()

    assert time.monotonic() - started < 1.0
    assert not any(t.name.startswith("pod-informer-") for t in threading.enumerate())


def test_container_ids_lose_their_runtime_prefix(
    cluster: Cluster, start_informer: Callable[..., PodInformer]
) -> None:
    cluster.put(
        make_pod(
            "uid-mixed",
            "mixed-0",
            containers={"a": "containerd://c0ffee", "b": "cri-o://beef", "c": "docker://d00d"},
            init_containers={"setup": "containerd://1717"},
        )
    )
    # A container the runtime has not created yet has a status but no containerID.
    waiting = make_pod("uid-waiting", "waiting-0", phase="Pending")
    waiting["status"]["containerStatuses"] = [{"name": "main", "ready": False}]
    cluster.put(waiting)
    informer = start_informer()

    wait_until(lambda: informer.get("uid-waiting") is not None)
    mixed = informer.get("uid-mixed")
    assert mixed is not None
    assert dict(mixed.containers) == {"c0ffee": "a", "beef": "b", "d00d": "c", "1717": "setup"}
    waiting_info = informer.get("uid-waiting")
    assert waiting_info is not None and dict(waiting_info.containers) == {}
    assert strip_runtime_prefix("abc123") == "abc123"


def test_no_kubernetes_config_means_no_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert api_client_from_environment() is None
    assert api_client_from_environment(str(tmp_path / "missing")) is None


def test_a_kubeconfig_file_yields_a_working_client(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: FakeApiServer,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server.url}"}}}}]
users: [{{name: dev, user: {{token: not-a-secret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: dev}}}}]
current-context: fake
"""
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    api = api_client_from_environment()
    assert api is not None
    informer = PodInformer(api, NODE)
    informer.start()
    try:
        wait_until(lambda: informer.synced)
        assert informer.get("uid-train") is not None
    finally:
        informer.stop()


def test_fake_api_server_speaks_the_clients_own_list_and_watch(
    server: FakeApiServer, cluster: Cluster
) -> None:
    core = kubernetes.client.CoreV1Api(api_client_for_url(server.url))

    # Fully deserialised into the client's models: the JSON has the shapes the client expects.
    pod_list: Any = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}")
    assert sorted(p.metadata.name for p in pod_list.items) == ["serve-0", "train-0"]
    assert pod_list.items[0].status.container_statuses[0].container_id.startswith("containerd://")
    in_namespace: Any = core.list_namespaced_pod("inference")
    assert [p.metadata.name for p in in_namespace.items] == ["serve-0"]

    cluster.put(make_pod("uid-w", "w-0"))
    events = [
        (e["type"], e["object"].metadata.name)
        for e in kubernetes.watch.Watch().stream(
            core.list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={NODE}",
            resource_version=pod_list.metadata.resource_version,
            timeout_seconds=1,
        )
    ]
    assert events == [("ADDED", "w-0")]


def test_fake_api_server_reports_expired_history_in_band_as_the_real_one_does(
    server: FakeApiServer,
) -> None:
    core = kubernetes.client.CoreV1Api(api_client_for_url(server.url))
    listed: Any = core.list_pod_for_all_namespaces()
    old = listed.metadata.resource_version
    server.expire_history()

    with pytest.raises(kubernetes.client.ApiException) as gone:
        # The client's Watch retries a 410 once by itself and raises the second.
        list(
            kubernetes.watch.Watch().stream(
                core.list_pod_for_all_namespaces, resource_version=old, timeout_seconds=1
            )
        )
    assert gone.value.status == 410
