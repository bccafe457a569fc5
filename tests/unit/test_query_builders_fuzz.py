"""Fuzz of every query builder a request value reaches: 10,000 payloads, each through
``validate_name``/``validate_label_value`` and then through the PromQL the blueprints build
(``cost.window_sum_query``, ``idle.idle_points_query`` for both sources,
``usage.allocations_query``, the device selectors, the overheating and window queries).

Each generated query is lexed with a tokenizer that follows PromQL's lexer (strings with Go
escapes, comments, durations, numbers, identifiers, operators) and compared token by token with
the same builder's query for a harmless reference value: the two must differ only in the string
literals that carried the value, and each of those must unescape to exactly the payload. So a
payload can never add, drop or change a selector, a matcher, an operator or a comment, whatever
it contains; and validation, where it accepts, accepts only what the Kubernetes grammar allows.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytics import cost, idle, pricing, usage
from analytics.config import Config
from analytics.promql import (
    InvalidParameter,
    NameRule,
    selector,
    validate_label_value,
    validate_name,
)
from tests.unit.test_promql import ParseError, _parse_string, payloads

# Harmless stand-ins for the three request values: valid under every rule, distinct, and in
# no builder's fixed text.
REF_NAMESPACE, REF_TEAM, REF_VALUE = "zzrefns", "zzrefteam", "zzrefvalue"
REFERENCES = (REF_NAMESPACE, REF_TEAM, REF_VALUE)

_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\n]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<duration>(?:[0-9]+(?:ms|[smhdwy]))+)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
  | (?P<identifier>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<operator>=~|!~|!=|==|<=|>=|[{}()\[\],=<>+\-*/%^@])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    value: str  # strings: the unescaped value; others: the text


def tokens(query: str) -> list[Token]:
    """Lex ``query``; anything PromQL would not lex is a ParseError. Comments are kept: a
    payload that opened one would show up as a different token stream."""
    out: list[Token] = []
    pos = 0
    while pos < len(query):
        match = _TOKEN.match(query, pos)
        if match is None:
            raise ParseError(f"cannot lex {query[pos : pos + 20]!r} at {pos}")
        kind = match.lastgroup or ""
        text = match.group()
        if kind == "string":
            value, end = _parse_string(query, pos)
            if end != match.end():
                raise ParseError(f"string at {pos} lexed inconsistently")
            out.append(Token(kind, text, value))
        elif kind != "space":
            out.append(Token(kind, text, text))
        pos = match.end()
    return out


def same_but_values(built: str, reference: str, values: dict[str, str]) -> int:
    """Assert ``built`` lexes like ``reference`` except string literals holding a reference
    value, which must hold the matching payload instead; return how many such literals."""
    got, want = tokens(built), tokens(reference)
    assert [t.kind for t in got] == [t.kind for t in want], (built, reference)
    replaced = 0
    for have, expected in zip(got, want, strict=True):
        if expected.kind == "string" and expected.value in values:
            assert have.value == values[expected.value], (have, expected)
            replaced += 1
        else:
            assert have.text == expected.text, (have, expected)
    return replaced


def selectors(query: str) -> list[tuple[str, tuple[tuple[str, str, str], ...]]]:
    """Every ``metric{label op "value", ...}`` of a query (metric "" for bare braces)."""
    toks = tokens(query)
    found = []
    for i, tok in enumerate(toks):
        if tok.text != "{" or tok.kind != "operator":
            continue
        # `by (...) {`? never in PromQL: a brace follows a metric name or stands alone.
        metric = toks[i - 1].text if i and toks[i - 1].kind == "identifier" else ""
        pairs = []
        j = i + 1
        while toks[j].text != "}":
            label, op, value = toks[j], toks[j + 1], toks[j + 2]
            assert label.kind == "identifier" and op.text in ("=", "!=", "=~", "!~")
            assert value.kind == "string"
            pairs.append((label.text, op.text, value.value))
            j += 3
            if toks[j].text == ",":
                j += 1
        found.append((metric, tuple(pairs)))
    return found


# The builders, as the blueprints call them, with the request values as parameters.
WINDOW = cost.Window(dt.datetime(2025, 8, 1, tzinfo=dt.UTC), dt.datetime(2025, 8, 8, tzinfo=dt.UTC))
EXPORTER = Config().rule_inputs()
DCGM = Config(source="dcgm").rule_inputs()
TEAM = "label_team"


def _filters(namespace: str, team: str) -> dict[str, str]:
    return {"namespace": namespace, TEAM: team}


BUILDERS: dict[str, Callable[[str, str, str], str]] = {
    # /gpu/cost/report, /gpu/allocations/cost-statistics (filtered), cost analysis (scoped)
    "window_sum_query": lambda ns, team, _v: cost.window_sum_query(
        pricing.POD_COST, WINDOW, ("namespace", "pod", TEAM), _filters(ns, team)
    ),
    # /gpu/idle with namespace and team filters, our exporter and DCGM
    "idle_points_query[exporter]": lambda ns, team, _v: idle.idle_points_query(
        EXPORTER, step_seconds=60, threshold=0.05, team_label=TEAM, filters=_filters(ns, team)
    ),
    "idle_points_query[dcgm]": lambda ns, team, _v: idle.idle_points_query(
        DCGM, step_seconds=300, threshold=0.05, team_label=TEAM, filters=_filters(ns, team)
    ),
    # /gpu/allocations
    "allocations_query": lambda ns, team, _v: usage.allocations_query(
        _filters(ns, team), EXPORTER.allocations
    ),
    # /gpu/devices?nodeName=&modelId=, /gpu/devices/{deviceId}, /gpu/mig/devices/{deviceId}
    "device selectors": lambda ns, _t, value: " or ".join(
        [selector(m, node=ns, model=value) for m in ("gpu_info", "gpu_up")]
        + [selector("gpu_mig_info", uuid=value)]
    ),
}


_NAMESPACE = r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?"
_TEAM_VALUE = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,10}[A-Za-z0-9])?"


def _validated(value: str, rule: NameRule | None) -> bool:
    try:
        if rule is None:
            validate_label_value(value, "value")
        else:
            validate_name(value, "value", rule=rule)
    except InvalidParameter:
        return False
    return True


def test_every_query_builder_keeps_exactly_its_selectors_for_10000_payloads() -> None:
    examples = 0
    accepted = {"dns-label": 0, "label-value": 0, "printable": 0}
    references = {name: build(*REFERENCES) for name, build in BUILDERS.items()}
    # The reference values sit in string literals only, where the builders put request values.
    for name, query in references.items():
        literals = [t.value for t in tokens(query) if t.kind == "string"]
        assert set(REFERENCES) & set(literals), name
        fixed = "".join(t.text for t in tokens(query) if t.kind != "string")
        assert not any(ref in fixed for ref in REFERENCES), name

    @settings(
        max_examples=10_000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(
        namespace=st.one_of(payloads, st.from_regex(_NAMESPACE, fullmatch=True)),
        team=st.one_of(payloads, st.from_regex(_TEAM_VALUE, fullmatch=True)),
        value=payloads,
    )
    def check(namespace: str, team: str, value: str) -> None:
        nonlocal examples
        examples += 1
        # 1. Quoting alone keeps every builder's structure, for any text at all (unvalidated).
        carried = dict(zip(REFERENCES, (namespace, team, value), strict=True))
        for name, build in BUILDERS.items():
            assert same_but_values(build(namespace, team, value), references[name], carried)
        # 2. What validation accepts is what the Kubernetes grammar allows, and the selectors
        #    of the query built from it are exactly the intended ones.
        if _validated(namespace, "dns-label"):
            accepted["dns-label"] += 1
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace)
        if _validated(team, "label-value"):
            accepted["label-value"] += 1
            assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", team)
        if _validated(value, None):
            accepted["printable"] += 1
            assert value.isprintable() and 0 < len(value) <= 253
        query = BUILDERS["window_sum_query"](namespace, team, value)
        assert selectors(query) == [
            (pricing.POD_COST, (("namespace", "=", namespace), (TEAM, "=", team)))
        ]
        query = BUILDERS["device selectors"](namespace, team, value)
        assert selectors(query) == [
            ("gpu_info", (("node", "=", namespace), ("model", "=", value))),
            ("gpu_up", (("node", "=", namespace), ("model", "=", value))),
            ("gpu_mig_info", (("uuid", "=", value),)),
        ]

    check()
    assert examples >= 10_000
    # The generator reaches the accepting side of every validator often, not only rejections.
    assert min(accepted.values()) >= 1_000, accepted


@settings(max_examples=2_000, deadline=None, database=None)
@given(
    threshold=st.one_of(st.text(max_size=12), st.floats(allow_nan=True).map(str)),
    hours=st.one_of(st.text(max_size=6), st.integers(-5, 2_000).map(str)),
    window=st.one_of(st.text(max_size=8), st.from_regex(r"[0-9]{1,6}[hdwms]", fullmatch=True)),
)
def test_numeric_parameters_reach_promql_only_as_bounded_numbers(
    threshold: str, hours: str, window: str
) -> None:
    """Thresholds, hours and windows are parsed to bounded numbers before any query sees them:
    the query then holds exactly one number or duration built from the parsed value."""
    try:
        degrees = usage.parse_threshold(threshold)
        span = cost.parse_int(hours, "hours", default=1, low=1, high=usage.MAX_HOURS)
    except InvalidParameter:
        degrees = span = None
    if degrees is not None and span is not None:
        assert math.isfinite(degrees) and 0 <= degrees <= usage.MAX_THRESHOLD
        toks = tokens(usage.overheating_query(degrees, span))
        assert [t.text for t in toks if t.kind == "duration"] == [f"{span * 3600}s"]
        assert [float(t.text) for t in toks if t.kind == "number"] == [degrees]
        assert selectors(usage.overheating_query(degrees, span)) == [
            ("gpu_temperature_celsius", ())
        ]
    now = dt.datetime(2025, 8, 8, tzinfo=dt.UTC)
    try:
        parsed = cost.parse_window(now=now, window=window)
    except InvalidParameter:
        return
    assert 0 < parsed.seconds <= cost.MAX_WINDOW_DAYS * cost.DAY_SECONDS
    toks = tokens(cost.window_sum_query(pricing.POD_COST, parsed, ("namespace",)))
    assert [t.text for t in toks if t.kind == "duration"] == [f"{parsed.seconds * 1000 - 1}ms"]
