"""Prometheus text exposition (format 0.0.4), rendered straight from the cycle's samples.

Byte-for-byte what prometheus_client's `generate_latest` writes for the same families (a test
holds it to that), at a fraction of the cost: label names come from the catalogue and are valid
by construction, so only label values are escaped, and only when they need it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import cache

from prometheus_client.utils import floatToGoString

from exporter.catalogue import MetricSpec

Sample = tuple[MetricSpec, tuple[str, ...], float]


def _escape_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


@cache
def _label_order(labels: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """Positions and names of a label set in sorted name order, as generate_latest sorts them."""
    return tuple(
        (index, labels[index]) for index in sorted(range(len(labels)), key=labels.__getitem__)
    )


@cache
def _header(spec: MetricSpec) -> str:
    return f"# HELP {spec.name} {_escape_help(spec.help)}\n# TYPE {spec.name} {spec.type}\n"


def render(samples: Iterable[Sample]) -> tuple[bytes, int]:
    """The exposition of these samples, one family per metric, in order of first appearance.

    Duplicate series (same name and labels) and non-finite values are dropped rather than
    failing the scrape; returns the body and how many samples were dropped.
    """
    lines_by_metric: dict[str, list[str]] = {}
    specs: dict[str, MetricSpec] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    dropped = 0
    for spec, label_values, value in samples:
        key = (spec.name, label_values)
        if key in seen or not math.isfinite(value):
            dropped += 1
            continue
        seen.add(key)
        lines = lines_by_metric.get(spec.name)
        if lines is None:
            lines = lines_by_metric[spec.name] = []
            specs[spec.name] = spec
        if label_values:
            pairs = ",".join(
                f'{name}="{_escape_value(label_values[index])}"'
                for index, name in _label_order(spec.labels)
            )
            lines.append(f"{spec.name}{{{pairs}}} {floatToGoString(value)}\n")
        else:
            lines.append(f"{spec.name} {floatToGoString(value)}\n")
    out = []
    for name, lines in lines_by_metric.items():
        out.append(_header(specs[name]))
        out.extend(lines)
    return "".join(out).encode(), dropped
