"""What keeps load bounded: per-client rate limits, a cap on Prometheus queries in flight, and a
single-flight cache for the report endpoints.

- **Rate limits** (seed 001 section 8): every ``/api/v1`` response carries ``X-RateLimit-Limit``,
  ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (Unix seconds when the window ends); past
  the limit the answer is 429 ``RATE_LIMIT_EXCEEDED`` with ``Retry-After``. Windows are fixed
  minutes; the key is the bearer token when a valid one is sent, else the client address.
- **Query cap**: at most ``max_concurrent_queries`` Prometheus queries run at once from this
  process; a query that waits longer than ``queue_timeout_seconds`` for a slot fails the request
  with 503 ``SERVICE_UNAVAILABLE`` (reason ``overloaded``), rather than piling onto Prometheus.
- **Report cache**: identical report requests (same endpoint, parsed parameters and token scope)
  share one computation while it runs (single flight) and its result for ``cache_ttl_seconds``,
  so a burst of N identical requests costs one set of Prometheus queries.

Per app, on ``app.extensions`` (no module state), like the rest of the service.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter

from analytics import scope as scopes
from analytics.auth import API_PREFIX, request_identity
from analytics.envelope import ApiError, ErrorCode, error_response

T = TypeVar("T")

WINDOW_SECONDS = 60
#: Distinct clients tracked per window; beyond it new clients share one bucket (memory bound).
MAX_TRACKED_CLIENTS = 100_000
_OVERFLOW_KEY = "(overflow)"
CACHE_KEY = "gpu_analytics_cache"
LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class Overloaded(RuntimeError):
    """No Prometheus query slot (or shared result) became free in time: answer 503."""


class LimitMetrics:
    """Rejections and cache outcomes, in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "gpu_analytics_rejected_requests_total",
            "API requests refused to protect the service, by reason (rate_limited: 429 past the "
            "client's rate limit; overloaded: 503, no Prometheus query slot in time).",
            ["reason"],
            registry=registry,
        )
        self.cache = Counter(
            "gpu_analytics_report_cache_requests_total",
            "Report requests by cache outcome (hit: a stored result; shared: joined an identical "
            "request in flight; miss: computed).",
            ["result"],
            registry=registry,
        )
        for reason in ("rate_limited", "overloaded"):
            self.rejected.labels(reason=reason)
        for result in ("hit", "shared", "miss"):
            self.cache.labels(result=result)


# -- rate limits -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One request's standing against its limit."""

    allowed: bool
    limit: int
    remaining: int
    reset: int  # Unix seconds when the window ends
    retry_after: int  # whole seconds until then, at least 1

    def headers(self) -> dict[str, str]:
        """The seed's ``X-RateLimit-*`` headers."""
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


