"""The analytics service skeleton: envelope, errors, auth, health against a real Prometheus,
own metrics, the OpenAPI document and the console script."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from analytics.app import create_app
from analytics.config import Config, PrometheusConfig
from analytics.envelope import success
from analytics.prometheus import PrometheusQueryError, PrometheusUnavailable
from analytics.promql import InvalidParameter, validate_name
from tests.conftest import PrometheusServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXED_NOW = dt.datetime(2025, 8, 3, 12, 0, 0, tzinfo=dt.UTC)
TOKEN = "test-token-0123456789abcdef"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def config_for(url: str, **kwargs: Any) -> Config:
    """A config pointing at ``url``, failing fast (no retries, short timeout)."""
    return Config(prometheus=PrometheusConfig(url=url, timeout_seconds=2, retries=0), **kwargs)


def dead_url() -> str:
    """A loopback URL where nothing listens: connection refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def app_for(url: str | None = None, **kwargs: Any) -> Flask:
    return create_app(config_for(url or dead_url(), **kwargs), clock=lambda: FIXED_NOW)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"status", "error", "timestamp"}
    assert body["status"] == "error"
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert ISO_UTC.match(body["timestamp"])
    return dict(body["error"])


def add_route(app: Flask, rule: str, view: Callable[[], Any]) -> None:
    app.add_url_rule(rule, endpoint=rule, view_func=view)


# --- envelope and errors ----------------------------------------------------------------------


def test_healthz_is_the_success_envelope_with_the_clock_time() -> None:
    response = app_for().test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "success",
        "data": {"status": "ok"},
        "timestamp": "2025-08-03T12:00:00Z",
    }


def test_unknown_route_is_a_404_envelope() -> None:
    client = app_for().test_client()
    for path in ("/nope", "/api/v1/gpu/nothing-here"):
        error = assert_error(client.get(path), 404, "RESOURCE_NOT_FOUND")
        assert error["details"] == {"path": path}


def test_wrong_method_is_a_405_envelope_with_allow() -> None:
    response = app_for().test_client().post("/healthz")
    error = assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "GET" in response.headers["Allow"]
    assert "GET" in error["details"]["allowed"]


def test_unhandled_exception_is_a_500_envelope_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_for()

    def boom() -> Any:
        raise RuntimeError("secret-detail /etc/shadow")

    add_route(app, "/api/v1/boom", boom)
    with caplog.at_level(logging.ERROR, logger="gpu-analytics"):
        response = app.test_client().get("/api/v1/boom", headers={"X-Request-ID": "req-42"})
    error = assert_error(response, 500, "INTERNAL_ERROR")
    text = response.get_data(as_text=True)
    assert "secret-detail" not in text and "Traceback" not in text and "RuntimeError" not in text
    assert error["details"] == {"requestId": "req-42"}
    assert response.headers["X-Request-ID"] == "req-42"
    # The traceback is in the log, under the same request id.
    record = next(r for r in caplog.records if "req-42" in r.getMessage())
    assert record.exc_info is not None


def test_request_id_is_generated_when_missing_or_unsafe() -> None:
    client = app_for().test_client()
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    unsafe = client.get("/healthz", headers={"X-Request-ID": "a b\x7f<script>"})
    assert unsafe.headers["X-Request-ID"] != "a b\x7f<script>"


def test_invalid_parameter_is_a_400_with_field_and_reason() -> None:
    app = app_for()

    def bad() -> Any:
        validate_name('a"} or vector(1) #', "namespace", rule="dns-label")

    add_route(app, "/api/v1/bad", bad)
    error = assert_error(app.test_client().get("/api/v1/bad"), 400, "INVALID_PARAMETER")
    assert error["details"]["field"] == "namespace"
    assert "DNS-1123" in error["details"]["reason"]


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (PrometheusUnavailable("refused"), 503, "SERVICE_UNAVAILABLE"),
        (PrometheusQueryError("timeout", error_type="execution"), 503, "SERVICE_UNAVAILABLE"),
        (PrometheusQueryError("parse error", error_type="bad_data"), 500, "INTERNAL_ERROR"),
        (InvalidParameter("days", "must be positive"), 400, "INVALID_PARAMETER"),
    ],
)
def test_domain_exceptions_map_to_status_and_code(exc: Exception, status: int, code: str) -> None:
    app = app_for()

    def fail() -> Any:
        raise exc

    add_route(app, "/api/v1/fail", fail)
    error = assert_error(app.test_client().get("/api/v1/fail"), status, code)
    assert "parse error" not in str(error)


def test_non_finite_and_numpy_like_values_become_json() -> None:
    class Scalar:  # what numpy and pandas scalars look like
        def item(self) -> float:
            return 2.5

    app = app_for()
    add_route(
        app,
        "/api/v1/values",
        lambda: success({"nan": float("nan"), "inf": float("inf"), "np": Scalar(), "t": FIXED_NOW}),
    )
    data = app.test_client().get("/api/v1/values").get_json()["data"]
    assert data == {"nan": None, "inf": None, "np": 2.5, "t": "2025-08-03T12:00:00Z"}


