"""PrometheusClient's failure handling, against a scripted local HTTP server.

Real sockets and real HTTP, no mocks: the server answers each request with the next scripted
response (status, JSON body, headers, delay, or a dropped connection), so retries, timeouts
and error classification are observed from the outside. Behaviour against the real
Prometheus is in ``tests/integration/test_prometheus_client.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from analytics.prometheus import (
    PrometheusAuth,
    PrometheusClient,
    PrometheusQueryError,
    PrometheusUnavailable,
    Sample,
)

OK_VECTOR = {
    "status": "success",
    "data": {
        "resultType": "vector",
        "result": [
            {"metric": {"gpu": "0"}, "value": [1700000000.5, "NaN"]},
            {"metric": {"gpu": "1"}, "value": [1700000000.5, "+Inf"]},
            {"metric": {"gpu": "2"}, "value": [1700000000.5, "-Inf"]},
            {"metric": {"gpu": "3"}, "value": [1700000000.5, "0.25"]},
        ],
    },
}


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: OK_VECTOR)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False  # close the connection without answering


@dataclass
class FakePrometheus:
    url: str
    script: list[Reply]
    seen: list[tuple[str, str, dict[str, list[str]], dict[str, str]]] = field(default_factory=list)
    default: Reply = field(default_factory=Reply)

    def params(self, n: int = -1) -> dict[str, str]:
        return {k: v[0] for k, v in self.seen[n][2].items()}


@pytest.fixture
def fake() -> Iterator[FakePrometheus]:
    state = FakePrometheus(url="", script=[])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            split = urlsplit(self.path)
            params = parse_qs(body if self.command == "POST" else split.query)
            state.seen.append((self.command, split.path, params, dict(self.headers.items())))
            reply = state.script.pop(0) if state.script else state.default
            time.sleep(reply.delay)
            if reply.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            raw = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            content_type = "application/json" if not isinstance(reply.body, bytes) else "text/html"
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(raw)))
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(raw)  # the client may have timed out and gone

        do_GET = _answer
        do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def _error(status: int, error_type: str, message: str) -> Reply:
    return Reply(status, {"status": "error", "errorType": error_type, "error": message})


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- parsing ----------------------------------------------------------------------------------


def test_values_including_nan_and_infinities_are_parsed(fake: FakePrometheus) -> None:
    samples = PrometheusClient(fake.url).query("up")
    values = [s.value for s in samples]
    assert math.isnan(values[0])
    assert values[1:] == [math.inf, -math.inf, 0.25]
    assert samples[3] == Sample({"gpu": "3"}, 0.25, 1700000000.5)


def test_sample_labels_are_read_only(fake: FakePrometheus) -> None:
    [sample, *_] = PrometheusClient(fake.url).query("up")
    with pytest.raises(TypeError):
        sample.labels["gpu"] = "9"  # type: ignore[index]


def test_a_path_prefix_in_the_url_is_kept(fake: FakePrometheus) -> None:
    PrometheusClient(fake.url + "/prometheus/").query("up", at=1700000000.25)
    method, path, params, _ = fake.seen[0]
    assert (method, path) == ("GET", "/prometheus/api/v1/query")
    assert params["time"] == ["1700000000.250"]


def test_the_prometheus_timeout_is_sent_a_little_below_the_http_timeout(
    fake: FakePrometheus,
) -> None:
    PrometheusClient(fake.url, timeout=4).query("up")
    assert fake.params()["timeout"] == "3600ms"


def test_range_chunks_are_contiguous_on_the_step_grid(fake: FakePrometheus) -> None:
    fake.default = Reply(body={"status": "success", "data": {"resultType": "matrix", "result": []}})
    client = PrometheusClient(fake.url, max_points=30)
    assert client.query_range("up", 0.1, 100, 1) == []
    sent = [(fake.params(n)["start"], fake.params(n)["end"]) for n in range(len(fake.seen))]
    assert sent == [
        ("0.100", "29.100"),
        ("30.100", "59.100"),
        ("60.100", "89.100"),
        ("90.100", "100.000"),
    ]
    assert {fake.params(n)["step"] for n in range(len(fake.seen))} == {"1000ms"}
    assert client.queries == 4


def test_range_series_are_merged_by_label_set_across_chunks(fake: FakePrometheus) -> None:
    def matrix(*items: tuple[dict[str, str], list[list[Any]]]) -> Reply:
        result = [{"metric": m, "values": v} for m, v in items]
        return Reply(body={"status": "success", "data": {"resultType": "matrix", "result": result}})

    fake.script = [
        matrix(({"a": "2"}, [[0, "1"], [1, "2"]]), ({"a": "1"}, [[1, "5"]])),
        matrix(({"a": "1"}, [[2, "6"], [3, "NaN"]])),
    ]
    result = PrometheusClient(fake.url, max_points=2).query_range("up", 0, 3, 1)
    assert [(dict(s.labels), s.timestamps) for s in result] == [
        ({"a": "1"}, (1.0, 2.0, 3.0)),
        ({"a": "2"}, (0.0, 1.0)),
    ]
    assert result[0].values[:2] == (5.0, 6.0) and math.isnan(result[0].values[2])


def test_bad_range_arguments_are_rejected_before_any_request(fake: FakePrometheus) -> None:
    client = PrometheusClient(fake.url)
    with pytest.raises(ValueError, match="step"):
        client.query_range("up", 0, 10, 0)
    with pytest.raises(ValueError, match="before start"):
        client.query_range("up", 10, 0, 1)
    assert client.queries == 0


def test_prometheus_warnings_are_logged(
    fake: FakePrometheus, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script = [Reply(body={**OK_VECTOR, "warnings": ["partial response"]})]
    with caplog.at_level(logging.WARNING, logger="analytics.prometheus"):
        PrometheusClient(fake.url).query("up")
    assert "partial response" in caplog.text


# --- retries and classification -------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_are_retried_with_backoff(fake: FakePrometheus, status: int) -> None:
    fake.script = [Reply(status, body={}), Reply(status, body={})]
    client = PrometheusClient(fake.url, retries=2, backoff=0.1)
    began = time.monotonic()
    assert len(client.query("up")) == 4
    assert time.monotonic() - began >= 0.1 + 0.2
    assert client.queries == 3


def test_retries_are_bounded_and_end_unavailable(fake: FakePrometheus) -> None:
    fake.default = _error(503, "unavailable", "TSDB not ready")
    client = PrometheusClient(fake.url, retries=2, backoff=0.01)
    with pytest.raises(PrometheusUnavailable, match="TSDB not ready") as info:
        client.query("up")
    assert info.value.status_code == 503
    assert client.queries == 3


def test_retry_after_is_honoured_up_to_a_cap(fake: FakePrometheus) -> None:
    fake.script = [Reply(429, body={}, headers={"Retry-After": "0.5"})]
    client = PrometheusClient(fake.url, retries=1, backoff=0.01)
    began = time.monotonic()
    client.query("up")
    assert time.monotonic() - began >= 0.5


def test_a_query_timeout_reported_by_prometheus_is_unavailable_and_not_retried(
    fake: FakePrometheus,
) -> None:
    fake.script = [_error(503, "timeout", "query timed out in expression evaluation")]
    client = PrometheusClient(fake.url, retries=2, backoff=0.01)
    with pytest.raises(PrometheusUnavailable, match="timed out"):
        client.query("up")
    assert client.queries == 1


def test_a_server_error_is_unavailable_and_not_retried(fake: FakePrometheus) -> None:
    fake.script = [_error(500, "internal", "boom")]
    client = PrometheusClient(fake.url, retries=2, backoff=0.01)
    with pytest.raises(PrometheusUnavailable, match="boom"):
        client.query("up")
    assert client.queries == 1


@pytest.mark.parametrize(
    ("status", "error_type"), [(400, "bad_data"), (422, "execution"), (400, "unexpected")]
)
def test_query_errors_keep_prometheus_message_and_are_not_retried(
    fake: FakePrometheus, status: int, error_type: str
) -> None:
    fake.script = [_error(status, error_type, "1:5: parse error: unclosed left parenthesis")]
    client = PrometheusClient(fake.url, retries=2, backoff=0.01)
    with pytest.raises(PrometheusQueryError) as info:
        client.query("sum(")
    assert str(info.value) == "1:5: parse error: unclosed left parenthesis"
    assert (info.value.status_code, info.value.error_type) == (status, error_type)
    assert client.queries == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_wrong_url_or_credentials_is_unavailable_with_a_hint(
    fake: FakePrometheus, status: int
) -> None:
    fake.script = [Reply(status, body=b"<html>nope</html>")]
    client = PrometheusClient(fake.url, retries=2, backoff=0.01)
    with pytest.raises(PrometheusUnavailable, match="credentials"):
        client.query("up")
    assert client.queries == 1


def test_something_that_is_not_prometheus_is_unavailable(fake: FakePrometheus) -> None:
    fake.script = [Reply(200, body=b"<html>login</html>")]
    with pytest.raises(PrometheusUnavailable, match="Prometheus API"):
        PrometheusClient(fake.url).query("up")


def test_a_dropped_connection_is_retried(fake: FakePrometheus) -> None:
    fake.script = [Reply(drop=True)]
    client = PrometheusClient(fake.url, retries=1, backoff=0.01)
    assert len(client.query("up")) == 4
    assert client.queries == 2


def test_a_slow_answer_times_out_once_without_retries(fake: FakePrometheus) -> None:
    fake.script = [Reply(delay=2.0)]
    client = PrometheusClient(fake.url, timeout=0.5, retries=2, backoff=0.01)
    began = time.monotonic()
    with pytest.raises(PrometheusUnavailable, match=r"within 0\.5 s"):
        client.query("up")
    assert time.monotonic() - began < 1.5
    assert client.queries == 1


def test_connection_refused_is_retried_then_unavailable() -> None:
    client = PrometheusClient(f"http://127.0.0.1:{_closed_port()}", retries=2, backoff=0.01)
    with pytest.raises(PrometheusUnavailable, match="3 attempt"):
        client.query("up")
    assert client.queries == 3
    assert client.healthy() is False


def test_healthy_reflects_ready_and_never_raises(fake: FakePrometheus) -> None:
    fake.script = [Reply(200, body=b"Prometheus Server is Ready."), Reply(503, body=b"")]
    client = PrometheusClient(fake.url)
    assert client.healthy() is True
    assert client.healthy() is False
    assert fake.seen[0][1] == "/-/ready"
    assert client.queries == 0


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"retries": -1}, {"backoff": -1}, {"max_points": 1}],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PrometheusClient("http://127.0.0.1:9090", **kwargs)


@pytest.mark.parametrize("url", ["127.0.0.1:9090", "ftp://x", "http://", ""])
def test_urls_that_are_not_http_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        PrometheusClient(url)


def test_auth_takes_one_kind_of_credentials_and_hides_secrets() -> None:
    with pytest.raises(ValueError, match="not both"):
        PrometheusAuth(bearer_token="t", username="u", password="p")
    with pytest.raises(ValueError, match="username"):
        PrometheusAuth(password="p")
    assert "hunter2" not in repr(PrometheusAuth(username="u", password="hunter2"))
