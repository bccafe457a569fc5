"""HTTP serving of /metrics and /healthz from the exporter's cached exposition."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class Source(Protocol):
    def exposition(self, gzipped: bool = False) -> bytes: ...

    def healthy(self) -> bool: ...


class MetricsServer(ThreadingHTTPServer):
    """A threading HTTP server whose handlers only copy prepared bytes: no NVML, no locks held."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], source: Source) -> None:
        self.source = source
        super().__init__(address, _Handler)

    def serve_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
            body = self.server.source.exposition(gzipped=gzipped)
            headers = {"Content-Type": CONTENT_TYPE_LATEST}
            if gzipped:
                headers["Content-Encoding"] = "gzip"
            self._reply(200, body, headers)
        elif path == "/healthz":
            if self.server.source.healthy():
                self._reply(200, b"ok\n", {"Content-Type": "text/plain"})
            else:
                self._reply(503, b"collection stalled\n", {"Content-Type": "text/plain"})
        elif path == "/":
            page = b'<html><body><h1>GPU exporter</h1><a href="/metrics">metrics</a></body></html>'
            self._reply(200, page, {"Content-Type": "text/html"})
        else:
            self._reply(404, b"not found\n", {"Content-Type": "text/plain"})

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)
