"""The one values file (`monitoring/values.yaml`): loaded, validated, with optional overrides.

Rules, alerts and dashboards read their thresholds, windows and selectors from a `Values`;
tests build variants (short `for`, short windows) with `load_values(overrides=...)` so that
what they run is the generator's output, not a hand-edited copy.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = Path(__file__).resolve().parent / "values.yaml"

SEVERITIES = ("critical", "warning", "info")

_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}

#: Each alert's own parameters and their kinds, besides `for` and `severity`.
ALERT_PARAMS: dict[str, dict[str, str]] = {
    "GPUHighTemperature": {"threshold_celsius": "number"},
    "GPUHighUtilization": {"threshold_ratio": "ratio"},
    "GPUMIGProfileNearlyExhausted": {"free_ratio_below": "ratio"},
    "GPUDailyCostOverBudget": {},
    "GPUTeamOverBudget": {},
    "GPUExporterDown": {},
    "GPUNodeNotScraped": {"resource_regex": "string"},
    "GPUUnavailable": {},
    "GPUNVMLUnavailable": {},
    "GPUXidError": {"ignored_xids": "ints", "critical_xids": "ints", "window": "duration"},
    "GPUUncorrectableECCErrors": {"window": "duration"},
    "GPURemappedRowsFailed": {},
    "GPUThermalThrottling": {"reasons": "strings", "window": "duration", "active_ratio": "ratio"},
    "GPUPowerThrottling": {"reasons": "strings", "window": "duration", "active_ratio": "ratio"},
    "GPUAllocatedIdle": {},
    "GPUCapacityExhaustionForecast": {"horizon": "duration"},
    "GPUAnalyticsDown": {},
    "GPUAnalyticsQueriesFailing": {"window": "duration"},
}


class ValuesError(ValueError):
    """A values file that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Alert:
    """One alert's settings: how long its condition must hold, its severity, its parameters."""

    name: str
    for_: str
    severity: str
    params: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.params[key]


