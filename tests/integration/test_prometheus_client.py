"""PrometheusClient and promql.selector against the real Prometheus 2.42.

History is backfilled with ``promtool tsdb create-blocks-from openmetrics`` (3.5 days at 15 s),
so range queries long enough to need splitting can be compared point for point with
Prometheus' own answers for sub-ranges. A tiny static target serves series whose label values
are adversarial payloads, so selectors built by ``promql.selector`` are checked to match
exactly those series in Prometheus itself. A recording proxy shows what goes over the wire
(method, auth headers).
"""

from __future__ import annotations

import base64
import math
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from analytics.prometheus import (
    PrometheusAuth,
    PrometheusClient,
    PrometheusQueryError,
    PrometheusUnavailable,
    Series,
)
from analytics.promql import quote, selector
from tests.unit.test_promql import ADVERSARIAL, INJECTION

pytestmark = pytest.mark.integration

STEP = 15
DAY = 86_400
# History starts a few days back at an odd second, so query grids and samples never coincide.
T0 = (int(time.time()) // DAY - 5) * DAY + 7
T_END = T0 + int(3.5 * DAY)
GPU1_FROM, GPU1_TO = T0 + DAY, T0 + 2 * DAY  # gpu="1" exists only in the middle day
SPECIAL_AT = T0 + 600
PAYLOAD_COUNT = 300


# --- fixtures -------------------------------------------------------------------------------


def _write_history(path: Path) -> None:
    lines = ["# HELP test_gauge A gauge with one sample per 15 s.", "# TYPE test_gauge gauge"]
    for i, ts in enumerate(range(T0, T_END + 1, STEP)):
        lines.append(f'test_gauge{{gpu="0"}} {i} {ts}')
        if GPU1_FROM <= ts < GPU1_TO:
            lines.append(f'test_gauge{{gpu="1"}} {2 * i + 0.5} {ts}')
    lines += ["# HELP test_special Non-finite values.", "# TYPE test_special gauge"]
    for ts in range(T0, T0 + 1200, STEP):
        lines.append(f'test_special{{kind="nan"}} NaN {ts}')
        lines.append(f'test_special{{kind="inf"}} +Inf {ts}')
        lines.append(f'test_special{{kind="minus_inf"}} -Inf {ts}')
    lines.append("# EOF")
    path.write_text("\n".join(lines) + "\n")


def generated_payloads(count: int, seed: int = 20240601) -> list[str]:
    """Unique adversarial label values: fragments that break quoting mixed with random text."""
    rng = random.Random(seed)
    pools = [
        "\"\\}{,=~!#`'$ \n\r\t()[]",
        "".join(chr(c) for c in range(0x20, 0x7F)),
        "".join(chr(c) for c in range(0x01, 0x20)),
        "äéßøñüÿĀ€™←∀😀🚀\u2028\u00a0\ufeff\ufffd\U0001f9ea\u0301",
    ]
    out = dict.fromkeys(ADVERSARIAL)
    while len(out) < count:
        parts = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.3:
                parts.append(rng.choice(ADVERSARIAL))
            elif kind < 0.9:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
            else:  # any code point except surrogates
                code = rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
                parts.append(chr(code))
        out["".join(parts)] = None
    return list(out)[:count]


def _exposition_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _StaticMetrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def payloads() -> list[str]:
    return generated_payloads(PAYLOAD_COUNT)


@pytest.fixture(scope="module")
def payload_target(payloads: list[str]) -> Iterator[str]:
    """A static target exposing ``promql_payload{x=<payload>, i=<index>} 1`` per payload."""
    lines = ["# TYPE promql_payload gauge"]
    lines += [
        f'promql_payload{{x="{_exposition_escape(p)}",i="{i}"}} 1' for i, p in enumerate(payloads)
    ]
    handler = type("Handler", (_StaticMetrics,), {"body": ("\n".join(lines) + "\n").encode()})
    server, address = _serve(handler)
    yield address
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def prom(
    module_prometheus: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
    payload_target: str,
    payloads: list[str],
) -> Any:
    """One Prometheus for the module: backfilled history plus the payload target, scraped."""
    history = tmp_path_factory.mktemp("history") / "history.om"
    _write_history(history)
    server = module_prometheus([payload_target], openmetrics=history)
    server.wait_for("count(promql_payload)", lambda r: bool(r) and int(r[0]["value"][1]) > 0)
    return server


@pytest.fixture
def client(prom: Any) -> Iterator[PrometheusClient]:
    with PrometheusClient(prom.url, timeout=10, retries=1, backoff=0.05) as c:
        yield c


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingProxy:
    """Forwards to Prometheus and records every request it passes on."""

    upstream: str
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def proxy(prom: Any) -> Iterator[RecordingProxy]:
    recorder = RecordingProxy(upstream=prom.url)
    session = requests.Session()

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            recorder.requests.append(
                Recorded(self.command, self.path, dict(self.headers.items()), body)
            )
            headers = {}
            if "Content-Type" in self.headers:
                headers["Content-Type"] = self.headers["Content-Type"]
            upstream = session.request(
                self.command, recorder.upstream + self.path, data=body, headers=headers, timeout=30
            )
            self.send_response(upstream.status_code)
            self.send_header("Content-Type", upstream.headers.get("Content-Type", "text/plain"))
            self.send_header("Content-Length", str(len(upstream.content)))
            self.end_headers()
            self.wfile.write(upstream.content)

        do_GET = _forward
        do_POST = _forward

        def log_message(self, *args: Any) -> None:
            pass

    server, address = _serve(Handler)
    recorder.url = f"http://{address}"
    yield recorder
    server.shutdown()
    server.server_close()
    session.close()


# --- helpers --------------------------------------------------------------------------------


def _points(series: Series) -> list[tuple[float, float]]:
    return list(zip(series.timestamps, series.values, strict=True))


def _reference(
    prom: Any, promql: str, ranges: list[tuple[float, float]], step: float
) -> dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]:
    """Prometheus' own answers for consecutive sub-ranges, stitched by hand."""
    out: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for start, end in ranges:
        for item in prom.query_range(promql, start, end, step):
            key = tuple(sorted(item["metric"].items()))
            out.setdefault(key, []).extend((float(t), float(v)) for t, v in item["values"])
    return out


