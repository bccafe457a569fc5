"""Rate limits (seed 001 section 8), the cap on Prometheus queries in flight, the single-flight
report cache, team-scoped tokens in the tokens file, and the scope guard."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from analytics.app import create_app
from analytics.config import (
    Config,
    ConfigError,
    Limits,
    PrometheusConfig,
    load_config,
    read_api_token_file,
    read_api_tokens,
)
from analytics.envelope import ApiError, success
from analytics.limits import GatedPrometheus, Overloaded, RateLimiter, ResultCache
from analytics.prometheus import Sample
from analytics.scope import Scope, scoped
from tests.unit.test_analytics_app import FIXED_NOW, assert_error, dead_url

TOKEN = "admin-token-0123456789"
NLP = "nlp-token-0123456789"


def app_with(**kwargs: Any) -> Flask:
    config = Config(prometheus=PrometheusConfig(url=dead_url(), timeout_seconds=2, retries=0))
    fields = {**config.__dict__, **kwargs}
    return create_app(Config(**fields), clock=lambda: FIXED_NOW)


def add_route(app: Flask, rule: str, policy: str | None = None) -> None:
    def view() -> Any:
        return success({"ok": True})

    if policy is not None:
        view = scoped(policy)(view)  # type: ignore[arg-type]
    app.add_url_rule(rule, endpoint=rule, view_func=view)


@pytest.fixture(autouse=True)
def _not_at_a_minute_boundary() -> Iterator[None]:
    """Rate limits count per wall-clock minute: start each test well inside one."""
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)
    yield


# --- rate limits ------------------------------------------------------------------------------


def test_rate_limiter_counts_per_key_in_fixed_minutes() -> None:
    now = [1_000_020.0]
    limiter = RateLimiter(clock=lambda: now[0])
    first = [limiter.hit("a", 2) for _ in range(3)]
    assert [d.allowed for d in first] == [True, True, False]
    assert [d.remaining for d in first] == [1, 0, 0]
    assert first[0].reset == 1_000_020 - 1_000_020 % 60 + 60
    assert first[2].retry_after == first[0].reset - 1_000_020
    assert limiter.hit("b", 2).allowed  # another key has its own count
    now[0] += 60  # the next minute starts afresh
    assert limiter.hit("a", 2).remaining == 1


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(clock=lambda: 0.0, max_keys=2)
    assert limiter.hit("a", 1).allowed and limiter.hit("b", 1).allowed
    # Past the bound, new clients share one bucket: the third is allowed, the fourth is not.
    assert limiter.hit("c", 1).allowed
    assert not limiter.hit("d", 1).allowed


def test_api_answers_the_seed_headers_and_429_past_the_limit() -> None:
    app = app_with(limits=Limits(requests_per_minute=3, token_requests_per_minute=0))
    add_route(app, "/api/v1/ping", "open")
    client = app.test_client()
    remaining = []
    for _ in range(3):
        response = client.get("/api/v1/ping")
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
        reset = int(response.headers["X-RateLimit-Reset"])
        assert reset % 60 == 0 and 0 < reset - time.time() <= 60
    assert remaining == [2, 1, 0]
    refused = client.get("/api/v1/ping")
    error = assert_error(refused, 429, "RATE_LIMIT_EXCEEDED")
    assert error["details"]["limit"] == 3
    assert 1 <= error["details"]["retryAfter"] <= 60
    assert refused.headers["Retry-After"] == str(error["details"]["retryAfter"])
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    # Probes and the service's metrics are never limited, and carry no rate-limit headers.
    for path in ("/healthz", "/metrics"):
        response = client.get(path)
        assert response.status_code == 200 and "X-RateLimit-Limit" not in response.headers
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'gpu_analytics_rejected_requests_total{reason="rate_limited"} 1.0' in metrics


def test_tokens_have_their_own_limit_and_wrong_tokens_count_against_the_address() -> None:
    app = app_with(
        api_tokens=(TOKEN,), limits=Limits(requests_per_minute=2, token_requests_per_minute=4)
    )
    add_route(app, "/api/v1/ping", "open")
    client = app.test_client()
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/v1/ping", headers=good).headers["X-RateLimit-Limit"] == "4"
    wrong = {"Authorization": "Bearer not-the-token"}
    assert_error(client.get("/api/v1/ping", headers=wrong), 401, "UNAUTHORIZED")
    assert_error(client.get("/api/v1/ping", headers=wrong), 401, "UNAUTHORIZED")
    # The address has spent its 2: guessing tokens is rate limited too.
    assert_error(client.get("/api/v1/ping", headers=wrong), 429, "RATE_LIMIT_EXCEEDED")
    # The valid token still has 2 of its 4 left (the 401s were not its requests).
    statuses = [client.get("/api/v1/ping", headers=good).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_rate_limits_can_be_turned_off() -> None:
    app = app_with(limits=Limits(requests_per_minute=0, token_requests_per_minute=0))
    add_route(app, "/api/v1/ping", "open")
    response = app.test_client().get("/api/v1/ping")
    assert response.status_code == 200 and "X-RateLimit-Limit" not in response.headers


# --- the Prometheus query cap -----------------------------------------------------------------


class BlockingPrometheus:
    """A fake client whose queries wait until released (counted as they start)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.url = "fake://"

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        self.started.release()
        self.release.wait(10)
        return []

    def healthy(self) -> bool:
        return True