@dataclass(frozen=True)
class Values:
    """Everything the rules and dashboards are parameterised by."""

    exporter_selector: str
    analytics_selector: str
    team_label: str
    recording_interval: str
    runbook_url: str
    idle_window: str
    idle_threshold: float
    idle_namespace_thresholds: tuple[tuple[str, float], ...]
    cluster_daily_dollars: float | None
    team_daily_dollars: tuple[tuple[str, float], ...]
    default_team_daily_dollars: float | None
    alerts: Mapping[str, Alert]
    source: str = str(DEFAULT_PATH)

    @property
    def recording_interval_seconds(self) -> float:
        return duration_seconds(self.recording_interval)

    def alert(self, name: str) -> Alert:
        return self.alerts[name]


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration such as `1h30m`."""
    return sum(float(n) * _UNIT_S[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", text))


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, mappings key by key, other values replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(
    path: str | Path = DEFAULT_PATH, overrides: Mapping[str, Any] | None = None
) -> Values:
    """Read and validate a values file; `overrides` are merged in first (tests use them)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as error:
        raise ValuesError(f"{p}: cannot read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ValuesError(f"{p}: not valid YAML: {error}") from None
    if overrides:
        data = deep_merge(data or {}, overrides)
    return parse_values(data, str(p))


class _Check:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str, fix: str) -> Any:
        raise ValuesError(f"{self.source}: {where}: {problem}; {fix}")

    def mapping(self, value: Any, where: str, known: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(where, f"{value!r} is not a mapping", f"give the keys {', '.join(known)}")
        for key in value:
            if key not in known:
                self.fail(f"{where}.{key}", "is not a known key", f"use {', '.join(known)}")
        for key in known:
            if key not in value:
                self.fail(f"{where}.{key}", "is missing", "every key of the example is required")
        return value

    def duration(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _DURATION.match(value):
            self.fail(where, f"{value!r} is not a Prometheus duration", "write e.g. 30s, 5m, 1h")
        return str(value)

    def number(self, value: Any, where: str, low: float = 0.0, high: float = math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(where, f"{value!r} is not a number", "give a number")
        if not (low <= value <= high) or not math.isfinite(value):
            self.fail(where, f"{value} is outside [{low}, {high}]", "give a number in range")
        return float(value)

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(where, f"{value!r} is not a non-empty string", "quote it")
        return str(value)

    def label_name(self, value: Any, where: str) -> str:
        name = self.string(value, where)
        if not _LABEL.match(name):
            self.fail(where, f"{name!r} is not a Prometheus label name", "e.g. label_team")
        return name

    def label_value(self, value: Any, where: str) -> str:
        text = self.string(value, where)
        if '"' in text or "\\" in text or "\n" in text:
            self.fail(where, f"{text!r} has quotes, backslashes or newlines", "use a plain name")
        return text


def parse_values(data: Any, source: str = "<values>") -> Values:
    """Validate a loaded values mapping into `Values`."""
    c = _Check(source)
    top = c.mapping(
        data,
        "(top level)",
        (
            "selectors",
            "team_label",
            "recording_interval",
            "runbook_url",
            "idle",
            "budgets",
            "alerts",
        ),
    )
    selectors = c.mapping(top["selectors"], "selectors", ("exporter", "analytics"))
    idle = c.mapping(top["idle"], "idle", ("window", "threshold", "namespace_thresholds"))
    overrides = idle["namespace_thresholds"] or {}
    if not isinstance(overrides, Mapping):
        c.fail("idle.namespace_thresholds", "is not a mapping", "map namespace: threshold")
    budgets = c.mapping(
        top["budgets"],
        "budgets",
        ("cluster_daily_dollars", "team_daily_dollars", "default_team_daily_dollars"),
    )
    teams = budgets["team_daily_dollars"] or {}
    if not isinstance(teams, Mapping):
        c.fail("budgets.team_daily_dollars", "is not a mapping", "map team: dollars per day")
    alerts_raw = top["alerts"]
    if not isinstance(alerts_raw, Mapping):
        c.fail("alerts", "is not a mapping", "one entry per alert name")
    alerts: dict[str, Alert] = {}
    for name in alerts_raw:
        if name not in ALERT_PARAMS:
            c.fail(f"alerts.{name}", "is not a known alert", f"use {', '.join(ALERT_PARAMS)}")
    for name, kinds in ALERT_PARAMS.items():
        where = f"alerts.{name}"
        if name not in alerts_raw:
            c.fail(where, "is missing", "every alert needs its for and severity")
        body = c.mapping(alerts_raw[name], where, ("for", "severity", *kinds))
        severity = body["severity"]
        if severity not in SEVERITIES:
            c.fail(f"{where}.severity", f"{severity!r} is not a severity", "critical|warning|info")
        params = {key: _param(c, body[key], f"{where}.{key}", kind) for key, kind in kinds.items()}
        alerts[name] = Alert(name, c.duration(body["for"], f"{where}.for"), severity, params)

    def optional_dollars(value: Any, where: str) -> float | None:
        return None if value is None else c.number(value, where)

    return Values(
        exporter_selector=c.string(selectors["exporter"], "selectors.exporter"),
        analytics_selector=c.string(selectors["analytics"], "selectors.analytics"),
        team_label=c.label_name(top["team_label"], "team_label"),
        recording_interval=c.duration(top["recording_interval"], "recording_interval"),
        runbook_url=c.string(top["runbook_url"], "runbook_url"),
        idle_window=c.duration(idle["window"], "idle.window"),
        idle_threshold=c.number(idle["threshold"], "idle.threshold", 0.0, 1.0),
        idle_namespace_thresholds=tuple(
            (
                c.label_value(ns, f"idle.namespace_thresholds.{ns}"),
                c.number(value, f"idle.namespace_thresholds.{ns}", 0.0, 1.0),
            )
            for ns, value in overrides.items()
        ),
        cluster_daily_dollars=optional_dollars(
            budgets["cluster_daily_dollars"], "budgets.cluster_daily_dollars"
        ),
        team_daily_dollars=tuple(
            (
                c.label_value(team, f"budgets.team_daily_dollars.{team}"),
                c.number(value, f"budgets.team_daily_dollars.{team}"),
            )
            for team, value in teams.items()
        ),
        default_team_daily_dollars=optional_dollars(
            budgets["default_team_daily_dollars"], "budgets.default_team_daily_dollars"
        ),
        alerts=alerts,
        source=source,
    )


def _param(c: _Check, value: Any, where: str, kind: str) -> Any:
    if kind == "duration":
        return c.duration(value, where)
    if kind == "number":
        return c.number(value, where, -math.inf)
    if kind == "ratio":
        return c.number(value, where, 0.0, 1.0)
    if kind == "string":
        return c.string(value, where)
    if kind in ("ints", "strings"):
        if not isinstance(value, list):
            c.fail(where, f"{value!r} is not a list", "write [a, b, c]")
        if kind == "ints":
            for item in value:
                if isinstance(item, bool) or not isinstance(item, int):
                    c.fail(where, f"{item!r} is not an integer", "XID codes are integers")
            return tuple(value)
        return tuple(c.label_value(item, where) for item in value)
    raise AssertionError(kind)
