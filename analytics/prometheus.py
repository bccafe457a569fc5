"""A small client for the Prometheus HTTP query API.

It turns Prometheus' answers into plain dataclasses and its failures into two exceptions the
API layer maps to status codes: :class:`PrometheusUnavailable` (outage, overload, timeout:
answer 503 and recover by itself) and :class:`PrometheusQueryError` (Prometheus rejected the
query: a bug on our side). Long range queries are split so that no request exceeds Prometheus'
limit of 11,000 points per series, and the pieces are stitched back without gaps or overlap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from requests.adapters import HTTPAdapter

__all__ = [
    "PrometheusAuth",
    "PrometheusClient",
    "PrometheusQueryError",
    "PrometheusUnavailable",
    "Sample",
    "Series",
]

log = logging.getLogger(__name__)

# Statuses worth another try: overload (429) and gateways or Prometheus itself not ready.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# 4xx that mean "wrong URL or credentials", not "wrong query": the service cannot use
# Prometheus until an operator fixes the configuration, so callers answer 503, not 500.
_CONFIG_STATUSES = frozenset({401, 403, 404, 407})
# Longest Retry-After we honour; a longer one is still capped so a request never hangs.
_MAX_RETRY_AFTER_S = 5.0


@dataclass(frozen=True)
class Sample:
    """One value of an instant query: its labels, value and evaluation time (Unix seconds)."""

    labels: Mapping[str, str]
    value: float
    timestamp: float


@dataclass(frozen=True)
class Series:
    """One series of a range query: labels and equally long tuples of timestamps and values.

    Tuples rather than numpy arrays: immutable like the dataclass, no extra dependency, and
    ``pandas.Series(values, index=timestamps)`` takes them as they are.
    """

    labels: Mapping[str, str]
    timestamps: tuple[float, ...]
    values: tuple[float, ...]


class PrometheusUnavailable(RuntimeError):
    """Prometheus cannot answer now (refused, reset, timed out, 5xx, 429): the API answers 503."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PrometheusQueryError(RuntimeError):
    """Prometheus rejected the query (``bad_data``, ``execution``): a bug in the query we built.

    The message is Prometheus' own, so the log says what to fix.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str | None = None,
        status_code: int | None = None,
        query: str | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status_code = status_code
        self.query = query


@dataclass(frozen=True)
class PrometheusAuth:
    """Credentials for Prometheus: a bearer token, or a username and password (basic auth)."""

    bearer_token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.bearer_token is not None and (
            self.username is not None or self.password is not None
        ):
            raise ValueError("PrometheusAuth takes a bearer token or basic auth, not both")
        if self.password is not None and self.username is None:
            raise ValueError("PrometheusAuth: a password needs a username")


class PrometheusClient:
    """Instant and range queries against one Prometheus (or a compatible API, e.g. Thanos).

    Safe to share between threads: the session is configured once and never mutated, its
    connection pool is thread-safe, and the query counter is guarded by a lock.

    Requests use GET, and POST (form-encoded) once the encoded parameters pass
    :attr:`POST_THRESHOLD` characters: GET is what caching front-ends and read-only proxies
    handle everywhere, POST avoids the 4-8 KiB URL limits of proxies and Prometheus' own
    server for long joins. Both are idempotent here, so both are retried the same way.
    """

    #: Encoded-parameter length above which a query is sent as a POST form.
    POST_THRESHOLD = 2_000

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.2,
        auth: PrometheusAuth | None = None,
        max_points: int = 11_000,
        session: requests.Session | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"Prometheus URL must be http(s)://host[:port][/prefix], got {url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {backoff!r}")
        if max_points < 2:
            raise ValueError(f"max_points must be at least 2, got {max_points!r}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_points = int(max_points)
        self.queries = 0
        self._lock = threading.Lock()
        self._headers: dict[str, str] = {"Accept": "application/json"}
        self._basic: tuple[str, str] | None = None
        if auth is not None and auth.bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {auth.bearer_token}"
        elif auth is not None and auth.username is not None:
            self._basic = (auth.username, auth.password or "")
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            # Our own retry loop decides what is retryable; urllib3 must not retry underneath.
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self._session = session

    def __repr__(self) -> str:
        return f"PrometheusClient({self.url!r}, timeout={self.timeout}, retries={self.retries})"

    def close(self) -> None:
        """Close the connection pool (only if this client created the session)."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        """Evaluate an instant query at ``at`` (Unix seconds; default now).

        Vector results give one :class:`Sample` per series, in Prometheus' order; a scalar
        gives one sample with no labels. A range-vector or string result is a query bug.
        """
        params = {"query": promql}
        if at is not None:
            params["time"] = _seconds(_to_ms(at))
        data = self._request("/api/v1/query", params, promql)
        result_type = data.get("resultType")
        result: Any = data.get("result")
        try:
            if result_type == "vector":
                return [
                    Sample(
                        _labels(item["metric"]), float(item["value"][1]), float(item["value"][0])
                    )
                    for item in result
                ]
            if result_type == "scalar":
                return [Sample(MappingProxyType({}), float(result[1]), float(result[0]))]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PrometheusUnavailable(f"malformed query result from {self.url}: {exc}") from exc
        raise PrometheusQueryError(
            f"instant query returned a {result_type} result; only vector and scalar are supported",
            query=promql,
        )

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[Series]:
        """Evaluate ``promql`` at ``start, start+step, ... <= end``; one series per label set.

        Times are rounded to milliseconds, as Prometheus does. A range with more than
        ``max_points`` points is split into chunks of at most ``max_points`` points on the
        same grid (each chunk starts one step after the previous one ended), so no point is
        lost or repeated; series are merged by label set and sorted like Prometheus sorts a
        matrix.
        """
        start_ms, end_ms, step_ms = _to_ms(start), _to_ms(end), _to_ms(step)
        if step_ms <= 0:
            raise ValueError(f"step must be at least 1 ms, got {step!r}")
        if end_ms < start_ms:
            raise ValueError(f"end ({end!r}) is before start ({start!r})")
        merged: dict[tuple[tuple[str, str], ...], tuple[list[float], list[float]]] = {}
        chunk_span_ms = (self.max_points - 1) * step_ms
        chunk_start = start_ms
        while chunk_start <= end_ms:
            chunk_end = min(chunk_start + chunk_span_ms, end_ms)
            params = {
                "query": promql,
                "start": _seconds(chunk_start),
                "end": _seconds(chunk_end),
                "step": f"{step_ms}ms",
            }
            data = self._request("/api/v1/query_range", params, promql)
            if data.get("resultType") != "matrix":
                raise PrometheusQueryError(
                    f"range query returned a {data.get('resultType')} result", query=promql
                )
            try:
                for item in data["result"]:
                    key = tuple(sorted(item["metric"].items()))
                    timestamps, values = merged.setdefault(key, ([], []))
                    for point in item["values"]:
                        timestamps.append(float(point[0]))
                        values.append(float(point[1]))
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise PrometheusUnavailable(
                    f"malformed range result from {self.url}: {exc!r}"
                ) from exc
            chunk_start = chunk_end + step_ms
        return [
            Series(MappingProxyType(dict(key)), tuple(ts), tuple(vs))
            for key, (ts, vs) in sorted(merged.items())
        ]

    def healthy(self) -> bool:
        """True when Prometheus answers ``/-/ready`` with 200; never raises."""
        try:
            response = self._session.get(
                f"{self.url}/-/ready",
                headers=self._headers,
                auth=self._basic,
                timeout=min(self.timeout, 5.0),
            )
        except Exception:  # a health probe must answer, whatever went wrong
            return False
        return response.status_code == 200

    def _request(self, path: str, params: dict[str, str], promql: str) -> dict[str, Any]:
        """Send one API request with bounded retries; return its ``data`` or raise.

        At most ``retries + 1`` attempts, each bounded by ``timeout``, with exponential backoff
        between them; only connection failures and 429/502/503/504 are retried. A read timeout
        is not: the query already ran for the whole budget and would again.
        """
        # Prometheus stops the query a little before we stop waiting, so a slow query comes
        # back as Prometheus' own "query timed out" rather than a dropped connection.
        params = {**params, "timeout": f"{max(1, int(self.timeout * 900))}ms"}
        url = f"{self.url}{path}"
        encoded = urlencode(params)
        use_post = len(encoded) > self.POST_THRESHOLD
        attempt = 0
        while True:
            delay = self.backoff * (2**attempt)
            try:
                return self._attempt(url, params, use_post, promql)
            except _Retryable as exc:
                if attempt >= self.retries:
                    raise PrometheusUnavailable(
                        f"Prometheus at {self.url} unavailable after {attempt + 1} attempt(s): "
                        f"{exc.message}",
                        exc.status_code,
                    ) from None
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, _MAX_RETRY_AFTER_S))
                log.debug("retrying %s in %.2f s: %s", path, delay, exc.message)
            attempt += 1
            time.sleep(delay)

    def _attempt(
        self, url: str, params: dict[str, str], use_post: bool, promql: str
    ) -> dict[str, Any]:
        with self._lock:
            self.queries += 1
        try:
            if use_post:
                response = self._session.post(
                    url, data=params, headers=self._headers, auth=self._basic, timeout=self.timeout
                )
            else:
                response = self._session.get(
                    url,
                    params=params,
                    headers=self._headers,
                    auth=self._basic,
                    timeout=self.timeout,
                )
        except requests.exceptions.ConnectTimeout as exc:
            raise _Retryable(f"connect timeout: {exc}") from exc
        except requests.exceptions.Timeout as exc:
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} did not answer within {self.timeout} s"
            ) from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retryable(f"connection failed: {exc}") from exc
        except requests.RequestException as exc:
            raise PrometheusUnavailable(f"request to {self.url} failed: {exc}") from exc
        return self._parse(response, promql)

    def _parse(self, response: requests.Response, promql: str) -> dict[str, Any]:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        error = body.get("error")
        error_type = body.get("errorType")
        if status in _RETRY_STATUSES and error_type != "timeout":
            raise _Retryable(
                f"HTTP {status}: {error or response.text[:200]!s}",
                status_code=status,
                retry_after=_retry_after(response),
            )
        if status >= 500 or status in _RETRY_STATUSES:
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} answered HTTP {status}: {error or response.text[:200]}",
                status,
            )
        if status in _CONFIG_STATUSES and error_type is None:
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} answered HTTP {status} for {response.url.split('?')[0]}"
                ": check the URL (path prefix) and credentials",
                status,
            )
        if status >= 400 or body.get("status") == "error":
            raise PrometheusQueryError(
                str(error or f"HTTP {status}: {response.text[:200]}"),
                error_type=error_type,
                status_code=status,
                query=promql,
            )
        data = body.get("data")
        if body.get("status") != "success" or not isinstance(data, dict):
            raise PrometheusUnavailable(
                f"{self.url} did not answer like the Prometheus API (HTTP {status}, "
                f"{response.headers.get('Content-Type', 'no content type')})",
                status,
            )
        for warning in body.get("warnings") or ():
            log.warning("Prometheus warning for %r: %s", promql, warning)
        return data


class _Retryable(Exception):
    """Internal: one attempt failed in a way another attempt may not."""

    def __init__(
        self, message: str, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after


def _retry_after(response: requests.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None  # absent, or an HTTP date: fall back to our own backoff


def _labels(metric: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(metric))


def _to_ms(seconds: float) -> int:
    """Unix seconds to integer milliseconds, Prometheus' own resolution."""
    return round(float(seconds) * 1000)


def _seconds(ms: int) -> str:
    """Integer milliseconds as exact decimal seconds, so no float drift reaches the server."""
    sign = "-" if ms < 0 else ""
    whole, frac = divmod(abs(ms), 1000)
    return f"{sign}{whole}.{frac:03d}"