def test_gate_lets_n_queries_through_and_refuses_the_next_in_time() -> None:
    fake = BlockingPrometheus()
    gate = GatedPrometheus(fake, slots=1, timeout=0.2)
    worker = threading.Thread(target=gate.query, args=("up",))
    worker.start()
    assert fake.started.acquire(timeout=5)
    began = time.monotonic()
    with pytest.raises(Overloaded):
        gate.query("up")
    assert 0.15 <= time.monotonic() - began < 2
    assert gate.healthy() is True  # everything else passes through, ungated
    fake.release.set()
    worker.join(5)
    assert gate.query("up") == []  # the slot is free again


def test_requests_past_the_query_cap_get_503_overloaded() -> None:
    fake = BlockingPrometheus()
    config = Config(limits=Limits(max_concurrent_queries=1, queue_timeout_seconds=0.2))
    app = create_app(config, prometheus=fake, clock=lambda: FIXED_NOW)  # type: ignore[arg-type]
    results: list[int] = []
    first = threading.Thread(
        target=lambda: results.append(app.test_client().get("/api/v1/gpu/health").status_code)
    )
    first.start()
    assert fake.started.acquire(timeout=5)
    response = app.test_client().get("/api/v1/gpu/health")
    error = assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert error["details"] == {"reason": "overloaded"}
    assert response.headers["Retry-After"] == "1"
    fake.release.set()
    first.join(10)
    assert results == [200]
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'gpu_analytics_rejected_requests_total{reason="overloaded"} 1.0' in metrics


# --- the report cache -------------------------------------------------------------------------


def test_identical_concurrent_requests_share_one_computation() -> None:
    cache = ResultCache(ttl_seconds=0, max_entries=8, wait_seconds=5)
    calls: list[int] = []
    gate = threading.Event()

    def compute() -> dict[str, int]:
        calls.append(1)
        gate.wait(5)
        return {"answer": 42}

    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("k", compute))) for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # let them all join the flight
    gate.set()
    for thread in threads:
        thread.join(5)
    assert calls == [1]
    assert results == [{"answer": 42}] * 20
    assert cache.get("k", lambda: {"answer": 0}) == {"answer": 0}  # ttl 0: nothing stored


def test_failures_reach_every_waiter_and_are_not_stored() -> None:
    cache = ResultCache(ttl_seconds=60, max_entries=8, wait_seconds=5)
    gate = threading.Event()

    def fail() -> Any:
        gate.wait(5)
        raise RuntimeError("Prometheus said no")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get("k", fail)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 5 and all(str(e) == "Prometheus said no" for e in errors)
    assert cache.get("k", lambda: "fresh") == "fresh"


def test_results_expire_after_the_ttl_and_the_cache_is_bounded() -> None:
    now = [0.0]
    cache = ResultCache(ttl_seconds=30, max_entries=2, wait_seconds=1, clock=lambda: now[0])
    assert cache.get("a", lambda: 1) == 1
    assert cache.get("a", lambda: 2) == 1  # stored
    now[0] = 31
    assert cache.get("a", lambda: 3) == 3  # expired, recomputed
    cache.get("b", lambda: 1)
    cache.get("c", lambda: 1)  # "a" (stored first) is dropped
    assert cache.get("a", lambda: 4) == 4


