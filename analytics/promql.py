"""Validation and quoting for every request value that reaches PromQL.

This module is the only place where text from a request becomes part of a query. Values are
validated first (Kubernetes name rules, or printable and bounded), then written as PromQL string
literals by :func:`quote`; metric and label *names* never come from requests and must be plain
identifiers. Nothing else in the service builds matchers by string formatting.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = [
    "InvalidParameter",
    "duration",
    "matchers",
    "quote",
    "selector",
    "validate_label_value",
    "validate_name",
]

NameRule = Literal["dns-label", "dns-subdomain", "label-value"]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# A Kubernetes label *value* (for example the team label on a pod): empty is not useful here.
_K8S_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

_RULES: dict[str, tuple[re.Pattern[str], int, str]] = {
    "dns-label": (
        _DNS_LABEL,
        63,
        "must be a Kubernetes DNS-1123 label: at most 63 lowercase letters, digits and '-', "
        "starting and ending with a letter or digit",
    ),
    "dns-subdomain": (
        _DNS_SUBDOMAIN,
        253,
        "must be a Kubernetes DNS-1123 subdomain: at most 253 characters, lowercase letters, "
        "digits, '-' and '.', each dot-separated part starting and ending with a letter or digit",
    ),
    "label-value": (
        _K8S_LABEL_VALUE,
        63,
        "must be a Kubernetes label value: at most 63 letters, digits, '-', '_' and '.', "
        "starting and ending with a letter or digit",
    ),
}

# PromQL's lexer accepts these short escapes; everything else unprintable becomes \u or \U.
_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class InvalidParameter(ValueError):
    """A request value that must not reach PromQL; the API answers 400 INVALID_PARAMETER."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def validate_name(value: str, field: str, *, rule: NameRule = "dns-subdomain") -> str:
    """Return ``value`` if it is a valid Kubernetes name, else raise :class:`InvalidParameter`.

    Namespaces are DNS-1123 labels (``rule="dns-label"``); pod and node names are DNS-1123
    subdomains (the default, which also admits every label); team values come from pod labels
    (``rule="label-value"``). Rejecting early turns injection attempts into a 400 instead of
    an empty (or worse, widened) query.
    """
    pattern, max_length, reason = _RULES[rule]
    if not isinstance(value, str):
        raise InvalidParameter(field, f"{reason} (got {type(value).__name__})")
    if not value:
        raise InvalidParameter(field, f"{reason} (got an empty value)")
    if len(value) > max_length:
        raise InvalidParameter(field, f"{reason} (got {len(value)} characters)")
    if pattern.fullmatch(value) is None:
        raise InvalidParameter(field, reason)
    return value


def validate_label_value(value: str, field: str, max_length: int = 253) -> str:
    """Return ``value`` if it is non-empty, printable and at most ``max_length`` characters.

    For values with no Kubernetes grammar (GPU model names, MIG profiles, UUIDs). Quotes and
    backslashes are allowed, since :func:`quote` escapes them; control characters, lone
    surrogates and other unprintable code points are not, as no GPU or profile name has them.
    """
    if not isinstance(value, str):
        raise InvalidParameter(field, f"must be a string (got {type(value).__name__})")
    if not value:
        raise InvalidParameter(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidParameter(field, f"must be at most {max_length} characters (got {len(value)})")
    if not value.isprintable():
        raise InvalidParameter(field, "must contain only printable characters")
    return value


def quote(value: str) -> str:
    """Return ``value`` as a PromQL double-quoted string literal that parses back to itself.

    Escapes backslash, double quote and line breaks, and writes every unprintable code point
    (and U+FFFD, which PromQL's lexer rejects as "invalid UTF-8 rune" even when it is valid)
    as a ``\\u``/``\\U`` escape. Lone surrogates have no UTF-8 form and raise ``ValueError``.
    """
    if not isinstance(value, str):
        raise TypeError(f"quote() takes a str, not {type(value).__name__}")
    out = ['"']
    for char in value:
        escaped = _SHORT_ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
        elif char.isprintable() and char != "\ufffd":
            out.append(char)
        else:
            code = ord(char)
            if 0xD800 <= code < 0xE000:
                raise ValueError(f"lone surrogate U+{code:04X} cannot be sent to Prometheus")
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def matchers(**labels: str | None) -> str:
    """Return the inside of ``{...}``: ``k="v",...`` equality matchers; ``None`` values skipped.

    Label names must be identifiers (they come from code, not requests); values always go
    through :func:`quote`. Useful on its own for building joins and ``by`` clauses.
    """
    parts = []
    for name, value in labels.items():
        if value is None:
            continue
        if _LABEL_NAME.fullmatch(name) is None:
            raise ValueError(f"invalid label name {name!r}")
        if not isinstance(value, str):
            raise TypeError(f"label {name} takes a str value, not {type(value).__name__}")
        parts.append(f"{name}={quote(value)}")
    return ",".join(parts)


def selector(metric: str, /, **labels: str | None) -> str:
    """Return ``metric{k="v",...}``, the one way to filter a metric by request values.

    ``metric`` must be a plain metric name (a catalogue or recording-rule name), so the
    result is always a single vector selector with equality matchers and nothing more.
    """
    if not isinstance(metric, str) or _METRIC_NAME.fullmatch(metric) is None:
        raise ValueError(f"invalid metric name {metric!r}")
    return f"{metric}{{{matchers(**labels)}}}"


def duration(seconds: int) -> str:
    """Return a PromQL duration (``"3600s"``) for range vectors and ``offset``.

    Only positive whole seconds: a float or a zero window is a bug upstream, not something to
    round silently.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
        raise ValueError(f"duration needs a positive whole number of seconds, got {seconds!r}")
    return f"{seconds}s"
