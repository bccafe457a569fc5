"""Team-scoped tokens and the report cache against a real Prometheus with a fleet's history.

Every served ``/api/v1`` route is called with a token bound to a team (the one of the MIG
inference pods) and with one bound to a namespace (the notebooks' and the forgotten GPU's):
each answer must be 200 with only the token's own pods and devices,
or 403 (cluster-wide figures), or 404 (a device the token's pods do not hold), and never name
another team's namespace, team, pod or device. Requests that name another namespace or team
are 403. A burst of identical report requests costs Prometheus one set of queries.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from analytics.app import create_app
from analytics.config import Config, Limits, PrometheusConfig
from analytics.scope import Scope, policy_of
from exporter.simulator import load_fleet
from tests.conftest import PrometheusFactory
from tests.ground_truth import PRICING
from tests.integration.api_history import FLEET, NODE, FleetHistory, start_fleet_history

pytestmark = pytest.mark.integration

_PODS = {pod.name: pod for pod in load_fleet(FLEET).nodes[NODE].pods}
TEAM = _PODS["server-large"].labels["team"]  # both MIG inference pods' team
NAMESPACE = _PODS["forgotten"].namespace  # the notebooks and the forgotten GPU
OTHER_TEAM = _PODS["forgotten"].labels["team"]
OTHER_NAMESPACE = _PODS["trainer"].namespace
ADMIN = "admin-token-0123456789abcdef"
NLP = "team-token-0123456789abcdef"
RESEARCH = "namespace-token-0123456789abcdef"
SCOPES = {
    NLP: Scope(teams=frozenset({TEAM})),
    RESEARCH: Scope(namespaces=frozenset({NAMESPACE})),
}


@pytest.fixture(scope="module")
def history(
    module_prometheus: PrometheusFactory, tmp_path_factory: pytest.TempPathFactory
) -> FleetHistory:
    return start_fleet_history(module_prometheus, tmp_path_factory.mktemp("security"))


def make_app(history: FleetHistory, **settings: Any) -> Flask:
    config = Config(
        prometheus=PrometheusConfig(url=history.server.url, timeout_seconds=30, retries=0),
        pricing_file=PRICING,
        api_tokens=(ADMIN, NLP, RESEARCH),
        api_token_scopes=SCOPES,
        **settings,
    )
    now = dt.datetime.fromtimestamp(history.end, tz=dt.UTC)
    return create_app(config, clock=lambda: now)


@pytest.fixture(scope="module")
def app(history: FleetHistory) -> Flask:
    return make_app(history)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    yield app.test_client()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def visible_to(history: FleetHistory, scope: Scope) -> tuple[set[str], set[str]]:
    """(pods, device uuids) a scope may see: its pods and what they hold."""
    pods = {
        name for name, (namespace, team) in history.pods().items() if scope.allows(namespace, team)
    }
    devices = set().union(*(history.devices()[pod] for pod in pods))
    return pods, devices


def forbidden_strings(history: FleetHistory, scope: Scope) -> set[str]:
    """Names that must never reach a token of ``scope``: other pods, their devices, and the
    namespaces and teams no visible pod has."""
    pods, devices = visible_to(history, scope)
    every = history.pods()
    out = {name for name in every if name not in pods}
    out |= set().union(*history.devices().values()) - devices
    namespaces = {every[p][0] for p in pods}
    teams = {every[p][1] for p in pods if every[p][1]}
    out |= {ns for ns, _ in every.values()} - namespaces
    out |= {team for _, team in every.values() if team} - teams
    # Every GPU uuid of the node, held or not (GPU 4 is nobody's: unallocated capacity).
    gpus = {gpu.uuid for gpu in history.fleet.nodes[NODE].gpus}
    return out | (gpus - devices)


def strings(value: Any) -> Iterator[str]:
    """Every string key and value in a JSON document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def leaks(response: Any, forbidden: set[str]) -> set[str]:
    """The forbidden names a response contains (JSON strings, or CSV cells, exactly; pod names
    and device uuids also as parts of longer strings such as allocation ids)."""
    if response.mimetype == "text/csv":
        found = {
            cell for row in csv.reader(io.StringIO(response.get_data(as_text=True))) for cell in row
        }
    else:
        found = set(strings(response.get_json()))
    exact = found & forbidden
    parts = {
        name
        for name in forbidden
        if len(name) > 4 and any(re.search(rf"(^|[/_]){re.escape(name)}($|[/_])", s) for s in found)
    }
    return exact | parts