# --- tokens file and scopes -------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tokens_file_binds_tokens_to_teams_and_namespaces(tmp_path: Path) -> None:
    path = write(
        tmp_path / "tokens",
        "- admin-1\n"
        "- {token: nlp-1, teams: [nlp]}\n"
        "- {token: both-1, teams: [nlp, vision], namespaces: [ml]}\n"
        "- token: ns-1\n  namespaces: research\n",
    )
    scopes = read_api_token_file(path)
    assert list(scopes) == ["admin-1", "nlp-1", "both-1", "ns-1"]
    assert not scopes["admin-1"].restricted
    assert scopes["nlp-1"] == Scope(teams=frozenset({"nlp"}))
    assert scopes["both-1"] == Scope(frozenset({"nlp", "vision"}), frozenset({"ml"}))
    assert scopes["ns-1"] == Scope(namespaces=frozenset({"research"}))
    assert read_api_tokens(path) == ("admin-1", "nlp-1", "both-1", "ns-1")
    config = load_config(write(tmp_path / "a.yaml", "api_tokens_file: tokens\n"))
    assert config.api_tokens == ("admin-1", "nlp-1", "both-1", "ns-1")
    assert set(config.api_token_scopes) == {"nlp-1", "both-1", "ns-1"}  # scoped ones only


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- {token: a, teams: []}\n", "non-empty list"),  # empty would read as "everything"
        ("- {token: a, namespaces: [Bad_NS]}\n", "DNS-1123"),
        ("- {token: a, teamz: [nlp]}\n", "unknown key"),
        ("- {teams: [nlp]}\n", "missing or not a string"),
        ("- {token: a, teams: [nlp]}\n- {token: a, teams: [ml]}\n", "twice"),
        ("- {token: a b, teams: [nlp]}\n", "spaces"),
    ],
)
def test_bad_scoped_tokens_stop_start_up(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        read_api_token_file(write(tmp_path / "tokens", text))


def test_limits_are_configured_bounded_and_overridable(tmp_path: Path) -> None:
    assert load_config(None, env={}).limits == Limits()
    path = write(
        tmp_path / "a.yaml",
        "limits: {requests_per_minute: 0, max_concurrent_queries: 2, cache_ttl_seconds: 0}\n",
    )
    limits = load_config(path, env={"GPU_ANALYTICS_LIMITS_QUEUE_TIMEOUT_SECONDS": "1.5"}).limits
    assert (limits.requests_per_minute, limits.max_concurrent_queries) == (0, 2)
    assert (limits.cache_ttl_seconds, limits.queue_timeout_seconds) == (0.0, 1.5)
    for text, key in [
        ("prometheus: {timeout_seconds: 301}\n", "prometheus.timeout_seconds"),
        ("prometheus: {retries: 11}\n", "prometheus.retries"),
        ("limits: {queue_timeout_seconds: 61}\n", "limits.queue_timeout_seconds"),
        ("limits: {cache_ttl_seconds: 3601}\n", "limits.cache_ttl_seconds"),
        ("limits: {max_concurrent_queries: 0}\n", "limits.max_concurrent_queries"),
        ("limits: {requests_per_minutes: 5}\n", "limits.requests_per_minute"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(write(tmp_path / "b.yaml", text), env={})


def test_scope_allows_the_union_of_its_teams_and_namespaces() -> None:
    scope = Scope(teams=frozenset({"nlp"}), namespaces=frozenset({"ml"}))
    assert scope.allows("ml", None) and scope.allows("ml", "vision")
    assert scope.allows("inference", "nlp")
    assert not scope.allows("inference", None) and not scope.allows("research", "research")
    assert Scope().allows("anything", None)
    scope.check_filters(namespace="ml", team="nlp")
    with pytest.raises(ApiError) as raised:
        scope.check_filters(namespace="inference")  # nlp's pods run there, but not only theirs
    assert raised.value.status == 403 and raised.value.details == {
        "reason": "outside_token_scope",
        "field": "namespace",
    }


def test_scoped_tokens_are_refused_where_a_view_declares_nothing_or_cluster() -> None:
    app = app_with(api_tokens=(TOKEN, NLP), api_token_scopes={NLP: Scope(frozenset({"nlp"}))})
    add_route(app, "/api/v1/undeclared")
    add_route(app, "/api/v1/cluster", "cluster")
    add_route(app, "/api/v1/mine", "filtered")
    client = app.test_client()
    admin = {"Authorization": f"Bearer {TOKEN}"}
    nlp = {"Authorization": f"Bearer {NLP}"}
    for path in ("/api/v1/undeclared", "/api/v1/cluster", "/api/v1/mine"):
        assert client.get(path, headers=admin).status_code == 200
    assert_error(client.get("/api/v1/undeclared", headers=nlp), 403, "FORBIDDEN")
    assert_error(client.get("/api/v1/cluster", headers=nlp), 403, "FORBIDDEN")
    assert client.get("/api/v1/mine", headers=nlp).status_code == 200
    assert_error(client.get("/api/v1/gpu/overview", headers=nlp), 403, "FORBIDDEN")
    assert_error(client.get("/api/v1/resources/forecast", headers=nlp), 403, "FORBIDDEN")
    assert_error(client.get("/api/v1/gpu/mig/available", headers=nlp), 403, "FORBIDDEN")


def test_every_api_view_declares_its_scope_policy() -> None:
    """A new endpoint must say what a team-scoped token sees there (else it is refused)."""
    from analytics.scope import policy_of

    app = app_with()
    undeclared = [
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1/")
        and rule.rule != "/api/v1/openapi.json"
        and policy_of(app.view_functions[rule.endpoint]) is None
    ]
    assert undeclared == []


def test_a_scope_for_an_unknown_token_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="scoped token"):
        app_with(api_tokens=(TOKEN,), api_token_scopes={"other": Scope(frozenset({"nlp"}))})


def test_openapi_documents_403_and_429_when_they_can_happen() -> None:
    app = app_with(api_tokens=(TOKEN, NLP), api_token_scopes={NLP: Scope(frozenset({"nlp"}))})
    document = app.test_client().get("/api/v1/openapi.json").get_json()
    op = document["paths"]["/api/v1/gpu/cost/analysis"]["get"]
    assert {"401", "403", "429"} <= set(op["responses"])
    too_many = document["components"]["responses"]["TooManyRequests"]
    assert {
        "Retry-After",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    } == set(too_many["headers"])
    plain = app_with(limits=Limits(requests_per_minute=0, token_requests_per_minute=0))
    document = plain.test_client().get("/api/v1/openapi.json").get_json()
    op = document["paths"]["/api/v1/gpu/cost/analysis"]["get"]
    assert "403" not in op["responses"] and "429" not in op["responses"]
