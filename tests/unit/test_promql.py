"""Request values reach PromQL only validated and quoted, and a selector means what it says.

The property tests parse every generated selector back with a tokenizer that follows
PromQL's own lexer for this subset (``name{label="string",...}``, Go string escapes, no raw
newline, no U+FFFD), so "parses back to exactly the intended matchers" is checked without
trusting the code under test. ``tests/integration/test_prometheus_client.py`` sends a sample
of the same payloads to a real Prometheus.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytics.promql import (
    InvalidParameter,
    duration,
    matchers,
    quote,
    selector,
    validate_label_value,
    validate_name,
)

INJECTION = 'a"} or vector(1) #'

# Fragments that break naive quoting: closing the string or the braces, comments, escapes,
# regex and template metacharacters, line breaks, and characters PromQL treats specially.
ADVERSARIAL = [
    INJECTION,
    '"',
    "\\",
    '\\"',
    "}",
    '"}',
    "\n",
    "\r\n",
    "#",
    " or vector(1)",
    "`",
    "'",
    "$1",
    ".*",
    "\x00",
    "\ufffd",
    "\u2028",
    "\\u0041",
    "\\x41",
    "\\n",
    "😀",
    "ü",
    '"} or on() vector(1) or foo{a="',
    "=~",
    "!=",
]

LABEL_NAMES = ["namespace", "pod", "node", "team", "model", "mig_profile", "uuid", "metric"]

payloads = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(ADVERSARIAL),
    st.lists(
        st.one_of(
            st.sampled_from(ADVERSARIAL),
            st.text(alphabet=st.characters(codec="utf-8"), max_size=5),
        ),
        max_size=6,
    ).map("".join),
)


# --- a tokenizer for the selector grammar, following promql/parser/lex.go -----------------

_METRIC = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}


class ParseError(AssertionError):
    pass


def _parse_string(text: str, pos: int) -> tuple[str, int]:
    """Parse a double-quoted PromQL string starting at ``pos``; return (value, next position)."""
    if text[pos : pos + 1] != '"':
        raise ParseError(f"expected '\"' at {pos}")
    pos += 1
    out: list[str] = []
    while True:
        if pos >= len(text):
            raise ParseError("unterminated quoted string")
        char = text[pos]
        if char == "\n":
            raise ParseError("unterminated quoted string (raw newline)")
        if char == "\ufffd":
            raise ParseError("invalid UTF-8 rune")
        if char == '"':
            return "".join(out), pos + 1
        if char != "\\":
            out.append(char)
            pos += 1
            continue
        pos += 1
        esc = text[pos : pos + 1]
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
            pos += 1
            continue
        if esc in ("u", "U", "x") or esc.isdigit():
            width, base = {"u": (4, 16), "U": (8, 16), "x": (2, 16)}.get(esc, (3, 8))
            start = pos if esc.isdigit() else pos + 1
            digits = text[start : start + width]
            if len(digits) != width:
                raise ParseError("escape sequence not terminated")
            try:
                code = int(digits, base)
            except ValueError as exc:
                raise ParseError(f"illegal escape {digits!r}") from exc
            if code > 0x10FFFF or 0xD800 <= code < 0xE000:
                raise ParseError("escape sequence is an invalid Unicode code point")
            out.append(chr(code))
            pos = start + width
            continue
        raise ParseError(f"unknown escape sequence {esc!r}")


def parse_selector(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Parse ``metric{name="value",...}`` strictly; anything else is a ParseError."""
    match = _METRIC.match(text)
    if match is None:
        raise ParseError("expected a metric name")
    metric, pos = match.group(), match.end()
    if text[pos : pos + 1] != "{":
        raise ParseError(f"expected '{{' at {pos}")
    pos += 1
    pairs: list[tuple[str, str]] = []
    if text[pos : pos + 1] != "}":
        while True:
            label = _LABEL.match(text, pos)
            if label is None:
                raise ParseError(f"expected a label name at {pos}")
            pos = label.end()
            if text[pos : pos + 1] != "=" or text[pos + 1 : pos + 2] == "~":
                raise ParseError(f"expected '=' at {pos}")
            value, pos = _parse_string(text, pos + 1)
            pairs.append((label.group(), value))
            if text[pos : pos + 1] == ",":
                pos += 1
                continue
            break
    if text[pos : pos + 1] != "}":
        raise ParseError(f"expected '}}' at {pos}")
    if pos + 1 != len(text):
        raise ParseError(f"trailing text {text[pos + 1 :]!r}")
    return metric, pairs


# --- property tests -------------------------------------------------------------------------


def test_selector_parses_back_to_exactly_the_intended_matchers_for_10000_payloads() -> None:
    examples = 0

    @settings(
        max_examples=10_000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        metric=st.sampled_from(["gpu_utilization_ratio", "namespace:gpu_cost:sum", "_x", "a"]),
        labels=st.dictionaries(
            st.sampled_from(LABEL_NAMES), st.one_of(st.none(), payloads), max_size=4
        ),
    )
    def check(metric: str, labels: dict[str, str | None]) -> None:
        nonlocal examples
        examples += 1
        text = selector(metric, **labels)
        intended = [(k, v) for k, v in labels.items() if v is not None]
        assert parse_selector(text) == (metric, intended)
        assert "\n" not in text
        assert matchers(**labels) == text[len(metric) + 1 : -1]

    check()
    assert examples >= 10_000


@settings(max_examples=2_000, deadline=None, database=None)
@given(payloads)
def test_quote_round_trips_every_payload(payload: str) -> None:
    value, end = _parse_string(quote(payload), 0)
    assert value == payload
    assert end == len(quote(payload))


