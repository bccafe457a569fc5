"""A small local HTTP server that speaks enough of the Kubernetes API for the real client.

It serves pod list and watch the way kube-apiserver does, so the exporter's informer runs the very
`kubernetes` client calls it runs in a cluster: ``fieldSelector``, ``resourceVersion``,
``timeoutSeconds``, chunked newline-delimited watch events, and 410 Gone delivered in-band as an
ERROR event. The pods come from a callable (the simulated fleet); changes between successive
snapshots become ADDED/MODIFIED/DELETED events with increasing resourceVersions.

Fault hooks for tests and the demo: ``drop_watches()`` cuts open watch connections,
``expire_history()`` compacts the event history so a resumed watch gets 410, and ``stop()`` then
``start()`` brings the server down and back on the same port.
"""

from __future__ import annotations

import contextlib
import copy
import json
import select
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Events kept for resumed watches; older resourceVersions get 410 Gone, like a compacted etcd.
HISTORY_LIMIT = 10_000
# How often an idle watch handler wakes to check for stop, drop and its timeout.
_WATCH_TICK_S = 0.05
_SUPPORTED_FIELDS = ("spec.nodeName", "metadata.namespace", "metadata.name")


@dataclass(frozen=True)
class _Event:
    rv: int
    kind: str  # ADDED, MODIFIED or DELETED
    old: Mapping[str, Any] | None  # the object before the change (None for ADDED)
    new: Mapping[str, Any]  # the object after it (the last state, for DELETED)


