"""Configuration of ``gpu-analytics``: a YAML file, then ``GPU_ANALYTICS_*`` environment overrides.

Everything is checked at start-up, so a typo stops the service with one line naming the file, the
key path and the fix, instead of surfacing later as a wrong report. Secrets (API tokens, the
Prometheus bearer token or password) are read from files here too: a configured secret that cannot
be read is an error, never a silent "no auth" (fail closed).

Keys (all optional; defaults in brackets)::

    prometheus:
      url: http://127.0.0.1:9090        # [http://127.0.0.1:9090]
      timeout_seconds: 10               # per HTTP request [10]
      retries: 2                        # extra attempts on connection errors / 5xx [2]
      bearer_token_file: /var/run/...   # or username + password_file (basic auth), not both
      username: reader
      password_file: /etc/...
    pricing_file: pricing.yaml          # relative paths are relative to this file
    team_label: label_team              # pod label that names the team [label_team]
    team_source: pod_label              # pod_label (on the GPU series) | kube_pod_labels
                                        # (kube-state-metrics) [pod_label; kube_pod_labels
                                        # for source dcgm, which has no pod labels]
    source: exporter                    # exporter | dcgm [exporter]
    honor_labels: true                  # false: pod labels arrive as exported_namespace, ...
    exporter_up_selector: up{job=~".*gpu.*"}   # health: the exporter targets [by source]
    listen: 0.0.0.0:8080                # [0.0.0.0:8080]
    api_tokens_file: tokens.txt         # bearer tokens for /api/v1: one per line, a YAML list
                                        # of strings, or of {token, teams, namespaces} mappings
                                        # (team-scoped tokens, see docs/security.md)
    refresh_seconds: 60                 # how often cached results are recomputed [60]
    rules_interval_seconds: 60          # evaluation interval of the cost recording rules [60]
    forecast_refresh_seconds: 900       # how often the forecast models are refitted [900]
    idle:                               # allocated-but-idle GPUs [the rules' definition, from
                                        # monitoring/values.yaml: 0.05, 30m, its namespaces]
      threshold: 0.05                   # activity (0-1) under which a held device is idle
      window_minutes: 30                # how long it must stay under to count
      namespaces: {batch: 0.02}         # per-namespace thresholds
    rightsize_headroom: 0.2             # spare memory/compute left on a smaller MIG profile [0.2]
    limits:                             # what keeps load on the service and Prometheus bounded
      requests_per_minute: 1000         # /api/v1 requests per client address without a token,
                                        # per minute (seed 001 section 8); 0: no limit [1000]
      token_requests_per_minute: 5000   # per bearer token, per minute; 0: no limit [5000]
      max_concurrent_queries: 8         # Prometheus queries in flight from this process [8]
      queue_timeout_seconds: 5          # wait this long for a free query slot, then 503 [5]
      cache_ttl_seconds: 30             # identical report requests share one result this long;
                                        # 0: only concurrent ones share it [30]
      cache_max_entries: 256            # distinct report results kept [256]

Upper bounds keep a typo from unbounding the service: ``prometheus.timeout_seconds`` at most
300, ``prometheus.retries`` at most 10, ``limits.queue_timeout_seconds`` at most 60,
``limits.cache_ttl_seconds`` at most 3600.

Every scalar key has an environment override named after its path: ``GPU_ANALYTICS_`` plus the
upper-cased path joined by ``_``, e.g. ``GPU_ANALYTICS_PROMETHEUS_URL``, ``GPU_ANALYTICS_LISTEN``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from analytics.idle import IdleSettings, rule_settings
from analytics.scope import Scope
from analytics.sources import (
    SOURCES,
    TEAM_SOURCES,
    RuleInputs,
    Source,
    TeamSource,
    default_team_source,
    rule_inputs,
)

ENV_PREFIX = "GPU_ANALYTICS_"
DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:9090"
DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_TEAM_LABEL = "label_team"


# The health check's default selector per source: our exporter's scrape job is named after the
# chart ("gpu-exporter"); NVIDIA's is "nvidia-dcgm-exporter" / "dcgm-exporter", which has no "gpu".
DEFAULT_UP_SELECTORS: dict[str, str] = {
    "exporter": 'up{job=~".*gpu.*"}',
    "dcgm": 'up{job=~".*dcgm.*"}',
}

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: what fits in a header


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming where, what and the fix."""

    def __init__(self, source: str, key: str, problem: str, fix: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        self.fix = fix
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}; {fix}")


