"""Which metric names a PromQL expression reads, and which names exist to be read.

Rules and dashboards may only use metrics that something publishes: the exporter's catalogue,
the recording rules, the analytics service's metrics, and the few series Prometheus itself and
kube-state-metrics provide. Tests check every expression against `known_metric_names()`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml

#: Series that neither our exporter nor our rules publish, with who does.
EXTERNAL_METRICS: dict[str, str] = {
    "up": "Prometheus (one per scrape target)",
    "ALERTS": "Prometheus (alert states)",
    "kube_node_labels": "kube-state-metrics (node labels, for pricing overrides)",
    "kube_node_status_allocatable": "kube-state-metrics (allocatable GPUs per node)",
}

_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and labels left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"#[^\n]*", " ", text)  # comments (strings are gone, so # starts one)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-zA-Z_$]+", " ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        token = match.group(0)
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before in ".$":
            continue  # an exponent (1e9), a variable ($node)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


def rule_file_names(paths: Iterable[Path]) -> set[str]:
    """The series recorded by the rule files."""
    names: set[str] = set()
    for path in paths:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        for group in doc.get("groups", []):
            names.update(rule["record"] for rule in group.get("rules", []) if "record" in rule)
    return names


def known_metric_names(rule_files: Iterable[Path]) -> set[str]:
    """Every name rules and dashboards may use: catalogue, records, analytics, external."""
    from analytics.telemetry import ANALYTICS_METRIC_NAMES
    from exporter.catalogue import CATALOGUE

    names = set(CATALOGUE) | rule_file_names(rule_files) | set(EXTERNAL_METRICS)
    for name in ANALYTICS_METRIC_NAMES:
        names.add(name)
        if name.endswith("_seconds"):  # histograms: their series
            names.update(name + suffix for suffix in _HISTOGRAM_SUFFIXES)
    return names


_GROUP_START = re.compile(r"(?:by|without|on|ignoring|group_left|group_right)\s*\(")


def with_matcher(expr: str, label: str, matcher: str) -> str:
    """`expr` with `matcher` (e.g. `cluster=~"$cluster"`) added to every metric selector
    that has no matcher on `label` yet; strings, ranges, comments and grouping lists are left
    alone. Dashboards use it so that every query honours the cluster variable."""
    out: list[str] = []
    i, n = 0, len(expr)

    def skip_string(j: int) -> int:
        quote = expr[j]
        j += 1
        while j < n and expr[j] != quote:
            j += 2 if expr[j] == "\\" and quote != "`" else 1
        return j + 1

    def closing(j: int, close: str) -> int:
        while j < n and expr[j] != close:
            j = skip_string(j) if expr[j] in "\"'`" else j + 1
        return j + 1

    while i < n:
        ch = expr[i]
        prev = expr[i - 1] if i else " "
        if ch in "\"'`":
            j = skip_string(i)
        elif ch == "[":
            j = closing(i, "]")
        elif ch == "#":
            j = expr.find("\n", i)
            j = n if j < 0 else j
        elif (m := _GROUP_START.match(expr, i)) and not (prev.isalnum() or prev in "_:"):
            j = closing(m.end(), ")")
        elif (m := _IDENT.match(expr, i)) and not (prev.isalnum() or prev in "_:.$"):
            j = m.end()
            rest = expr[j:].lstrip()
            token = m.group(0)
            aggregation = re.match(r"(by|without)\s*\(", rest)
            if rest.startswith("(") or aggregation or token.lower() in _KEYWORDS:
                out.append(token)
                i = j
                continue
            k = j + (len(expr[j:]) - len(rest))
            if rest.startswith("{"):
                end = closing(k + 1, "}")
                inner = expr[k + 1 : end - 1]
                if re.search(
                    rf"(?<![\w]){re.escape(label)}\s*(=|!=|=~|!~)", _STRING.sub("", inner)
                ):
                    out.append(expr[i:end])
                else:
                    sep = ", " if inner.strip() else ""
                    out.append(f"{token}{{{matcher}{sep}{inner}}}")
                i = end
                continue
            out.append(f"{token}{{{matcher}}}")
            i = j
            continue
        else:
            j = i + 1
        out.append(expr[i:j])
        i = j
    return "".join(out)