def api_routes(app: Flask) -> list[tuple[str, str]]:
    """(rule, endpoint) of every served /api/v1 route but the OpenAPI document."""
    return sorted(
        (rule.rule, rule.endpoint)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1/") and rule.rule != "/api/v1/openapi.json"
    )


# Extra queries per route: the CSV forms and other aggregates show the same data another way.
VARIANTS: dict[str, list[str]] = {
    "/api/v1/gpu/cost/report": [
        f"aggregate={a}" for a in ("namespace", "team", "pod", "node", "model", "mig_profile")
    ]
    + ["format=csv", "aggregate=pod&format=csv"],
    "/api/v1/gpu/idle": ["window=6h", "window=6h&format=csv"],
    "/api/v1/gpu/forecast": ["scope=namespace", "scope=team"],
    "/api/v1/gpu/cost/optimization": ["days=1"],
}


@pytest.mark.parametrize("token", [NLP, RESEARCH])
def test_a_scoped_token_never_receives_another_teams_data(
    app: Flask, client: FlaskClient, history: FleetHistory, token: str
) -> None:
    scope = SCOPES[token]
    forbidden = forbidden_strings(history, scope)
    _, own_devices = visible_to(history, scope)
    gpus = [gpu.uuid for gpu in history.fleet.nodes[NODE].gpus]
    checked: dict[str, list[int]] = {}
    for rule, endpoint in api_routes(app):
        policy = policy_of(app.view_functions[endpoint])
        if "<" in rule:
            paths = [re.sub(r"<[^>]+>", gpu, rule) for gpu in gpus]
        else:
            paths = [rule] + [f"{rule}?{q}" for q in VARIANTS.get(rule, [])]
        for path in paths:
            response = client.get(path, headers=auth(token))
            status = response.status_code
            checked.setdefault(rule, []).append(status)
            assert status in (200, 403, 404), (path, response.get_data(as_text=True)[:500])
            if policy == "cluster":
                assert status == 403, path
                assert response.get_json()["error"]["code"] == "FORBIDDEN"
            if "<" in rule:
                gpu = path.rsplit("/", 1)[1]
                assert status == (200 if gpu in own_devices else 404), path
            # A 404 names the id the client asked for: an echo, not a leak.
            asked = {path.rsplit("/", 1)[1]} if "<" in rule else set()
            assert not leaks(response, forbidden - asked), (path, leaks(response, forbidden))
    # The detector works: the unscoped token's answers do name what the scoped one must not see.
    for path in ("/api/v1/gpu/allocations", "/api/v1/gpu/cost/analysis", "/api/v1/gpu/devices"):
        assert leaks(client.get(path, headers=auth(ADMIN)), forbidden), path
    # Every route was walked, and the filtered ones answered.
    assert len(checked) >= 20
    for rule, statuses in checked.items():
        policy = policy_of(app.view_functions[dict(api_routes(app))[rule]])
        if policy in ("filtered", "open") and "<" not in rule and rule != "/api/v1/gpu/forecast":
            assert set(statuses) == {200}, (rule, statuses)


@pytest.mark.parametrize(
    ("token", "own", "theirs"),
    [
        (NLP, f"team={TEAM}", f"team={OTHER_TEAM}"),
        (RESEARCH, f"namespace={NAMESPACE}", f"namespace={OTHER_NAMESPACE}"),
    ],
)
def test_requests_naming_another_team_or_namespace_are_403(
    client: FlaskClient, token: str, own: str, theirs: str
) -> None:
    filterable = [
        "/api/v1/gpu/cost/report",
        "/api/v1/gpu/allocations/cost-statistics",
        "/api/v1/gpu/allocations",
        "/api/v1/gpu/idle",
    ]
    for path in filterable:
        assert client.get(f"{path}?{own}", headers=auth(token)).status_code == 200, path
        response = client.get(f"{path}?{theirs}", headers=auth(token))
        assert response.status_code == 403, path
        error = response.get_json()["error"]
        assert error["code"] == "FORBIDDEN"
        assert error["details"]["reason"] == "outside_token_scope"
    # Forecasts: only the token's own namespaces or teams, never the cluster or a node.
    scope, name = own.split("=")
    assert client.get(
        f"/api/v1/gpu/forecast?scope={scope}&name={name}", headers=auth(token)
    ).status_code in (200, 404)
    other_scope, other = theirs.split("=")
    for query in (f"scope={other_scope}&name={other}", "scope=cluster", "scope=node", ""):
        response = client.get(f"/api/v1/gpu/forecast?{query}", headers=auth(token))
        assert response.status_code == 403, query


