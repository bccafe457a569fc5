"""Schemathesis against the served OpenAPI document, with a real Prometheus holding a fleet's
history behind the app: every operation, valid and invalid inputs, with no token and with a
team-scoped one. No answer may be a 5xx, and every answer must match the document (status
code, content type and body schema).

``SCHEMATHESIS_EXAMPLES`` sets the examples per operation and mode (default 8, so `make test`
stays quick); the longer run recorded in docs/benchmarks.md used 200.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from analytics.app import create_app
from analytics.config import Config, Limits, PrometheusConfig
from analytics.scope import Scope
from tests.conftest import PrometheusFactory
from tests.ground_truth import PRICING
from tests.integration.api_history import FleetHistory, start_fleet_history

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "8"))
TOKEN = "nlp-token-0123456789abcdef"
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
NO_LIMITS = Limits(requests_per_minute=0, token_requests_per_minute=0)


def build_app(url: str, *, scoped: bool, end: float | None = None) -> Flask:
    settings: dict[str, Any] = {}
    if scoped:
        settings = {
            "api_tokens": (TOKEN,),
            "api_token_scopes": {TOKEN: Scope(teams=frozenset({"nlp"}))},
        }
    config = Config(
        prometheus=PrometheusConfig(url=url, timeout_seconds=30, retries=0),
        pricing_file=PRICING,
        limits=NO_LIMITS,
        **settings,
    )
    now = dt.datetime.fromtimestamp(end, tz=dt.UTC) if end is not None else None
    return create_app(config, clock=(lambda: now) if now is not None else None)


def operation_labels() -> list[str]:
    """Every operation of the document (it does not depend on Prometheus being there)."""
    schema = schemathesis.openapi.from_wsgi(
        "/api/v1/openapi.json", build_app("http://127.0.0.1:9", scoped=True)
    )
    return sorted(result.ok().label for result in schema.get_all_operations())


@pytest.fixture(scope="module")
def history(
    module_prometheus: PrometheusFactory, tmp_path_factory: pytest.TempPathFactory
) -> FleetHistory:
    return start_fleet_history(module_prometheus, tmp_path_factory.mktemp("schemathesis"))


@pytest.fixture(scope="module")
def schemas(history: FleetHistory) -> dict[bool, Any]:
    return {
        scoped: schemathesis.openapi.from_wsgi(
            "/api/v1/openapi.json",
            build_app(history.server.url, scoped=scoped, end=history.end),
        )
        for scoped in (False, True)
    }


@pytest.mark.parametrize("scoped", [False, True], ids=["no-token", "scoped-token"])
@pytest.mark.parametrize("label", operation_labels())
def test_no_5xx_and_no_schema_violation(schemas: dict[bool, Any], label: str, scoped: bool) -> None:
    operation = schemas[scoped].find_operation_by_label(label)
    headers = {"Authorization": f"Bearer {TOKEN}"} if scoped else {}
    calls = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=st.one_of(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
        )
    )
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        response = case.call(headers=headers)
        case.validate_response(response, checks=CHECKS)

    run()
    assert calls >= 1
    print(f"schemathesis: {label} {'scoped' if scoped else 'no-token'}: {calls} requests")
