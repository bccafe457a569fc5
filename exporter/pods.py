"""Pod UID -> namespace, name, phase, labels and containers, from one node-scoped pod informer.

The exporter learns which pod holds a GPU from the kubelet (pod UID or namespace/name) and from
/proc cgroups (pod UID, container id). Turning those into names and labels must not cost an API
request per scrape, so this module keeps a local copy of the pods on this node: one list, then a
watch that streams changes, like client-go's informers do. A DaemonSet on 1,000 nodes must not
list all pods of the cluster, so both calls carry ``fieldSelector=spec.nodeName=<node>``.

Failure model: the API server may be slow, unreachable or restarted at any time. The store is then
kept as it was (stale but present), failed attempts are counted in ``errors``, and the informer
retries with exponential backoff until it is stopped. Nothing raises out of the background thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

# A container id in the pod status carries the runtime as a URL scheme:
# "containerd://<64 hex>", "cri-o://<64 hex>", "docker://<64 hex>". /proc cgroup paths carry only
# the bare id, so the scheme is stripped, whatever the runtime.
_RUNTIME_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

_CONNECT_TIMEOUT_S = 5.0
_LIST_READ_TIMEOUT_S = 60.0
# The API server ends a watch after timeoutSeconds; a socket silent for longer than that plus
# this margin is a half-open connection (a NAT or load balancer dropped it) and is abandoned.
_WATCH_READ_MARGIN_S = 30.0
_BACKOFF_INITIAL_S = 0.5
# A watch that ends this quickly without an event is treated like a failure for pacing, so a proxy
# that accepts and closes at once cannot make the informer spin.
_SHORT_WATCH_S = 1.0
_STOP_JOIN_S = 1.0
_HTTP_GONE = 410


@dataclass(frozen=True)
class PodInfo:
    """What the exporter needs to know about a pod to label GPU series with it."""

    uid: str
    namespace: str
    name: str
    phase: str  # Pending, Running, Succeeded, Failed or Unknown
    labels: Mapping[str, str]
    # Container id without the runtime prefix -> container name (init containers included).
    containers: Mapping[str, str]


def strip_runtime_prefix(container_id: str) -> str:
    """The bare container id, as cgroup paths show it ("containerd://abc" -> "abc")."""
    return _RUNTIME_PREFIX.sub("", container_id, count=1)


def pod_info_from_json(obj: Mapping[str, Any]) -> PodInfo | None:
    """Keep only the fields the exporter uses from a Pod JSON object; None without a UID."""
    meta = obj.get("metadata") or {}
    uid = meta.get("uid")
    if not uid:
        return None
    status = obj.get("status") or {}
    containers: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses"):
        for cs in status.get(key) or ():
            # containerID is absent until the runtime has created the container.
            cid = cs.get("containerID")
            name = cs.get("name")
            if cid and name:
                containers[strip_runtime_prefix(cid)] = name
    labels = meta.get("labels") or {}
    return PodInfo(
        uid=uid,
        namespace=meta.get("namespace") or "",
        name=meta.get("name") or "",
        phase=status.get("phase") or "Unknown",
        labels=MappingProxyType({str(k): str(v) for k, v in labels.items()}),
        containers=MappingProxyType(containers),
    )


class _Gone(Exception):
    """The resourceVersion we resume from was compacted away (410 Gone): a re-list is needed."""


class _Stopped(Exception):
    """stop() was called while a request was in flight."""


#: Query parameter names of the list/watch call, by the keyword this module uses.
_QUERY_NAMES = {
    "resource_version": "resourceVersion",
    "timeout_seconds": "timeoutSeconds",
    "watch": "watch",
    "allow_watch_bookmarks": "allowWatchBookmarks",
}


class PodInformer:
    """A local, always-readable copy of the pods scheduled on one node.

    ``start()`` runs a daemon thread that lists, then watches, and keeps the store current;
    ``get``/``find``/``pods`` read the store under a lock and never touch the network.
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        node_name: str,
        *,
        watch_timeout_seconds: int = 300,
        backoff_max_seconds: float = 30.0,
    ) -> None:
        self._api = api_client
        self._node = node_name
        self._field_selector = f"spec.nodeName={node_name}"
        self._watch_timeout = int(watch_timeout_seconds)
        self._backoff_max = float(backoff_max_seconds)
        self._lock = threading.Lock()
        self._by_uid: dict[str, PodInfo] = {}
        self._by_name: dict[tuple[str, str], str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None  # the in-flight urllib3 response, so stop() can cut it
        self._backoff_initial = min(_BACKOFF_INITIAL_S, self._backoff_max)
        self._backoff = self._backoff_initial
        self._failing = False
        self._synced_event = threading.Event()
        self.synced = False
        self.errors = 0
        self.requests = 0

    # Lookups: one lock acquisition and a dict lookup; called for every process every cycle.

    def get(self, uid: str) -> PodInfo | None:
        """The pod with this UID, if it is on this node (as far as the last event says)."""
        with self._lock:
            return self._by_uid.get(uid)

    def find(self, namespace: str, name: str) -> PodInfo | None:
        """The pod with this namespace and name (the kubelet pod-resources API gives these)."""
        with self._lock:
            uid = self._by_name.get((namespace, name))
            return self._by_uid.get(uid) if uid is not None else None

    def pods(self) -> list[PodInfo]:
        """A snapshot of all pods known on this node."""
        with self._lock:
            return list(self._by_uid.values())

    @property
    def failing(self) -> bool:
        """True from a failed list/watch attempt until a request gets through again."""
        return self._failing

    def wait_synced(self, timeout: float) -> bool:
        """Block up to ``timeout`` s for the first list, so the first scrape has pod names."""
        return self._synced_event.wait(timeout)

    # Lifecycle.

    def start(self) -> None:
        """Start the list-and-watch thread; returns at once (``synced`` says when data is in)."""
        # One-shot, like the process it serves: a stopped informer stays stopped.
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(
            target=self._run, name=f"pod-informer-{self._node}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread within about a second, cutting an open watch instead of waiting."""
        self._stop.set()
        self._cut_response()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_STOP_JOIN_S)

    # The background thread.

    def _run(self) -> None:
        resource_version: str | None = None
        consistent_list = just_listed = False
        while not self._stop.is_set():
            try:
                just_listed = resource_version is None
                if resource_version is None:
                    resource_version = self._list(consistent=consistent_list)
                    consistent_list = False
                started = time.monotonic()
                resource_version, events = self._watch(resource_version)
                if events == 0 and time.monotonic() - started < _SHORT_WATCH_S:
                    self._pause()
                else:
                    self._backoff = self._backoff_initial
            except _Stopped:
                break
            except _Gone:
                # Normal: etcd compacts history, and a watch resumed after a long gap asks for
                # a resourceVersion that no longer exists. Only a fresh list can catch up.
                log.info("pod watch on node %s: history expired (410 Gone), re-listing", self._node)
                resource_version = None
                # Per client-go: after 410, list with a consistent read (no resourceVersion),
                # so the list cannot be older than what this watch already saw.
                consistent_list = True
                if just_listed:
                    # 410 right after a fresh list: a confused server; do not hammer it.
                    self._pause()
            except Exception as exc:  # the thread must survive anything
                if self._stop.is_set():
                    break
                self.errors += 1
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "lost connection to the Kubernetes API for pods on node %s (%s); "
                        "keeping %d known pods, retrying with backoff up to %.0f s",
                        self._node,
                        _describe(exc),
                        len(self._by_uid),
                        self._backoff_max,
                    )
                else:
                    log.debug("pod list/watch retry failed: %s", _describe(exc))
                self._pause()

    def _pause(self) -> None:
        """Wait the current backoff (interruptible by stop) and double it for next time."""
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self._backoff_max)

    def _connected(self) -> None:
        """A request got through: log the recovery once (backoff resets only on real progress)."""
        if self._failing:
            self._failing = False
            log.info("connection to the Kubernetes API for pods on node %s restored", self._node)

    def _request(self, _request_timeout: Any = None, **params: Any) -> Any:
        """GET /api/v1/pods through the client's ApiClient; the raw urllib3 response.

        What CoreV1Api.list_pod_for_all_namespaces does, without building that class: its
        pydantic-validated methods cost about 17 MiB of memory on a DaemonSet that needs one
        call. The JSON is parsed here, keeping six fields, instead of into V1Pod models.
        """
        query = [("fieldSelector", self._field_selector)]
        query += [(_QUERY_NAMES[name], value) for name, value in params.items()]
        method, url, headers, body, post = self._api.param_serialize(
            method="GET",
            resource_path="/api/v1/pods",
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(
            method,
            url,
            header_params=headers,
            body=body,
            post_params=post,
            _request_timeout=_request_timeout,
        ).response
        if not 200 <= response.status < 300:
            error = ApiException(status=response.status, reason=response.reason)
            with contextlib.suppress(Exception):
                error.body = response.data
            response.release_conn()
            raise error
        return response

    def _open(self, **kwargs: Any) -> Any:
        """Issue a list or watch request and keep its response where stop() can cut it."""
        if self._stop.is_set():
            raise _Stopped
        self.requests += 1
        resp = self._request(**kwargs)
        with self._lock:
            self._resp = resp
        if self._stop.is_set():
            self._cut_response()
            raise _Stopped
        return resp

    def _done(self, resp: Any) -> None:
        with self._lock:
            self._resp = None
        # A cut socket may fail to release; there is nothing left to do with it.
        with contextlib.suppress(Exception):
            resp.release_conn()

    def _cut_response(self) -> None:
        """Shut the socket under the in-flight response, which unblocks a read at once."""
        with self._lock:
            resp = self._resp
        if resp is None:
            return
        # Already released or closed: nothing left to cut.
        with contextlib.suppress(Exception):
            resp.shutdown()

    def _list(self, *, consistent: bool) -> str:
        # resourceVersion="0" lets the API server answer from its watch cache instead of etcd,
        # which is what keeps 1,000 restarting DaemonSet pods cheap (client-go does the same).
        rv = "" if consistent else "0"
        kwargs: dict[str, Any] = {"timeout_seconds": int(_LIST_READ_TIMEOUT_S)}
        if rv:
            kwargs["resource_version"] = rv
        try:
            resp = self._open(_request_timeout=(_CONNECT_TIMEOUT_S, _LIST_READ_TIMEOUT_S), **kwargs)
        except ApiException as exc:
            if exc.status == _HTTP_GONE:
                raise _Gone from exc
            raise
        try:
            body = json.loads(resp.data)
        finally:
            self._done(resp)
        if self._stop.is_set():
            raise _Stopped
        by_uid: dict[str, PodInfo] = {}
        for item in body.get("items") or ():
            info = pod_info_from_json(item)
            if info is not None:
                by_uid[info.uid] = info
        by_name = {(p.namespace, p.name): p.uid for p in by_uid.values()}
        with self._lock:
            # Replaced whole: pods deleted while we were not watching disappear here.
            self._by_uid, self._by_name = by_uid, by_name
        resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        first = not self.synced
        self.synced = True
        self._synced_event.set()
        self._backoff = self._backoff_initial
        self._connected()
        if first:
            log.info("pods on node %s synced: %d pods", self._node, len(by_uid))
        else:
            log.info("pods on node %s re-listed: %d pods", self._node, len(by_uid))
        return resource_version

    def _watch(self, resource_version: str) -> tuple[str, int]:
        """Stream changes from ``resource_version``; return the last version seen and the count.

        Returns normally when the stream ends, whether the server closed it (timeoutSeconds) or
        the connection dropped: either way the caller resumes from the returned version.
        """
        kwargs: dict[str, Any] = {
            "watch": True,
            # Bookmarks carry a fresh resourceVersion on a quiet node, so a resumed watch is less
            # likely to hit 410 after the history of busier namespaces moved on.
            "allow_watch_bookmarks": True,
            "timeout_seconds": self._watch_timeout,
            "_request_timeout": (_CONNECT_TIMEOUT_S, self._watch_timeout + _WATCH_READ_MARGIN_S),
        }
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            resp = self._open(**kwargs)
        except ApiException as exc:
            if exc.status == _HTTP_GONE:
                raise _Gone from exc
            raise
        self._connected()
        events = 0
        try:
            for line in _lines(resp):
                event = json.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    # Errors arrive in-band as a Status object once the stream is open.
                    code = obj.get("code")
                    if code == _HTTP_GONE:
                        raise _Gone
                    reason = f"{obj.get('reason')}: {obj.get('message')}"
                    raise ApiException(status=code, reason=reason)
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED"):
                    self._put(obj)
                elif kind == "DELETED":
                    self._delete(obj)
                # BOOKMARK: only its resourceVersion matters.
                if rv:
                    resource_version = str(rv)
                events += 1
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # A dropped stream (protocol error, reset, read timeout): resume from where we are.
            # Anything else (a malformed event) propagates and is counted as an error.
            if self._stop.is_set():
                raise _Stopped from exc
            log.debug("pod watch stream dropped (%s); resuming from %s", exc, resource_version)
        finally:
            self._done(resp)
        if self._stop.is_set():
            raise _Stopped
        return resource_version, events

    def _put(self, obj: Mapping[str, Any]) -> None:
        info = pod_info_from_json(obj)
        if info is None:
            return
        with self._lock:
            old = self._by_uid.get(info.uid)
            if old is not None and (old.namespace, old.name) != (info.namespace, info.name):
                self._by_name.pop((old.namespace, old.name), None)
            self._by_uid[info.uid] = info
            self._by_name[(info.namespace, info.name)] = info.uid

    def _delete(self, obj: Mapping[str, Any]) -> None:
        uid = str((obj.get("metadata") or {}).get("uid") or "")
        with self._lock:
            old = self._by_uid.pop(uid, None)
            # A pod recreated with the same name (StatefulSet) has a new UID: keep its entry.
            if old is not None and self._by_name.get((old.namespace, old.name)) == uid:
                del self._by_name[(old.namespace, old.name)]


def _lines(resp: Any) -> Iterator[bytes]:
    """Newline-delimited JSON events from a chunked watch response, as they arrive."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line, buffer = buffer[:newline], buffer[newline + 1 :]
            if line.strip():
                yield line
    # A trailing partial line is a truncated event from a cut stream: dropped, not parsed.


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def api_client_from_environment(
    kubeconfig: str | None = None,
) -> kubernetes.client.ApiClient | None:
    """An API client from the pod's service account, else a kubeconfig file, else None.

    In a DaemonSet, KUBERNETES_SERVICE_HOST is set and the service-account token is mounted;
    outside a cluster (a developer laptop) the kubeconfig is used. None means "run without
    Kubernetes": the exporter still serves GPU metrics, only without pod attribution.
    """
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = kubernetes.client.Configuration()
        try:
            # try_refresh_token: bound service-account tokens rotate (hourly); re-read them.
            kubernetes.config.load_incluster_config(
                client_configuration=configuration, try_refresh_token=True
            )
            return kubernetes.client.ApiClient(configuration)
        except kubernetes.config.ConfigException as exc:
            log.warning("in-cluster Kubernetes config unusable (%s); trying a kubeconfig", exc)
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    # KUBECONFIG may list several files (colon-separated); the client merges those that exist.
    if not any(Path(p).expanduser().is_file() for p in path.split(os.pathsep) if p):
        return None
    try:
        return kubernetes.config.new_client_from_config(
            config_file=path,
            # Never write refreshed credentials back into the user's kubeconfig.
            persist_config=False,
        )
    except Exception as exc:  # a broken kubeconfig means "no Kubernetes"
        log.warning("kubeconfig %s unusable: %s", path, exc)
        return None


def api_client_for_url(url: str) -> kubernetes.client.ApiClient:
    """A client for a plain-http API server without auth (the simulator's fake API server)."""
    configuration = kubernetes.client.Configuration(host=url.rstrip("/"))
    return kubernetes.client.ApiClient(configuration)