def test_scoped_answers_are_the_tokens_share_of_the_full_answer(client: FlaskClient) -> None:
    full = client.get("/api/v1/gpu/cost/analysis?days=1", headers=auth(ADMIN)).get_json()["data"]
    nlp = client.get("/api/v1/gpu/cost/analysis?days=1", headers=auth(NLP)).get_json()["data"]
    research = client.get("/api/v1/gpu/cost/analysis?days=1", headers=auth(RESEARCH)).get_json()[
        "data"
    ]
    inference = _PODS["server-large"].namespace  # only the team's pods run there
    assert full["costByNamespace"][inference] > 0
    assert nlp["costByNamespace"] == {inference: full["costByNamespace"][inference]}
    assert nlp["costByTeam"] == {TEAM: full["costByTeam"][TEAM]}
    assert research["costByNamespace"] == {NAMESPACE: full["costByNamespace"][NAMESPACE]}
    # The namespace token sees its pods without a team label too (the union of both rules).
    assert set(research["costByTeam"]) == {OTHER_TEAM, "(none)"}
    assert nlp["idleCost"] == {"unallocated": None}  # capacity nobody holds is not the team's
    assert nlp["totalCost"] == pytest.approx(nlp["allocatedCost"])
    # The forgotten GPU is idle all along: the namespace's token sees it.
    idle = client.get("/api/v1/gpu/idle?window=6h", headers=auth(RESEARCH)).get_json()["data"]
    assert "forgotten" in {item["pod"] for item in idle["items"]}
    assert idle["unallocated"] is None
    allocations = client.get("/api/v1/gpu/allocations", headers=auth(NLP)).get_json()["data"]
    assert sorted(a["pod"] for a in allocations["allocations"]) == ["server-large", "server-small"]


def prometheus_queries(history: FleetHistory) -> int:
    """Query API requests Prometheus has answered (from its own /metrics)."""
    text = requests.get(f"{history.server.url}/metrics", timeout=10).text
    pattern = (
        r'prometheus_http_requests_total\{code="\d+",handler="/api/v1/query(?:_range)?"\} (\S+)'
    )
    return int(sum(float(v) for v in re.findall(pattern, text)))


def test_a_burst_of_identical_reports_costs_one_set_of_prometheus_queries(
    history: FleetHistory,
) -> None:
    path = "/api/v1/gpu/cost/analysis?days=1"
    before = prometheus_queries(history)
    single = make_app(history).test_client().get(path, headers=auth(ADMIN))
    assert single.status_code == 200
    one_set = prometheus_queries(history) - before
    assert one_set >= 5

    app = make_app(history)
    barrier = threading.Barrier(20)
    bodies: list[Any] = []

    def call() -> None:
        client = app.test_client()
        barrier.wait(10)
        response = client.get(path, headers=auth(ADMIN))
        bodies.append((response.status_code, response.get_json()["data"]))

    before = prometheus_queries(history)
    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert prometheus_queries(history) - before == one_set
    assert len(bodies) == 20 and {status for status, _ in bodies} == {200}
    assert all(body == bodies[0][1] for _, body in bodies)
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'gpu_analytics_report_cache_requests_total{result="miss"} 1.0' in metrics
    # A different scope is a different answer: it is computed, not served from the cache.
    before = prometheus_queries(history)
    assert app.test_client().get(path, headers=auth(NLP)).status_code == 200
    assert prometheus_queries(history) - before > 0


def test_without_the_ttl_only_concurrent_requests_share(history: FleetHistory) -> None:
    app = make_app(history, limits=Limits(cache_ttl_seconds=0))
    path = "/api/v1/gpu/allocations/cost-statistics?days=1"
    before = prometheus_queries(history)
    app.test_client().get(path, headers=auth(ADMIN))
    one = prometheus_queries(history) - before
    app.test_client().get(path, headers=auth(ADMIN))
    assert prometheus_queries(history) - before == 2 * one