def _field(obj: Mapping[str, Any], path: str) -> str:
    section, _, key = path.partition(".")
    return str((obj.get(section) or {}).get(key) or "")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A metav1.Status object, the body of every API error."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeApiServer:
    """Serves ``GET /api/v1/pods`` (list and watch) over the pods returned by ``pods()``."""

    def __init__(
        self,
        pods: Callable[[], Sequence[Mapping[str, Any]]],
        *,
        poll_interval: float = 0.2,
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        """`history_limit`: watch events kept for resuming watches (older ones: 410 Gone)."""
        self._pods_fn = pods
        self._poll_interval = poll_interval
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[str, dict[str, Any]] = {}
        self._history: deque[_Event] = deque(maxlen=history_limit)
        self._compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self._drop_generation = 0
        self._running = False
        self._port = 0
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self.requests: list[str] = []
        self.url = ""

    # Lifecycle.

    def start(self) -> None:
        """Serve on 127.0.0.1; after a stop(), on the same port, with history and versions kept."""
        if self._running:
            return
        self._refresh()
        server = ThreadingHTTPServer(("127.0.0.1", self._port), _handler_class(self))
        server.daemon_threads = True
        self._server = server
        self._port = server.server_address[1]
        self.url = f"http://127.0.0.1:{self._port}"
        with self._cond:
            self._running = True
        self._threads = [
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True),
            threading.Thread(target=self._poll_loop, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Go away like a crashed API server: listener closed, every open connection cut."""
        if not self._running or self._server is None:
            return
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._cut_all()
        for t in self._threads:
            t.join(2.0)
        self._server = None

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Fault hooks.

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream; clients must resume."""
        with self._cond:
            self._drop_generation += 1
            self._cond.notify_all()

    def expire_history(self) -> None:
        """Compact history: the next watch from any resourceVersion seen so far gets 410 Gone.

        The version counter moves on as well (in a cluster, other objects change it), so a fresh
        list returns a version that is not itself expired.
        """
        with self._cond:
            self._rv += 1
            self._compacted = self._rv
            self._history.clear()

    # State.

    def _poll_loop(self) -> None:
        while True:
            with self._cond:
                if not self._running:
                    return
                self._cond.wait(self._poll_interval)
                if not self._running:
                    return
            with contextlib.suppress(Exception):  # a failing pods() is the simulator's problem
                self._refresh()

    def _refresh(self) -> None:
        """Diff the current pods against the last snapshot and record the changes as events."""
        current: dict[str, dict[str, Any]] = {}
        for raw in self._pods_fn():
            obj = copy.deepcopy(dict(raw))
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", "default")
            if not meta.get("uid"):
                key = f"{meta['namespace']}/{meta.get('name', '')}"
                meta["uid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, key))
            meta.pop("resourceVersion", None)
            obj.setdefault("kind", "Pod")
            obj.setdefault("apiVersion", "v1")
            _default_container_statuses(obj)
            current[meta["uid"]] = obj
        with self._cond:
            changed = False
            for uid, obj in current.items():
                old = self._objects.get(uid)
                if old is not None and _without_rv(old) == obj:
                    continue
                self._record("ADDED" if old is None else "MODIFIED", old, obj)
                changed = True
            for uid in [u for u in self._objects if u not in current]:
                old = self._objects[uid]
                self._record("DELETED", old, copy.deepcopy(old))
                changed = True
            if changed:
                self._cond.notify_all()

    def _record(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        uid = new["metadata"]["uid"]
        if kind == "DELETED":
            self._objects.pop(uid, None)
        else:
            self._objects[uid] = new
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv + 1
        self._history.append(_Event(self._rv, kind, old, new))

    # Request handling (called from the handler threads).

    def _serve(self, handler: _Handler) -> None:
        self.requests.append(handler.path)
        url = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        if url.path == "/version":
            handler.send_json(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake"})
        elif url.path == "/api":
            handler.send_json(200, {"kind": "APIVersions", "versions": ["v1"]})
        elif parts == ["api", "v1", "pods"]:
            self._pods(handler, query, namespace=None)
        elif len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            self._pods(handler, query, namespace=parts[3])
        else:
            msg = f"the server could not find the requested resource {url.path}"
            handler.send_json(404, _status(404, "NotFound", msg))

    def _pods(self, handler: _Handler, query: dict[str, str], namespace: str | None) -> None:
        if "labelSelector" in query:
            handler.send_json(400, _status(400, "BadRequest", "labelSelector: not supported"))
            return
        terms: list[tuple[str, str, bool]] = []
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            negate = "!=" in term
            name, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
            if name not in _SUPPORTED_FIELDS:
                msg = f'"{name}" is not a known field selector: only {_SUPPORTED_FIELDS}'
                handler.send_json(400, _status(400, "BadRequest", msg))
                return
            terms.append((name, value, negate))
        if namespace is not None:
            terms.append(("metadata.namespace", namespace, False))

        def matches(obj: Mapping[str, Any] | None) -> bool:
            return obj is not None and all(
                (_field(obj, name) == value) != negate for name, value, negate in terms
            )

        if query.get("watch") in ("true", "1"):
            self._watch(handler, query, matches)
            return
        with self._cond:
            items = [o for o in self._objects.values() if matches(o)]
            rv = self._rv
        items.sort(key=lambda o: (o["metadata"]["namespace"], o["metadata"].get("name", "")))
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}
        handler.send_json(200, {**body, "items": items})

    def _watch(
        self,
        handler: _Handler,
        query: dict[str, str],
        matches: Callable[[Mapping[str, Any] | None], bool],
    ) -> None:
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        since = query.get("resourceVersion") or ""
        with self._cond:
            generation = self._drop_generation
            first: list[tuple[str, Mapping[str, Any]]]
            if since in ("", "0"):
                # "Any version": the stream starts with the current state as ADDED events.
                cursor = self._rv
                first = [("ADDED", o) for o in self._objects.values() if matches(o)]
            else:
                try:
                    cursor = int(since)
                except ValueError:
                    msg = f"invalid resourceVersion {since!r}"
                    handler.send_json(400, _status(400, "BadRequest", msg))
                    return
                first = []  # the stream starts with what changed after `since`
                if cursor < self._compacted:
                    # The real API server answers 200 and reports the expiry in-band.
                    msg = f"too old resource version: {cursor} ({self._compacted})"
                    first = [("ERROR", _status(410, "Expired", msg))]
        handler.start_chunked()
        try:
            for kind, obj in first:
                handler.write_chunk(_event_line(kind, obj))
            if first and first[0][0] == "ERROR":
                handler.end_chunked()
                return
            while True:
                with self._cond:
                    pending = self._since(cursor)
                    if not pending and self._running and generation == self._drop_generation:
                        self._cond.wait(min(_WATCH_TICK_S, max(0.0, deadline - time.monotonic())))
                        pending = self._since(cursor)
                    running, dropped = self._running, generation != self._drop_generation
                for event in pending:
                    cursor = event.rv
                    for kind, obj in _filtered(event, matches):
                        handler.write_chunk(_event_line(kind, obj))
                if dropped or not running:
                    handler.cut()
                    return
                if handler.client_gone():
                    return
                if time.monotonic() >= deadline:
                    handler.end_chunked()
                    return
        except OSError:  # the client went away
            handler.close_connection = True

    def _since(self, cursor: int) -> list[_Event]:
        """Events after ``cursor``, oldest first; scans from the newest end (history is ordered)."""
        newer: list[_Event] = []
        for event in reversed(self._history):
            if event.rv <= cursor:
                break
            newer.append(event)
        newer.reverse()
        return newer

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)

    def _cut_all(self) -> None:
        with self._cond:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _default_container_statuses(obj: dict[str, Any]) -> None:
    """Fill the container-status fields the real API server always sets.

    The client's models require them, so a sparse pod from the simulator would otherwise fail
    to deserialise in any client that builds V1Pod objects.
    """
    status = obj.get("status") or {}
    for key in ("initContainerStatuses", "containerStatuses"):
        for cs in status.get(key) or ():
            cs.setdefault("ready", False)
            cs.setdefault("restartCount", 0)
            cs.setdefault("image", "")
            cs.setdefault("imageID", "")


def _without_rv(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


def _filtered(
    event: _Event, matches: Callable[[Mapping[str, Any] | None], bool]
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The event as a watcher with a field selector sees it.

    Like the API server's watch cache: an object that starts matching is ADDED for this watcher,
    one that stops matching is DELETED, even when the underlying change was a MODIFIED.
    """
    was, now = matches(event.old), matches(event.new)
    if event.kind == "DELETED":
        if was:
            yield "DELETED", event.new
    elif was and now:
        yield "MODIFIED", event.new
    elif now:
        yield "ADDED", event.new
    elif was:
        yield "DELETED", event.new


def _event_line(kind: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 for chunked watch streams and keep-alive, as the real API server speaks it.
    protocol_version = "HTTP/1.1"
    api: FakeApiServer

    def setup(self) -> None:
        super().setup()
        self.api._track(self.connection, True)

    def finish(self) -> None:
        self.api._track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self.api._serve(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in FakeApiServer.requests; stderr stays quiet in tests

    def send_json(self, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client closed its end (a watch client sends nothing, so EOF is a close)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def cut(self) -> None:
        """Drop the connection without ending the stream, like a lost TCP connection."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _handler_class(api: FakeApiServer) -> type[_Handler]:
    return type("BoundHandler", (_Handler,), {"api": api})
