"""Serving: the golden exposition, and scrapes that never reach NVML."""

from __future__ import annotations

import gzip
import os
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pynvml

from exporter.server import MetricsServer
from tests.unit.exporter_harness import running_node

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "exporter-unit.prom"
#: Lines that differ from run to run or machine to machine: timings and versions.
VOLATILE = (
    "gpu_exporter_collector_duration_seconds",
    "gpu_exporter_collection_duration_seconds",
    "gpu_exporter_build_info",
)


def stable_exposition(body: bytes) -> str:
    return "".join(
        line + "\n"
        for line in body.decode().splitlines()
        if not any(line.startswith(prefix) or f" {prefix} " in line for prefix in VOLATILE)
    )


def test_exposition_matches_the_golden_file() -> None:
    """`make golden` (UPDATE_GOLDEN=1) rewrites the file after an intended change."""
    with running_node() as node:
        node.cycle()
        node.cycle(advance=10)
        actual = stable_exposition(node.exporter.exposition())
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(actual)
    assert actual == GOLDEN.read_text(), "exposition changed; run `make golden` if intended"


class CountingLibrary:
    """Wraps the installed (simulated) libnvidia-ml and counts calls per C function."""

    def __init__(self, library: Any) -> None:
        self._library = library
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        function = getattr(self._library, name)

        def counted(*args: Any) -> Any:
            self.calls[name] += 1
            return function(*args)

        return counted


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_concurrent_scrapes_serve_the_last_cycle_without_calling_nvml() -> None:
    with running_node() as node:
        node.cycle()
        counting = CountingLibrary(pynvml.nvmlLib)
        pynvml.nvmlLib = counting
        pynvml._nvmlGetFunctionPointer_cache.clear()
        server = MetricsServer(("127.0.0.1", 0), node.exporter)
        server.serve_in_background()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            bodies: list[bytes] = []

            def scraper() -> None:
                for _ in range(25):
                    bodies.append(fetch(url + "/metrics")[2])

            threads = [threading.Thread(target=scraper) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            calls_during_scrapes = sum(counting.calls.values())
            node.cycle(advance=5)
            calls_in_one_cycle = sum(counting.calls.values()) - calls_during_scrapes
            status, headers, zipped = fetch(url + "/metrics", {"Accept-Encoding": "gzip"})
            health = fetch(url + "/healthz")
            missing = fetch(url + "/nope")
        finally:
            server.shutdown()
            server.server_close()
    assert len(bodies) == 100 and len(set(bodies)) == 1
    assert b"gpu_temperature_celsius{" in bodies[0]
    assert calls_during_scrapes == 0
    assert calls_in_one_cycle > 0
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"gpu_temperature_celsius{" in gzip.decompress(zipped)
    assert health[0] == 200
    assert missing[0] == 404


def test_healthz_fails_when_collection_stalls() -> None:
    with running_node() as node:
        node.cycle()
        assert node.exporter.healthy()
        node.clock.advance(60)  # no cycle for far longer than the interval
        assert not node.exporter.healthy()


def test_fast_exposition_is_byte_identical_to_prometheus_client() -> None:
    from prometheus_client import generate_latest

    with running_node() as node:
        node.cycle()
        node.cycle(advance=10)
        ours = node.exporter.exposition()
        reference = generate_latest(node.exporter.registry)
    # The health families are recomputed by generate_latest a moment later: compare the rest.
    assert stable_exposition(ours) == stable_exposition(reference)
    assert len(ours.splitlines()) > 300