def _as_dict(result: list[Series]) -> dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]:
    return {tuple(sorted(s.labels.items())): _points(s) for s in result}


# --- instant queries ------------------------------------------------------------------------


def test_instant_query_returns_samples_with_labels_value_and_time(
    client: PrometheusClient,
) -> None:
    at = T0 + 100 * STEP + 3  # the latest sample at or before `at` is index 100
    [sample] = client.query('test_gauge{gpu="0"}', at=at)
    assert dict(sample.labels) == {"__name__": "test_gauge", "gpu": "0"}
    assert sample.value == 100.0
    assert sample.timestamp == at


def test_scalar_results_become_one_unlabelled_sample(client: PrometheusClient) -> None:
    [sample] = client.query("scalar(vector(2.5))", at=T0)
    assert dict(sample.labels) == {}
    assert (sample.value, sample.timestamp) == (2.5, T0)


def test_nan_and_infinities_are_parsed_as_floats(client: PrometheusClient) -> None:
    values = {s.labels["kind"]: s.value for s in client.query("test_special", at=SPECIAL_AT)}
    assert math.isnan(values["nan"])
    assert values["inf"] == math.inf
    assert values["minus_inf"] == -math.inf
    [literal] = client.query("vector(-Inf)")
    assert literal.value == -math.inf


def test_instant_time_keeps_milliseconds(client: PrometheusClient) -> None:
    [sample] = client.query("vector(time())", at=T0 + 0.123)
    assert sample.timestamp == pytest.approx(T0 + 0.123, abs=1e-6)
    assert sample.value == pytest.approx(T0 + 0.123, abs=1e-6)


def test_a_range_vector_from_an_instant_query_is_a_query_error(client: PrometheusClient) -> None:
    with pytest.raises(PrometheusQueryError, match="matrix"):
        client.query("test_gauge[1m]", at=T0 + 600)


# --- range queries and splitting ------------------------------------------------------------


def test_three_days_at_15s_is_split_and_equals_prometheus_own_sub_range_answers(
    prom: Any, client: PrometheusClient
) -> None:
    start = T0 + 3 * 3600 + 0.5
    end = start + 3 * DAY  # 17,281 points: more than one query may return
    result = client.query_range("test_gauge", start, end, STEP)
    assert client.queries == 2  # 11,000 + 6,281 points

    quarters = [(start + k * 4320 * STEP, start + (k + 1) * 4320 * STEP) for k in range(4)]
    # Sub-ranges of 4,321 points overlap by one point at each edge; drop the repeated ones.
    reference = _reference(prom, "test_gauge", quarters, STEP)
    reference = {key: sorted(set(points)) for key, points in reference.items()}
    assert _as_dict(result) == reference

    gpu0 = next(s for s in result if s.labels["gpu"] == "0")
    assert len(gpu0.timestamps) == 3 * DAY // STEP + 1
    assert gpu0.timestamps[0] == start and gpu0.timestamps[-1] == end
    assert all(b - a == STEP for a, b in zip(gpu0.timestamps, gpu0.timestamps[1:], strict=False))
    gpu1 = next(s for s in result if s.labels["gpu"] == "1")
    assert gpu1.timestamps[0] >= GPU1_FROM
    assert gpu1.timestamps[-1] < GPU1_TO + 300
    # Series come back sorted by label set, as Prometheus sorts a matrix.
    assert [s.labels["gpu"] for s in result] == ["0", "1"]