# --- authentication ---------------------------------------------------------------------------


@pytest.fixture
def secured() -> FlaskClient:
    app = app_for(api_tokens=(TOKEN, "another-token"))
    add_route(app, "/api/v1/ping", lambda: success({"pong": True}))
    return app.test_client()


def test_api_needs_a_token_when_tokens_are_configured(secured: FlaskClient) -> None:
    response = secured.get("/api/v1/ping")
    assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header", [f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer", TOKEN, f"Bearer {TOKEN[:-1]}"]
)
def test_wrong_token_is_401(secured: FlaskClient, header: str) -> None:
    assert_error(
        secured.get("/api/v1/ping", headers={"Authorization": header}), 401, "UNAUTHORIZED"
    )


def test_right_token_is_200(secured: FlaskClient) -> None:
    for token in (TOKEN, "another-token"):
        response = secured.get("/api/v1/ping", headers={"Authorization": f"bearer {token}"})
        assert response.status_code == 200
        assert response.get_json()["data"] == {"pong": True}


def test_unknown_api_route_without_token_is_401_not_404(secured: FlaskClient) -> None:
    assert_error(secured.get("/api/v1/gpu/secret-route"), 401, "UNAUTHORIZED")


def test_probes_metrics_and_openapi_stay_open(secured: FlaskClient) -> None:
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/metrics").status_code == 200
    assert secured.get("/api/v1/openapi.json").status_code == 200
    ready = secured.get("/readyz")  # open; Prometheus is down, which it reports
    assert ready.status_code == 200
    assert ready.get_json()["data"]["prometheus"]["reachable"] is False


def test_configured_tokens_file_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    from analytics.config import ConfigError

    config = Config(api_tokens_file=tmp_path / "tokens")
    with pytest.raises(ConfigError, match="api_tokens_file"):
        create_app(config)


# --- health against a real Prometheus ---------------------------------------------------------


def test_readyz_and_gpu_health_with_prometheus_up(
    prometheus: Callable[..., PrometheusServer],
) -> None:
    dead_target = f"127.0.0.1:{free_port()}"
    server = prometheus([dead_target])
    server.wait_for('up{job="gpu-exporter"}')
    client = app_for(server.url).test_client()

    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["data"] == {"status": "ready", "prometheus": {"reachable": True}}

    health = client.get("/api/v1/gpu/health")
    assert health.status_code == 200
    data = health.get_json()["data"]
    assert data["status"] == "unhealthy"
    assert data["prometheus"] == {"reachable": True}
    assert data["exporters"]["total"] == 1 and data["exporters"]["up"] == 0
    assert data["exporters"]["downTargets"] == [{"job": "gpu-exporter", "instance": dead_target}]
    assert data["checkedAt"] == "2025-08-03T12:00:00Z"


@contextlib.contextmanager
def gpu_analytics(tmp_path: Path, prometheus_url: str, port: int) -> Iterator[str]:
    """Run the ``gpu-analytics`` console script (waitress) on ``port``; yield its base URL."""
    config = tmp_path / "analytics.yaml"
    config.write_text(f"prometheus: {{url: '{prometheus_url}', retries: 0}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ANALYTICS_")}
    log_path = tmp_path / "gpu-analytics.log"
    listen = f"127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "analytics.main", "--config", str(config), "--listen", listen],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log_path.read_text()
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"no /healthz:\n{log_path.read_text()}"
            time.sleep(0.1)
        yield base
        # SIGTERM stops it cleanly, with exit status 0.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_gpu_health_counts_up_and_down_exporters_end_to_end(
    prometheus: Callable[..., PrometheusServer], tmp_path: Path
) -> None:
    # The analytics service's own /metrics is a real, healthy scrape target; the other is dead.
    app_port = free_port()
    dead_target = f"127.0.0.1:{free_port()}"
    server = prometheus([f"127.0.0.1:{app_port}", dead_target])
    with gpu_analytics(tmp_path, server.url, app_port) as base:
        server.wait_for('count(up{job="gpu-exporter"}) == 2 and on() sum(up) == 1')
        response = requests.get(f"{base}/api/v1/gpu/health", timeout=10)
        metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert response.headers["Server"] == "gpu-analytics"
    body = response.json()
    assert body["status"] == "success"
    exporters = body["data"]["exporters"]
    assert body["data"]["status"] == "degraded"
    assert (exporters["total"], exporters["up"], exporters["down"]) == (2, 1, 1)
    assert exporters["downTargets"] == [{"job": "gpu-exporter", "instance": dead_target}]
    assert 'gpu_analytics_http_requests_total{endpoint="/api/v1/gpu/health"' in metrics