@settings(max_examples=2_000, deadline=None, database=None)
@given(st.text(max_size=80))
def test_names_that_pass_validation_are_plain_kubernetes_names(value: str) -> None:
    try:
        validate_name(value, "namespace", rule="dns-label")
    except InvalidParameter as exc:
        assert exc.field == "namespace"
    else:
        assert re.fullmatch(r"[a-z0-9-]{1,63}", value)


@settings(max_examples=2_000, deadline=None, database=None)
@given(st.text(max_size=300))
def test_label_values_that_pass_validation_are_printable_and_bounded(value: str) -> None:
    try:
        validate_label_value(value, "model")
    except InvalidParameter as exc:
        assert exc.field == "model"
        assert not value or len(value) > 253 or not value.isprintable()
    else:
        assert 0 < len(value) <= 253 and value.isprintable()
        assert parse_selector(selector("m", model=value)) == ("m", [("model", value)])


# --- examples -------------------------------------------------------------------------------


def test_the_issue_injection_example_is_quoted_into_one_harmless_matcher() -> None:
    text = selector("gpu_allocated", namespace=INJECTION)
    assert text == 'gpu_allocated{namespace="a\\"} or vector(1) #"}'
    assert parse_selector(text) == ("gpu_allocated", [("namespace", INJECTION)])


@pytest.mark.parametrize("rule", ["dns-label", "dns-subdomain", "label-value"])
def test_the_issue_injection_example_is_rejected_by_every_name_rule(rule: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        validate_name(INJECTION, "namespace", rule=rule)  # type: ignore[arg-type]
    assert info.value.field == "namespace"
    assert "namespace" in str(info.value)
    assert "Kubernetes" in info.value.reason


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("default", "dns-label"),
        ("kube-system", "dns-label"),
        ("a", "dns-label"),
        ("x" * 63, "dns-label"),
        ("trainer-7d9f8-abcde", "dns-subdomain"),
        ("gpu-node-1.example.com", "dns-subdomain"),
        ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61, "dns-subdomain"),
        ("ML_Platform.v2", "label-value"),
    ],
)
def test_valid_kubernetes_names_pass_unchanged(value: str, rule: str) -> None:
    assert validate_name(value, "field", rule=rule) == value  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "dns-label"),
        ("Default", "dns-label"),
        ("-lead", "dns-label"),
        ("trail-", "dns-label"),
        ("has.dot", "dns-label"),
        ("x" * 64, "dns-label"),
        ("a..b", "dns-subdomain"),
        ("a_b", "dns-subdomain"),
        ("x" * 254, "dns-subdomain"),
        ("ns\n", "dns-subdomain"),
        ("ns ", "dns-subdomain"),
        ("ünicode", "dns-subdomain"),
        ("_lead", "label-value"),
        ("a/b", "label-value"),
        ("x" * 64, "label-value"),
    ],
)
def test_invalid_kubernetes_names_are_rejected_naming_the_field(value: str, rule: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        validate_name(value, "pod", rule=rule)  # type: ignore[arg-type]
    assert info.value.field == "pod"
    assert str(info.value).startswith("pod: ")


def test_a_non_string_name_is_rejected_not_crashed_on() -> None:
    with pytest.raises(InvalidParameter):
        validate_name(5, "namespace")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", ["NVIDIA A100-SXM4-80GB", "1g.10gb", "GPU-5fa4c1a2-0000-1111-2222-333344445555"]
)
def test_real_model_profile_and_uuid_values_pass(value: str) -> None:
    assert validate_label_value(value, "model") == value


@pytest.mark.parametrize("value", ["", "a\nb", "tab\there", "\x00", "x" * 254, "\ud800"])
def test_empty_unprintable_or_long_label_values_are_rejected(value: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        validate_label_value(value, "mig_profile")
    assert info.value.field == "mig_profile"


def test_label_value_length_bound_is_configurable() -> None:
    assert validate_label_value("abcd", "uuid", max_length=4) == "abcd"
    with pytest.raises(InvalidParameter, match="at most 3"):
        validate_label_value("abcd", "uuid", max_length=3)


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", '"plain"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("\ufffd", '"\\ufffd"'),
        ("\x00", '"\\u0000"'),
        ("\U000e0001", '"\\U000e0001"'),
        ("ü😀", '"ü😀"'),
    ],
)
def test_quote_escapes_what_the_promql_lexer_needs_escaped(value: str, literal: str) -> None:
    assert quote(value) == literal


def test_quote_refuses_lone_surrogates_that_have_no_utf8_form() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        quote("a\udc80")


def test_selector_skips_none_and_keeps_argument_order() -> None:
    assert selector("m", pod="p", namespace=None, node="n") == 'm{pod="p",node="n"}'
    assert selector("m") == "m{}"
    assert matchers(namespace=None) == ""


def test_a_label_may_be_called_metric() -> None:
    assert selector("m", metric="x") == 'm{metric="x"}'


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", 'a"}', "m{x}", "a or b"])
def test_selector_rejects_metric_names_that_are_not_identifiers(name: str) -> None:
    with pytest.raises(ValueError, match="metric name"):
        selector(name)


@pytest.mark.parametrize("name", ["a:b", "1a", "a-b", "a b"])
def test_selector_rejects_label_names_that_are_not_identifiers(name: str) -> None:
    with pytest.raises(ValueError, match="label name"):
        selector("m", **{name: "v"})


def test_selector_rejects_non_string_values() -> None:
    with pytest.raises(TypeError):
        selector("m", gpu=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"), [(1, "1s"), (3600, "3600s"), (86400 * 30, "2592000s")]
)
def test_duration_formats_whole_seconds(seconds: int, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize("seconds", [0, -5, 1.5, True, "60"])
def test_duration_rejects_anything_but_positive_ints(seconds: object) -> None:
    with pytest.raises(ValueError):
        duration(seconds)  # type: ignore[arg-type]