def test_splitting_never_hits_the_11000_point_limit(prom: Any, client: PrometheusClient) -> None:
    params: dict[str, str | int] = {
        "query": "vector(time())",
        "start": T0,
        "end": T0 + 20_000,
        "step": 1,
    }
    with pytest.raises(requests.HTTPError):
        # The limit is real: Prometheus refuses this range as one query.
        response = requests.get(f"{prom.url}/api/v1/query_range", params=params, timeout=10)
        assert "11,000 points" in response.json()["error"]
        response.raise_for_status()
    [series] = client.query_range("vector(time())", T0, T0 + 20_000, 1)
    assert series.timestamps == tuple(float(t) for t in range(T0, T0 + 20_001))
    assert series.values == series.timestamps
    assert client.queries == 2


@pytest.mark.parametrize(
    ("points", "queries"), [(11_000, 1), (11_001, 2), (22_000, 2), (22_001, 3)]
)
def test_chunk_edges_at_the_limit(client: PrometheusClient, points: int, queries: int) -> None:
    [series] = client.query_range("vector(time())", T0, T0 + (points - 1) * 2, 2)
    assert len(series.timestamps) == points
    assert len(set(series.timestamps)) == points
    assert client.queries == queries


@pytest.mark.parametrize(
    ("start", "length", "step", "max_points"),
    [
        (T0 + 0.123, 1000, 7.5, 2),
        (T0 + 0.123, 1000, 7.5, 3),
        (T0 + 11, 4000, 15, 7),
        (T0 + DAY - 900, 2 * 3600, 15, 100),  # gpu="1" appears mid-range
        (GPU1_TO - 3000, 6000, 60, 11),  # gpu="1" goes stale mid-range
        (T0, 999.999, 0.333, 97),
        (T0 + 5, 10, 30, 5),  # end before the first step: one point
    ],
)
def test_split_results_equal_one_unsplit_query(
    prom: Any, start: float, length: float, step: float, max_points: int
) -> None:
    promql = "test_gauge + 0"
    with (
        PrometheusClient(prom.url, max_points=max_points) as small,
        PrometheusClient(prom.url) as whole,
    ):
        split = small.query_range(promql, start, start + length, step)
        unsplit = whole.query_range(promql, start, start + length, step)
        assert whole.queries == 1
        assert small.queries == math.ceil(
            (math.floor(round(length * 1000) / round(step * 1000)) + 1) / max_points
        )
    assert split == unsplit
    assert _as_dict(unsplit) == _reference(prom, promql, [(start, start + length)], step)


def test_range_query_with_no_data_returns_no_series(client: PrometheusClient) -> None:
    assert client.query_range("test_gauge", T0 - 10 * DAY, T0 - 9 * DAY, 60) == []


# --- errors ---------------------------------------------------------------------------------


def test_a_bad_query_raises_query_error_with_prometheus_message_and_is_not_retried(
    client: PrometheusClient,
) -> None:
    with pytest.raises(PrometheusQueryError) as info:
        client.query("sum(")
    assert "parse error" in str(info.value)
    assert info.value.error_type == "bad_data"
    assert info.value.status_code == 400
    assert info.value.query == "sum("
    assert client.queries == 1


def test_an_execution_error_is_a_query_error(client: PrometheusClient) -> None:
    # Two series on each side with on() matching: Prometheus refuses many-to-many matching.
    with pytest.raises(PrometheusQueryError, match=r"many-to-many|duplicate") as info:
        client.query("test_special + on() test_special", at=SPECIAL_AT)
    assert info.value.error_type == "execution"


def test_prometheus_stopped_is_unavailable_then_the_same_client_recovers(
    prometheus: Callable[..., Any],
) -> None:
    server = prometheus()
    timeout, retries, backoff = 2.0, 2, 0.1
    client = PrometheusClient(server.url, timeout=timeout, retries=retries, backoff=backoff)
    assert client.query("vector(1)")[0].value == 1.0
    assert client.healthy()

    server.process.terminate()
    server.process.wait(timeout=15)
    client.queries = 0
    began = time.monotonic()
    with pytest.raises(PrometheusUnavailable, match="3 attempt"):
        client.query("vector(1)")
    elapsed = time.monotonic() - began
    assert client.queries == retries + 1
    assert elapsed < (retries + 1) * timeout + backoff * (2**retries) * 2
    assert not client.healthy()

    # Same binary, arguments, data directory and port: as a Deployment restart would be.
    with server.log_path.open("ab") as log:
        server.process = subprocess.Popen(
            server.process.args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=server.workdir,
        )
    deadline = time.monotonic() + 30
    while not client.healthy():
        assert time.monotonic() < deadline, "Prometheus did not come back"
        assert server.process.poll() is None, server.log_path.read_text()[-2000:]
        time.sleep(0.1)
    assert client.query("vector(1)")[0].value == 1.0
    client.close()