class RateLimiter:
    """Fixed one-minute windows per key; thread-safe; forgets every key when a window ends."""

    def __init__(
        self,
        *,
        window_seconds: int = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
        max_keys: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self._window_seconds = window_seconds
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._window = -1
        self._counts: dict[str, int] = {}

    def hit(self, key: str, limit: int) -> Decision:
        """Count one request for ``key`` against ``limit`` requests per window."""
        now = self._clock()
        window = int(now // self._window_seconds)
        reset = (window + 1) * self._window_seconds
        with self._lock:
            if window != self._window:
                self._window, self._counts = window, {}
            if key not in self._counts and len(self._counts) >= self._max_keys:
                key = _OVERFLOW_KEY
            used = self._counts.get(key, 0) + 1
            self._counts[key] = used
        retry = max(1, math.ceil(reset - now))
        return Decision(used <= limit, limit, max(limit - used, 0), reset, retry)


def install_rate_limit(app: Flask, *, anonymous: int, token: int, limiter: RateLimiter) -> None:
    """Limit ``/api/v1`` requests per token (``token`` a minute) or per client address
    (``anonymous`` a minute); 0 turns that limit off. Register before authentication, so that
    requests with a wrong token count against their address too."""
    if anonymous <= 0 and token <= 0:
        return
    metrics: LimitMetrics = app.extensions["gpu_analytics_limit_metrics"]

    @app.before_request
    def _limit() -> None:
        path = request.path
        if not (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            return  # probes and /metrics are never limited
        identity = request_identity(app)
        if identity is not None:
            key, limit = f"token:{identity[0]}", token
        else:
            key, limit = f"addr:{request.remote_addr or '-'}", anonymous
        if limit <= 0:
            return
        decision = limiter.hit(key, limit)
        g.gpu_analytics_rate_limit = decision
        if not decision.allowed:
            metrics.rejected.labels(reason="rate_limited").inc()
            retry = decision.retry_after
            raise ApiError(
                ErrorCode.RATE_LIMIT_EXCEEDED,
                f"rate limit exceeded: {limit} requests per minute",
                {"retryAfter": retry, "limit": limit, "reset": decision.reset},
                headers={"Retry-After": str(retry)},
            )

    @app.after_request
    def _headers(response: Response) -> Response:
        decision = g.get("gpu_analytics_rate_limit")
        if isinstance(decision, Decision):
            for name, value in decision.headers().items():
                response.headers[name] = value
        return response


# -- the Prometheus query cap ------------------------------------------------------------------


class GatedPrometheus:
    """A proxy over the Prometheus client that lets at most ``slots`` queries run at once.

    ``query`` and ``query_range`` wait up to ``timeout`` seconds for a slot, then raise
    :class:`Overloaded`; every other attribute (``healthy``, ``url``, ...) passes through.
    """

    def __init__(self, client: Any, slots: int, timeout: float) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots!r}")
        self._client = client
        self._slots = threading.BoundedSemaphore(slots)
        self._timeout = timeout

    @property
    def wrapped(self) -> Any:
        """The client underneath."""
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _acquire(self) -> None:
        if not self._slots.acquire(timeout=self._timeout):
            raise Overloaded(f"no Prometheus query slot became free within {self._timeout:g} s")

    def query(self, *args: Any, **kwargs: Any) -> Any:
        """The client's ``query``, once a slot is free."""
        self._acquire()
        try:
            return self._client.query(*args, **kwargs)
        finally:
            self._slots.release()

    def query_range(self, *args: Any, **kwargs: Any) -> Any:
        """The client's ``query_range``, once a slot is free."""
        self._acquire()
        try:
            return self._client.query_range(*args, **kwargs)
        finally:
            self._slots.release()


# -- single-flight report cache ----------------------------------------------------------------


class _Flight:
    """One computation in progress that identical requests wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ResultCache:
    """Single flight plus a short TTL, keyed by anything hashable; thread-safe.

    Stored values are shared between requests: callers must treat them as read-only.
    Failures are never stored, but every request waiting on the failed computation gets its
    error (a burst during a Prometheus outage costs one attempt, not N).
    """

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int,
        wait_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: LimitMetrics | None = None,
    ) -> None:
        self._ttl = ttl_seconds
        self._max_entries = max(1, max_entries)
        self._wait = wait_seconds
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()
        self._stored: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._flights: dict[Hashable, _Flight] = {}

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.cache.labels(result=result).inc()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The stored or in-flight result for ``key``, else ``compute()`` (stored on success)."""
        with self._lock:
            stored = self._stored.get(key)
            if stored is not None and stored[0] > self._clock():
                self._count("hit")
                return stored[1]
            if stored is not None:
                del self._stored[key]
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            self._count("shared")
            if not flight.done.wait(self._wait):
                raise Overloaded("an identical request is still being computed; retry later")
            if flight.error is not None:
                raise flight.error
            return flight.value
        self._count("miss")
        try:
            value = compute()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            if self._ttl > 0:
                with self._lock:
                    self._stored[key] = (self._clock() + self._ttl, value)
                    self._stored.move_to_end(key)
                    while len(self._stored) > self._max_entries:
                        self._stored.popitem(last=False)
            return value
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()


def cached(endpoint: str, params: tuple[Hashable, ...], compute: Callable[[], T]) -> T:
    """``compute()`` through this app's report cache, keyed by endpoint, params and scope."""
    cache = current_app.extensions.get(CACHE_KEY)
    if not isinstance(cache, ResultCache):
        return compute()
    return cache.get((endpoint, params, scopes.current().key), compute)


def overloaded_response(exc: Overloaded) -> Response:
    """503 SERVICE_UNAVAILABLE (reason overloaded) with a short Retry-After."""
    metrics = current_app.extensions.get("gpu_analytics_limit_metrics")
    if isinstance(metrics, LimitMetrics):
        metrics.rejected.labels(reason="overloaded").inc()
    return error_response(
        ErrorCode.SERVICE_UNAVAILABLE,
        "the service is busy with other queries to Prometheus; retry later",
        {"reason": "overloaded"},
        headers={"Retry-After": "1"},
    )