def test_prometheus_down_is_503_and_the_service_recovers_when_it_returns(
    prometheus: Callable[..., PrometheusServer],
) -> None:
    server = prometheus()
    client = app_for(server.url).test_client()
    assert client.get("/readyz").status_code == 200
    assert client.get("/api/v1/gpu/health").status_code == 200

    # Stop Prometheus: the API answers the 503 envelope; the probes stay 200 so the pod
    # stays in its Service to say so.
    server.process.terminate()
    server.process.wait(timeout=10)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["data"]["prometheus"]["reachable"] is False
    response = client.get("/api/v1/gpu/health")
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["Retry-After"] == "5"
    assert client.get("/healthz").status_code == 200

    # A new Prometheus at the same URL (same command line, so same port and data directory):
    # the same app answers again, with no restart.
    with server.log_path.open("ab") as log:
        restarted = subprocess.Popen(
            server.process.args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=server.workdir,
        )
    try:
        deadline = time.monotonic() + 30
        while client.get("/api/v1/gpu/health").status_code != 200:
            assert restarted.poll() is None, "restarted Prometheus exited"
            assert time.monotonic() < deadline, "service did not recover within 30 s"
            time.sleep(0.2)
        assert client.get("/api/v1/gpu/health").status_code == 200
    finally:
        restarted.terminate()
        restarted.wait(timeout=10)

    metrics = client.get("/metrics").get_data(as_text=True)
    errors = re.search(
        r'gpu_analytics_prometheus_errors_total\{kind="unavailable"\} (\S+)', metrics
    )
    assert errors is not None and float(errors.group(1)) >= 2


# --- own metrics ------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_template_and_status() -> None:
    app = app_for()
    client = app.test_client()
    client.get("/healthz")
    client.get("/healthz")
    client.get("/no/such/path/123")
    text = client.get("/metrics").get_data(as_text=True)
    assert (
        'gpu_analytics_http_requests_total{endpoint="/healthz",method="GET",status="200"} 2.0'
        in text
    )
    assert 'endpoint="<unmatched>",method="GET",status="404"' in text
    assert "/no/such/path" not in text  # raw paths never become label values
    assert "gpu_analytics_http_request_duration_seconds_bucket" in text
    assert 'gpu_analytics_prometheus_errors_total{kind="query"} 0.0' in text


def test_two_apps_do_not_share_metrics() -> None:
    first, second = app_for(), app_for()
    first.test_client().get("/healthz")
    text = second.test_client().get("/metrics").get_data(as_text=True)
    assert 'endpoint="/healthz"' not in text


# --- OpenAPI ----------------------------------------------------------------------------------


def test_every_served_api_endpoint_needs_the_token() -> None:
    """Each real route, not just a sample: a blueprint registered without the guard fails."""
    app = app_for(api_tokens=(TOKEN,))
    client = app.test_client()
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.rule == "/api/v1/openapi.json":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", "x", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            response = client.open(path, method=method)
            assert_error(response, 401, "UNAUTHORIZED")
            checked += 1
    assert checked >= 16  # the seed's read API and ours


def openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


@pytest.mark.parametrize("tokens", [(), (TOKEN,)])
def test_openapi_document_is_valid_and_matches_the_routes(tokens: tuple[str, ...]) -> None:
    app = app_for(api_tokens=tokens)
    headers = {"Authorization": f"Bearer {TOKEN}"} if tokens else {}
    document = app.test_client().get("/api/v1/openapi.json", headers=headers).get_json()
    validate(document)

    served: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        methods = {m.lower() for m in (rule.methods or set())} - {"head", "options"}
        served.setdefault(openapi_path(rule.rule), set()).update(methods)
    documented = {path: set(item) for path, item in document["paths"].items()}
    assert served == documented
    assert any(path.startswith("/api/v1/") for path in served)

    for path, item in document["paths"].items():
        for op in item.values():
            protected = path.startswith("/api/v1/") and path != "/api/v1/openapi.json"
            if tokens and protected:
                assert "401" in op["responses"], path
                assert "security" not in op  # the document-wide bearer requirement applies
            if tokens and not protected:
                assert op["security"] == []
    assert ("security" in document) == bool(tokens)
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


# --- the console script serves ----------------------------------------------------------------


def test_gpu_analytics_serves_without_prometheus_and_stops_on_sigterm(tmp_path: Path) -> None:
    with gpu_analytics(tmp_path, dead_url(), free_port()) as base:
        response = requests.get(f"{base}/healthz", timeout=10)
        assert response.json()["status"] == "success"
        ready = requests.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["data"]["prometheus"]["reachable"] is False
        health = requests.get(f"{base}/api/v1/gpu/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["error"]["code"] == "SERVICE_UNAVAILABLE"


def test_the_published_metric_names_are_the_ones_rules_and_dashboards_may_use() -> None:
    from analytics.telemetry import ANALYTICS_METRIC_NAMES

    text = app_for().test_client().get("/metrics").get_data(as_text=True)
    published = set(re.findall(r"^# TYPE (gpu_analytics_\w+) ", text, re.MULTILINE))
    published -= {name for name in published if name.endswith("_created")}  # client_python's
    # The refresh gauges appear once their first refresh has run (Prometheus is down here).
    later = {name for name in ANALYTICS_METRIC_NAMES if name.endswith("_refresh_success")}
    assert published | later == set(ANALYTICS_METRIC_NAMES)