# --- the wire: POST, auth -------------------------------------------------------------------


def test_short_queries_use_get_and_long_ones_post_a_form(proxy: RecordingProxy) -> None:
    with PrometheusClient(proxy.url) as client:
        short = client.query('test_gauge{gpu="0"}', at=T0 + 600)
        long_promql = " or ".join(['test_gauge{gpu="0"}'] * 150)
        assert len(long_promql) > PrometheusClient.POST_THRESHOLD
        long = client.query(long_promql, at=T0 + 600)
        series = client.query_range(long_promql, T0, T0 + 3600, 60)
    assert short == long
    assert len(series) == 1 and len(series[0].values) == 61
    methods = [(r.method, r.path.split("?")[0]) for r in proxy.requests]
    assert methods == [
        ("GET", "/api/v1/query"),
        ("POST", "/api/v1/query"),
        ("POST", "/api/v1/query_range"),
    ]
    post = proxy.requests[1]
    assert post.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert b"timeout=" in post.body and "?" not in post.path
    assert "timeout=" in proxy.requests[0].path


def test_bearer_token_reaches_the_server(proxy: RecordingProxy) -> None:
    auth = PrometheusAuth(bearer_token="s3cr3t-token")
    with PrometheusClient(proxy.url, auth=auth) as client:
        client.query("vector(1)")
        client.query(" or ".join(["vector(1)"] * 300))
        client.query_range("vector(1)", T0, T0 + 60, 15)
        assert client.healthy()
    assert len(proxy.requests) == 4
    assert {r.headers.get("Authorization") for r in proxy.requests} == {"Bearer s3cr3t-token"}
    assert "s3cr3t" not in repr(auth)


def test_basic_auth_reaches_the_server(proxy: RecordingProxy) -> None:
    auth = PrometheusAuth(username="grafana", password="p@ss:word")
    with PrometheusClient(proxy.url, auth=auth) as client:
        client.query("vector(1)")
        client.query(" or ".join(["vector(1)"] * 300))
        assert client.healthy()
    expected = "Basic " + base64.b64encode(b"grafana:p@ss:word").decode()
    assert [r.headers.get("Authorization") for r in proxy.requests] == [expected] * 3
    assert "p@ss" not in repr(auth)


def test_the_client_is_safe_to_share_between_threads(client: PrometheusClient) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(10):
                [s] = client.query(f"vector({k * 100 + j})")
                assert s.value == k * 100 + j
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert client.queries == 80


# --- selectors with adversarial values, checked by Prometheus itself ------------------------


def test_generated_selectors_match_exactly_the_series_with_that_value(
    prom: Any, client: PrometheusClient, payloads: list[str]
) -> None:
    scraped = {s.labels["x"]: s.labels["i"] for s in client.query("promql_payload")}
    assert len(scraped) == len(payloads), "the target did not expose every payload"
    assert scraped == {p: str(i) for i, p in enumerate(payloads)}

    for i, payload in enumerate(payloads):
        result = client.query(selector("promql_payload", x=payload))
        assert [(s.labels["x"], s.labels["i"]) for s in result] == [(payload, str(i))], payload
        other = str((i + 1) % len(payloads))
        assert client.query(selector("promql_payload", x=payload, i=other)) == []


def test_the_issue_injection_never_widens_a_query(client: PrometheusClient) -> None:
    # Present as a series value: exactly that series. Absent: nothing, never vector(1).
    [hit] = client.query(selector("promql_payload", x=INJECTION))
    assert hit.labels["x"] == INJECTION
    for payload in (INJECTION + "x", 'b"} or vector(1) #', '"} or on() vector(1) #'):
        assert client.query(selector("promql_payload", x=payload)) == []
        assert client.query(f"count({selector('promql_payload', x=payload)})") == []


def test_quoted_payloads_survive_as_label_values_in_promql(
    client: PrometheusClient, payloads: list[str]
) -> None:
    # A second route to the same property: label_replace writes the quoted literal into a
    # label ("$" doubled, as the replacement is a regexp template); it must come back as is.
    for payload in payloads[:100]:
        promql = f'label_replace(vector(1), "x", {quote(payload.replace("$", "$$"))}, "", "")'
        [sample] = client.query(promql)
        assert sample.labels["x"] == payload