@dataclass(frozen=True)
class PrometheusConfig:
    """Where the analytics reads its data, and how it authenticates to Prometheus."""

    url: str = DEFAULT_PROMETHEUS_URL
    timeout_seconds: float = 10.0
    retries: int = 2
    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    # The secrets themselves, read at load time so that an unreadable file fails start-up.
    bearer_token: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


MAX_PROMETHEUS_TIMEOUT_S = 300.0
MAX_PROMETHEUS_RETRIES = 10
MAX_QUEUE_TIMEOUT_S = 60.0
MAX_CACHE_TTL_S = 3600.0


@dataclass(frozen=True)
class Limits:
    """Rate limits, the cap on Prometheus queries in flight, and the report cache."""

    #: /api/v1 requests per minute per client address without a valid token; 0: unlimited.
    requests_per_minute: int = 1000
    #: /api/v1 requests per minute per bearer token; 0: unlimited.
    token_requests_per_minute: int = 5000
    #: Prometheus queries in flight from this process (requests and background refreshes).
    max_concurrent_queries: int = 8
    #: How long a query waits for a free slot before the request answers 503.
    queue_timeout_seconds: float = 5.0
    #: How long a report result is reused for identical requests; 0: only concurrent ones.
    cache_ttl_seconds: float = 30.0
    #: Distinct report results kept (least recently stored dropped first).
    cache_max_entries: int = 256


