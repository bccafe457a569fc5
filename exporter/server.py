"""HTTP serving of /metrics and /healthz from the exporter's cached exposition.

Optionally behind TLS, mutual TLS and basic auth (`exporter.webconfig`), and always behind two
caps: concurrent requests beyond `max_requests` are answered 503 at once, and connections
beyond four times that are closed at accept, so neither a scrape storm nor idle connections
can grow threads without bound.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

from exporter.webconfig import PLAIN, BasicAuth, WebConfig, WebConfigWatcher, peer_sans

log = logging.getLogger(__name__)

#: Seconds a client may take for the TLS handshake, and may stay silent on a kept-alive
#: connection, before it is closed.
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
DEFAULT_MAX_REQUESTS = 40
_REALM = 'Basic realm="gpu-exporter"'


class Source(Protocol):
    def exposition(self, gzipped: bool = False) -> bytes: ...

    def healthy(self) -> bool: ...


class _NoLimit:
    """Stands in for the request semaphore when the cap is off (--web.max-requests=0)."""

    def acquire(self, blocking: bool = True) -> bool:
        return True

    def release(self) -> None:
        pass


class MetricsServer(ThreadingHTTPServer):
    """A threading HTTP server whose handlers only copy prepared bytes: no NVML, no locks held."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        source: Source,
        *,
        web: WebConfigWatcher | None = None,
        max_requests: int = DEFAULT_MAX_REQUESTS,
    ) -> None:
        self.source = source
        self.web = web
        self.auth = BasicAuth()
        self.max_requests = max_requests
        self.slots: threading.BoundedSemaphore | _NoLimit = (
            threading.BoundedSemaphore(max_requests) if max_requests > 0 else _NoLimit()
        )
        self.max_connections = 4 * max_requests if max_requests > 0 else 0
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._cap_logged_at = -1e9
        super().__init__(address, _Handler)

    @property
    def scheme(self) -> str:
        return "https" if self.config().tls is not None else "http"

    def config(self) -> WebConfig:
        return self.web.current() if self.web is not None else PLAIN

    def serve_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread

    # -- connections -------------------------------------------------------------------------
    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Runs on the accept thread: refuse a connection beyond the cap before a thread."""
        with self._connections_lock:
            if self.max_connections and self._connections >= self.max_connections:
                self.note_cap_reached()
                return False
            self._connections += 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's own thread: TLS handshake (if configured), then HTTP."""
        connection = None
        try:
            connection = self._secure(request, client_address)
            if connection is not None:
                self.finish_request(connection, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(connection if connection is not None else request)
            with self._connections_lock:
                self._connections -= 1

    def _secure(self, request: socket.socket, client_address: Any) -> socket.socket | None:
        config = self.config()
        if config.tls is None:
            return request
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            connection = config.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            # A scanner, a client without a certificate, an old TLS version: not our error.
            log.debug("TLS handshake with %s failed: %s", client_address[0], error)
            return None
        if config.allowed_sans and not peer_sans(connection.getpeercert()) & config.allowed_sans:
            log.debug("client certificate of %s has none of the allowed SANs", client_address[0])
            connection.close()
            return None
        return connection

    def note_cap_reached(self) -> None:
        """Say so at most once a minute: the cap protects the node, the log should too."""
        now = time.monotonic()
        if now - self._cap_logged_at >= 60:
            self._cap_logged_at = now
            log.warning(
                "more than %d concurrent requests: answering 503 (raise --web.max-requests?)",
                self.max_requests,
            )


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT

    def do_GET(self) -> None:
        server = self.server
        if not server.slots.acquire(blocking=False):
            server.note_cap_reached()
            message = f"too many concurrent requests (limit {server.max_requests}); retry later\n"
            self._reply(503, message.encode(), {"Content-Type": "text/plain", "Retry-After": "1"})
            return
        try:
            self._serve(server.config())
        finally:
            server.slots.release()

    def _serve(self, config: WebConfig) -> None:
        path = self.path.split("?", 1)[0]
        extra = config.headers
        if (
            config.users
            and path not in config.auth_excluded_paths
            and not self.server.auth.check(self.headers.get("Authorization"), config.users)
        ):
            self._reply(
                401,
                b"unauthorized\n",
                {"Content-Type": "text/plain", "WWW-Authenticate": _REALM},
                extra,
            )
            return
        if path == "/metrics":
            gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
            body = self.server.source.exposition(gzipped=gzipped)
            headers = {"Content-Type": CONTENT_TYPE_LATEST}
            if gzipped:
                headers["Content-Encoding"] = "gzip"
            self._reply(200, body, headers, extra)
        elif path == "/healthz":
            if self.server.source.healthy():
                self._reply(200, b"ok\n", {"Content-Type": "text/plain"}, extra)
            else:
                self._reply(503, b"collection stalled\n", {"Content-Type": "text/plain"}, extra)
        elif path == "/":
            page = b'<html><body><h1>GPU exporter</h1><a href="/metrics">metrics</a></body></html>'
            self._reply(200, page, {"Content-Type": "text/html"}, extra)
        else:
            self._reply(404, b"not found\n", {"Content-Type": "text/plain"}, extra)

    def _reply(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        for name, value in (*headers.items(), *extra):
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)