@dataclass(frozen=True)
class Config:
    """The whole service configuration (immutable; build it with :func:`load_config`)."""

    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    pricing_file: Path | None = None
    team_label: str = DEFAULT_TEAM_LABEL
    source: Source = "exporter"
    #: None: the source's default (pod labels for our exporter, kube_pod_labels for DCGM).
    team_source: TeamSource | None = None
    honor_labels: bool = True
    exporter_up_selector: str | None = None
    listen: str = DEFAULT_LISTEN
    api_tokens_file: Path | None = None
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    #: Tokens bound to teams or namespaces (a token not listed here sees everything).
    api_token_scopes: Mapping[str, Scope] = field(default_factory=dict, repr=False)
    limits: Limits = field(default_factory=Limits)
    refresh_seconds: float = 60.0
    #: The cost rules' evaluation interval: each recorded sample stands for this long.
    rules_interval_seconds: float = 60.0
    #: Forecast models are refitted when older than this (never per request).
    forecast_refresh_seconds: float = 900.0
    #: Default: the rules' idle definition (monitoring/values.yaml).
    idle: IdleSettings = field(default_factory=rule_settings)
    #: Right-sizing suggestions keep this much spare memory and compute on the smaller profile.
    rightsize_headroom: float = 0.2
    # Where the configuration came from, for messages ("<defaults>" when built in code).
    origin: str = "<defaults>"

    @property
    def label_prefix(self) -> str:
        """Prefix of the pod attribution labels: ``exported_`` when Prometheus renamed them.

        With ``honor_labels: false`` in the scrape config, Prometheus renames the target's own
        ``namespace``/``pod`` labels to ``exported_namespace``/``exported_pod`` because the
        scrape adds the exporter pod's namespace and pod under the plain names.
        """
        return "" if self.honor_labels else "exported_"

    @property
    def teams_from(self) -> TeamSource:
        """Where the team label comes from, with the source's default filled in."""
        return self.team_source or default_team_source(self.source)

    @property
    def rules_interval(self) -> str:
        """The cost rules' evaluation interval as a Prometheus duration (`1m`, `30s`)."""
        seconds = int(self.rules_interval_seconds)
        return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"

    def rule_inputs(self) -> RuleInputs:
        """Where the pricing rules read devices, allocations and activity for this source."""
        return rule_inputs(
            self.source,
            interval=self.rules_interval,
            label_prefix=self.label_prefix,
            team_label=self.team_label,
            team_source=self.teams_from,
        )

    @property
    def up_selector(self) -> str:
        """The PromQL that selects the GPU exporters' ``up`` series for the health check."""
        return self.exporter_up_selector or DEFAULT_UP_SELECTORS[self.source]

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` as (host, port)."""
        return parse_listen(self.listen)

    @property
    def auth_enabled(self) -> bool:
        """Whether ``/api/v1`` requires a bearer token."""
        return bool(self.api_tokens) or self.api_tokens_file is not None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (all interfaces) as (host, port); ValueError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


# --- loading ---------------------------------------------------------------------------------


class _Reader:
    """Checks one mapping level against its known keys and converts values, naming key paths."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(self.source, key, problem, fix)

    def mapping(self, value: Any, key: str, known: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(
                key or "(top level)",
                f"expected a mapping, got {_describe(value)}",
                f"write it as 'key: value' lines ({', '.join(known)})",
            )
        for name in value:
            if name not in known:
                path = _join(key, str(name))
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else "remove it"
                raise self.fail(path, "unknown key", f"{hint} (known keys: {', '.join(known)})")
        return dict(value)


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _number(r: _Reader, key: str, value: Any, *, minimum: float, integer: bool = False) -> Any:
    """A number >= minimum (> 0 when minimum is 0 and not integer); strings from env allowed."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise r.fail(key, f"expected {kind}, got {value!r}", "write digits, e.g. 10") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise r.fail(key, f"expected {kind}, got {_describe(value)}", "write digits, e.g. 10")
    if integer and not isinstance(value, int):
        raise r.fail(key, f"expected {kind}, got {value!r}", "drop the fraction, e.g. 2")
    if not math.isfinite(value) or value < minimum or (not integer and minimum == 0 and value == 0):
        bound = f">= {minimum:g}" if integer else f"> {minimum:g}"
        raise r.fail(key, f"must be {bound}, got {value!r}", f"set a value {bound}")
    return value


def _string(r: _Reader, key: str, value: Any, fix: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
        raise r.fail(key, f"expected a non-empty string, got {_describe(value)}", fix)
    return str(value)


def _boolean(r: _Reader, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.strip().lower() in {"true", "1", "yes"}
    raise r.fail(key, f"expected true or false, got {_describe(value)}", "write true or false")


def _path(r: _Reader, key: str, value: Any) -> Path:
    text = _string(r, key, value, "give a file path")
    path = Path(text).expanduser()
    return path if path.is_absolute() else r.base_dir / path


def _url(r: _Reader, key: str, value: Any) -> str:
    text = _string(r, key, value, "give Prometheus' base URL, e.g. http://prometheus:9090")
    fix = "give Prometheus' base URL with scheme and host, e.g. http://prometheus:9090"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise r.fail(key, f"{text!r} is not a valid URL ({exc})", fix) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.fail(key, f"{text!r} is not an http(s) URL", fix)
    if parts.query or parts.fragment:
        raise r.fail(key, f"{text!r} has a query or fragment", fix)
    if parts.username or parts.password:
        raise r.fail(
            key,
            "credentials in the URL would end up in logs",
            "use prometheus.username and prometheus.password_file instead",
        )
    return text.rstrip("/")


def _read_secret(r: _Reader, key: str, path: Path) -> str:
    """The stripped content of a secret file; unreadable or empty is an error (fail closed)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise r.fail(
            key, f"cannot read {path}: {reason}", "mount the file or fix the path"
        ) from None
    if not text:
        raise r.fail(key, f"{path} is empty", "put the secret in the file")
    return text


def read_api_tokens(path: Path, *, source: str = "<api_tokens_file>") -> tuple[str, ...]:
    """The bearer tokens in ``path``: one per line, a YAML list of strings or of mappings.

    Blank lines and ``#`` comments are skipped. A file that cannot be read or holds no token is a
    :class:`ConfigError`: with tokens configured the API must never fall open.
    """
    return tuple(read_api_token_file(path, source=source))


_TOKEN_KEYS = ("token", "teams", "namespaces")


def read_api_token_file(path: Path, *, source: str = "<api_tokens_file>") -> dict[str, Scope]:
    """Every token in ``path`` with its scope (unrestricted for plain tokens), in file order.

    Formats: one token per line; a YAML list of strings; or a YAML list whose items may also be
    mappings ``{token: ..., teams: [...], namespaces: [...]}``, a token that sees only those
    teams' and namespaces' pods. A mapping that names ``teams`` or ``namespaces`` must list at
    least one value (an empty list would read as "everything"), values must be a team label
    value and a namespace name, and one token cannot appear twice with different scopes.
    """
    r = _Reader(source, path.parent)
    key = "api_tokens_file"
    text = _read_secret(r, key, path)
    entries: list[tuple[str, Scope]] = []
    loaded: Any = None
    first = next(line.strip() for line in text.splitlines() if line.strip())
    if first.startswith(("-", "[")):
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError:
            loaded = None
    if isinstance(loaded, list):
        for index, item in enumerate(loaded):
            where = f"{key}[{index}]"
            if isinstance(item, Mapping):
                entries.append(_scoped_token(r, where, path, item))
            elif isinstance(item, str):
                entries.append((item.strip(), Scope()))
            else:
                raise r.fail(
                    where,
                    f"{path}: token {index} is {type(item).__name__}, not a string or mapping",
                    "quote tokens that YAML would read as numbers or booleans",
                )
    else:
        entries = [
            (line.strip(), Scope())
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    entries = [(token, scope) for token, scope in entries if token]
    if not entries:
        raise r.fail(
            key,
            f"{path} holds no token",
            "add one token per line, or remove api_tokens_file to turn authentication off",
        )
    out: dict[str, Scope] = {}
    for index, (token, scope) in enumerate(entries):
        if not _TOKEN.match(token):
            raise r.fail(
                key,
                f"{path}: token {index + 1} contains spaces or non-ASCII characters",
                "use printable ASCII tokens, e.g. from `openssl rand -hex 32`",
            )
        if out.get(token, scope) != scope:
            raise r.fail(
                key,
                f"{path}: token {index + 1} is listed twice with different scopes",
                "list each token once",
            )
        out[token] = scope
    return out


def _scoped_token(r: _Reader, where: str, path: Path, item: Mapping[Any, Any]) -> tuple[str, Scope]:
    """One ``{token, teams, namespaces}`` entry of the tokens file."""
    from analytics.promql import InvalidParameter, NameRule, validate_name

    for name in item:
        if name not in _TOKEN_KEYS:
            raise r.fail(f"{where}.{name}", f"{path}: unknown key", f"use {', '.join(_TOKEN_KEYS)}")
    token = item.get("token")
    if not isinstance(token, str) or not token.strip():
        raise r.fail(
            f"{where}.token", f"{path}: missing or not a string", "give the token as a string"
        )
    values: dict[str, frozenset[str]] = {}
    rules: tuple[tuple[str, NameRule], ...] = (
        ("teams", "label-value"),
        ("namespaces", "dns-label"),
    )
    for name, rule in rules:
        if name not in item:
            values[name] = frozenset()
            continue
        raw = item[name]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise r.fail(
                f"{where}.{name}",
                f"{path}: expected a non-empty list, got {_describe(raw)}",
                f"list at least one, or drop '{name}'",
            )
        for value in raw:
            try:
                validate_name(value, name, rule=rule)
            except InvalidParameter as exc:
                raise r.fail(
                    f"{where}.{name}", f"{path}: {value!r} {exc.reason}", "fix it"
                ) from None
        values[name] = frozenset(raw)
    return token.strip(), Scope(teams=values["teams"], namespaces=values["namespaces"])


_TOP_KEYS = (
    "prometheus",
    "pricing_file",
    "team_label",
    "team_source",
    "source",
    "honor_labels",
    "exporter_up_selector",
    "listen",
    "api_tokens_file",
    "refresh_seconds",
    "rules_interval_seconds",
    "idle",
    "rightsize_headroom",
    "forecast_refresh_seconds",
    "limits",
)
_PROMETHEUS_KEYS = (
    "url",
    "timeout_seconds",
    "retries",
    "bearer_token_file",
    "username",
    "password_file",
)
_IDLE_KEYS = ("threshold", "window_minutes", "namespaces")
_LIMITS_KEYS = (
    "requests_per_minute",
    "token_requests_per_minute",
    "max_concurrent_queries",
    "queue_timeout_seconds",
    "cache_ttl_seconds",
    "cache_max_entries",
)
_SECTIONS = {"prometheus": _PROMETHEUS_KEYS, "idle": _IDLE_KEYS, "limits": _LIMITS_KEYS}


def _env_name(path: str) -> str:
    return ENV_PREFIX + path.replace(".", "_").upper()


#: Every environment override, by key path.
ENV_OVERRIDES: dict[str, str] = {
    path: _env_name(path)
    for path in [f"prometheus.{k}" for k in _PROMETHEUS_KEYS]
    + ["idle.threshold", "idle.window_minutes"]
    + [f"limits.{k}" for k in _LIMITS_KEYS]
    + [k for k in _TOP_KEYS if k not in _SECTIONS]
}


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read the YAML file at ``path`` (none: defaults), apply ``GPU_ANALYTICS_*`` overrides.

    Raises :class:`ConfigError` naming the file (or the environment variable), the key path and
    the fix for anything unreadable, unknown, mistyped or inconsistent.
    """
    environ = os.environ if env is None else env
    raw: dict[str, Any] = {}
    origin = "<defaults>"
    base_dir = Path.cwd()
    if path is not None:
        file = Path(path)
        origin = str(file)
        base_dir = file.resolve().parent
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                origin, "", f"cannot read the file: {reason}", "fix --config"
            ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(
                origin, "", f"not valid YAML{where}: {problem}", "fix the YAML syntax"
            ) from None
        file_reader = _Reader(origin, base_dir)
        raw = file_reader.mapping(loaded, "", _TOP_KEYS)
        for section, keys in _SECTIONS.items():
            raw[section] = file_reader.mapping(raw.get(section), section, keys)
    else:
        raw.update({section: {} for section in _SECTIONS})

    # Environment overrides: each value remembers where it came from for error messages.
    sources: dict[str, _Reader] = {}
    file_reader = _Reader(origin, base_dir)
    for key_path, var in ENV_OVERRIDES.items():
        if var in environ:
            section, _, name = key_path.rpartition(".")
            target = raw[section] if section else raw
            target[name or key_path] = environ[var]
            sources[key_path] = _Reader(f"environment variable {var}", Path.cwd())

    def reader(key_path: str) -> _Reader:
        return sources.get(key_path, file_reader)

    def get(key_path: str, convert: Callable[[_Reader, str, Any], Any], default: Any) -> Any:
        section, _, name = key_path.rpartition(".")
        mapping = raw[section] if section else raw
        if mapping.get(name) is None:
            return default
        return convert(reader(key_path), key_path, mapping[name])

    prometheus = _load_prometheus(get, reader)

    team_label = get(
        "team_label",
        lambda r, k, v: _label_name(r, k, v),
        DEFAULT_TEAM_LABEL,
    )

    def source_value(r: _Reader, k: str, v: Any) -> str:
        if v not in SOURCES:
            raise r.fail(k, f"unknown source {v!r}", f"choose one of: {', '.join(SOURCES)}")
        return str(v)

    source = get("source", source_value, "exporter")

    def team_source_value(r: _Reader, k: str, v: Any) -> str:
        if v not in TEAM_SOURCES:
            raise r.fail(
                k, f"unknown team source {v!r}", f"choose one of: {', '.join(TEAM_SOURCES)}"
            )
        return str(v)

    team_source = get("team_source", team_source_value, None)

    def listen_value(r: _Reader, k: str, v: Any) -> str:
        text = _string(r, k, v, "write HOST:PORT, e.g. 0.0.0.0:8080")
        try:
            parse_listen(text)
        except ValueError as exc:
            raise r.fail(k, str(exc), "write HOST:PORT, e.g. 0.0.0.0:8080 or :8080") from None
        return text

    listen = get("listen", listen_value, DEFAULT_LISTEN)
    rules_idle = rule_settings()
    api_tokens_file = get("api_tokens_file", _path, None)
    api_tokens: tuple[str, ...] = ()
    token_scopes: dict[str, Scope] = {}
    if api_tokens_file is not None:
        scopes = read_api_token_file(api_tokens_file, source=reader("api_tokens_file").source)
        api_tokens = tuple(scopes)
        token_scopes = {token: scope for token, scope in scopes.items() if scope.restricted}

    return Config(
        prometheus=prometheus,
        pricing_file=get("pricing_file", _path, None),
        team_label=team_label,
        team_source=team_source,
        source=source,
        honor_labels=get("honor_labels", _boolean, True),
        exporter_up_selector=get(
            "exporter_up_selector",
            lambda r, k, v: _string(r, k, v, 'write a PromQL selector, e.g. up{job="gpu"}'),
            None,
        ),
        listen=listen,
        api_tokens_file=api_tokens_file,
        api_tokens=api_tokens,
        api_token_scopes=token_scopes,
        limits=_load_limits(get),
        refresh_seconds=float(get("refresh_seconds", _positive, 60.0)),
        rules_interval_seconds=float(get("rules_interval_seconds", _positive, 60.0)),
        rightsize_headroom=float(get("rightsize_headroom", _fraction, 0.2)),
        forecast_refresh_seconds=float(get("forecast_refresh_seconds", _positive, 900.0)),
        idle=IdleSettings(
            threshold=float(get("idle.threshold", _fraction, rules_idle.threshold)),
            window_seconds=int(
                60 * get("idle.window_minutes", _positive, rules_idle.window_seconds / 60)
            ),
            namespace_thresholds=get(
                "idle.namespaces", _namespace_thresholds, dict(rules_idle.namespace_thresholds)
            ),
        ),
        origin=origin,
    )


def _fraction(r: _Reader, key: str, value: Any) -> float:
    number = float(_number(r, key, value, minimum=0))
    if number > 1:
        raise r.fail(key, f"must be a fraction of 1, got {value!r}", "write e.g. 0.05 for 5%")
    return number


def _namespace_thresholds(r: _Reader, key: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise r.fail(key, f"expected a mapping, got {_describe(value)}", "write {batch: 0.02}")
    out: dict[str, float] = {}
    for name, threshold in value.items():
        if not isinstance(name, str) or not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name
        ):
            raise r.fail(f"{key}.{name}", "is not a namespace name", "use the namespace's name")
        out[name] = _fraction(r, f"{key}.{name}", threshold)
    return out


def _positive(r: _Reader, key: str, value: Any) -> float:
    return float(_number(r, key, value, minimum=0))


def _at_most(r: _Reader, key: str, value: Any, maximum: float) -> Any:
    """``value`` (already converted) if it is at most ``maximum``, else a ConfigError."""
    if value > maximum:
        raise r.fail(key, f"must be at most {maximum:g}, got {value!r}", f"set {maximum:g} or less")
    return value


def _load_limits(get: Callable[[str, Callable[[_Reader, str, Any], Any], Any], Any]) -> Limits:
    """The ``limits`` section: rate limits, the Prometheus query cap and the report cache."""
    defaults = Limits()

    def count(minimum: int) -> Callable[[_Reader, str, Any], int]:
        return lambda r, k, v: int(_number(r, k, v, minimum=minimum, integer=True))

    def seconds(maximum: float, zero: bool) -> Callable[[_Reader, str, Any], float]:
        def convert(r: _Reader, k: str, v: Any) -> float:
            if zero and not isinstance(v, bool) and v in (0, "0", "0.0"):
                return 0.0
            return float(_at_most(r, k, _positive(r, k, v), maximum))

        return convert

    return Limits(
        requests_per_minute=get(
            "limits.requests_per_minute", count(0), defaults.requests_per_minute
        ),
        token_requests_per_minute=get(
            "limits.token_requests_per_minute", count(0), defaults.token_requests_per_minute
        ),
        max_concurrent_queries=get(
            "limits.max_concurrent_queries", count(1), defaults.max_concurrent_queries
        ),
        queue_timeout_seconds=get(
            "limits.queue_timeout_seconds",
            seconds(MAX_QUEUE_TIMEOUT_S, zero=False),
            defaults.queue_timeout_seconds,
        ),
        cache_ttl_seconds=get(
            "limits.cache_ttl_seconds",
            seconds(MAX_CACHE_TTL_S, zero=True),
            defaults.cache_ttl_seconds,
        ),
        cache_max_entries=get("limits.cache_max_entries", count(1), defaults.cache_max_entries),
    )


def _label_name(r: _Reader, key: str, value: Any) -> str:
    text = _string(r, key, value, "name a Prometheus label, e.g. label_team")
    if not _LABEL_NAME.match(text):
        raise r.fail(
            key,
            f"{text!r} is not a Prometheus label name",
            "use letters, digits and underscores, e.g. label_team",
        )
    return text


def _load_prometheus(
    get: Callable[[str, Callable[[_Reader, str, Any], Any], Any], Any],
    reader: Callable[[str], _Reader],
) -> PrometheusConfig:
    url = get("prometheus.url", _url, DEFAULT_PROMETHEUS_URL)
    timeout = float(
        get(
            "prometheus.timeout_seconds",
            lambda r, k, v: _at_most(r, k, _positive(r, k, v), MAX_PROMETHEUS_TIMEOUT_S),
            10.0,
        )
    )
    retries = int(
        get(
            "prometheus.retries",
            lambda r, k, v: _at_most(
                r, k, _number(r, k, v, minimum=0, integer=True), MAX_PROMETHEUS_RETRIES
            ),
            2,
        )
    )
    bearer_file = get("prometheus.bearer_token_file", _path, None)
    username = get(
        "prometheus.username",
        lambda r, k, v: _string(r, k, v, "give the basic-auth user name"),
        None,
    )
    password_file = get("prometheus.password_file", _path, None)
    if bearer_file is not None and (username is not None or password_file is not None):
        raise reader("prometheus.bearer_token_file").fail(
            "prometheus.bearer_token_file",
            "set together with username/password_file",
            "choose bearer token or basic auth, not both",
        )
    if (username is None) != (password_file is None):
        missing = "prometheus.password_file" if username is not None else "prometheus.username"
        raise reader(missing).fail(
            missing, "basic auth needs both username and password_file", f"set {missing}"
        )
    bearer_token = (
        _read_secret(
            reader("prometheus.bearer_token_file"), "prometheus.bearer_token_file", bearer_file
        )
        if bearer_file is not None
        else None
    )
    password = (
        _read_secret(reader("prometheus.password_file"), "prometheus.password_file", password_file)
        if password_file is not None
        else None
    )
    return PrometheusConfig(
        url=url,
        timeout_seconds=timeout,
        retries=retries,
        bearer_token_file=bearer_file,
        username=username,
        password_file=password_file,
        bearer_token=bearer_token,
        password=password,
    )
