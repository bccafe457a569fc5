"""``create_app(config)``: the Flask application every API area hangs from.

The app owns its dependencies (Prometheus client, clock, metrics registry) on
``app.extensions``, so tests build as many apps as they like and inject fakes instead of
patching globals. Areas are listed in :mod:`analytics.blueprints`; this module wires the
envelope, authentication, the service's own metrics and the OpenAPI document around them.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from flask import Flask, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from analytics import forecasting
from analytics.auth import API_PREFIX, install_auth
from analytics.blueprints import BLUEPRINT_MODULES, load_areas
from analytics.config import Config, ConfigError
from analytics.context import CLOCK_KEY, EXTENSION_KEY, Clock, Services, utc_now
from analytics.envelope import ErrorCode, error_response, register_error_handlers, request_id
from analytics.envelope import log as api_log
from analytics.forecasting import ForecastStore
from analytics.limits import (
    CACHE_KEY,
    GatedPrometheus,
    LimitMetrics,
    Overloaded,
    RateLimiter,
    ResultCache,
    install_rate_limit,
    overloaded_response,
)
from analytics.openapi import build_document
from analytics.pricing import load_pricing, render_rules
from analytics.prometheus import (
    PrometheusAuth,
    PrometheusClient,
    PrometheusQueryError,
    PrometheusUnavailable,
)
from analytics.promql import InvalidParameter
from analytics.scope import install_scope_guard
from analytics.telemetry import (
    InstrumentedPrometheus,
    ServiceMetrics,
    cost_metrics,
    forecast_metrics,
    idle_metrics,
)

log = logging.getLogger("gpu-analytics")


def prometheus_client_from_config(config: Config) -> PrometheusClient:
    """The Prometheus client the configuration describes (auth read at config load)."""
    settings = config.prometheus
    auth: PrometheusAuth | None = None
    if settings.bearer_token is not None:
        auth = PrometheusAuth(bearer_token=settings.bearer_token)
    elif settings.username is not None:
        auth = PrometheusAuth(username=settings.username, password=settings.password)
    return PrometheusClient(
        settings.url,
        timeout=settings.timeout_seconds,
        retries=settings.retries,
        auth=auth,
    )


def create_app(
    config: Config,
    *,
    prometheus: PrometheusClient | None = None,
    clock: Clock | None = None,
    blueprint_modules: tuple[str, ...] = BLUEPRINT_MODULES,
) -> Flask:
    """Build the analytics app for ``config``.

    ``prometheus`` replaces the client built from ``config.prometheus`` (tests inject a fake or
    a client for a test server); ``clock`` returns "now" as an aware UTC datetime.
    Raises :class:`ConfigError` if tokens are configured but none was loaded, or a token scope
    names a token that is not configured (fail closed).
    """
    if config.api_tokens_file is not None and not config.api_tokens:
        raise ConfigError(
            config.origin,
            "api_tokens_file",
            f"{config.api_tokens_file} was configured but no token was loaded",
            "build the Config with load_config(), which reads the tokens",
        )
    unknown = set(config.api_token_scopes) - set(config.api_tokens)
    if unknown:
        raise ConfigError(
            config.origin,
            "api_tokens_file",
            f"{len(unknown)} scoped token(s) are not among the configured tokens",
            "build the Config with load_config(), which reads tokens and scopes together",
        )
    app = Flask("analytics")
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the envelope's key order

    registry = CollectorRegistry(auto_describe=True)
    metrics = ServiceMetrics(registry)
    limit_metrics = LimitMetrics(registry)
    limits = config.limits
    client = prometheus if prometheus is not None else prometheus_client_from_config(config)
    instrumented = InstrumentedPrometheus(
        client, metrics, PrometheusUnavailable, PrometheusQueryError
    )
    # A broken pricing file stops start-up (PricingError names file, key and fix), rather
    # than failing the first request that needs prices.
    prices = load_pricing(config.pricing_file) if config.pricing_file is not None else None
    if prices is not None:
        # Also fails start-up for a pricing the source cannot serve (usage split on DCGM).
        render_rules(prices, config.rules_interval, config.team_label, config.rule_inputs())
    # Duck-typed proxies: same methods, plus timing and error counting, and at most
    # max_concurrent_queries queries in flight (requests and background refreshes together).
    proxy = cast(
        PrometheusClient,
        GatedPrometheus(instrumented, limits.max_concurrent_queries, limits.queue_timeout_seconds),
    )
    now = clock or utc_now
    forecasts = ForecastStore(
        lambda: forecasting.compute(
            proxy,
            config.rule_inputs(),
            now=now(),
            interval_seconds=config.rules_interval_seconds,
        ),
        config.forecast_refresh_seconds,
        now,
    )
    ctx = Services(
        config=config,
        pricing=prices,
        prometheus=proxy,
        clock=now,
        registry=registry,
        metrics=metrics,
        forecasts=forecasts,
    )
    registry.register(cost_metrics(ctx.prometheus, config.refresh_seconds))
    registry.register(idle_metrics(ctx.prometheus, config, prices, ctx.clock))
    registry.register(forecast_metrics(forecasts, config.refresh_seconds))
    app.extensions[EXTENSION_KEY] = ctx
    app.extensions[CLOCK_KEY] = ctx.clock
    app.extensions["gpu_analytics_limit_metrics"] = limit_metrics
    # A request joining an identical one in flight waits as long as that one may take.
    budget = config.prometheus.timeout_seconds * (config.prometheus.retries + 1)
    app.extensions[CACHE_KEY] = ResultCache(
        limits.cache_ttl_seconds,
        limits.cache_max_entries,
        min(600.0, 4 * budget + limits.queue_timeout_seconds),
        metrics=limit_metrics,
    )

    metrics.install(app)
    # Before authentication: requests with a wrong token count against their address.
    install_rate_limit(
        app,
        anonymous=limits.requests_per_minute,
        token=limits.token_requests_per_minute,
        limiter=RateLimiter(),
    )
    if config.api_tokens:
        install_auth(app, config.api_tokens, config.api_token_scopes)
    install_scope_guard(app)
    register_error_handlers(app)
    _register_prometheus_errors(app)
    app.register_error_handler(Overloaded, overloaded_response)

    areas = load_areas(blueprint_modules)
    paths: dict[str, Any] = {}
    for area in areas:
        if area.api is not None:
            app.register_blueprint(area.api, url_prefix=API_PREFIX)
        if area.root is not None:
            app.register_blueprint(area.root)
        paths.update(area.openapi_paths)
    document = build_document(
        paths,
        auth_enabled=bool(config.api_tokens),
        scoped_tokens=bool(config.api_token_scopes),
        rate_limited=limits.requests_per_minute > 0 or limits.token_requests_per_minute > 0,
    )

    @app.get("/metrics")
    def own_metrics() -> Response:
        """The service's own metrics, for Prometheus to scrape."""
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get(f"{API_PREFIX}/openapi.json")
    def openapi_document() -> Response:
        """The OpenAPI 3.0 document of exactly what this app serves."""
        return jsonify(document)

    app.extensions["gpu_analytics_openapi"] = document
    return app


def _register_prometheus_errors(app: Flask) -> None:
    """Map the Prometheus client's and PromQL validation's exceptions to the envelope."""

    def unavailable(exc: PrometheusUnavailable) -> Response:
        log.warning("Prometheus unavailable: %s", exc)
        return error_response(
            ErrorCode.SERVICE_UNAVAILABLE,
            "Prometheus is not reachable; retry later",
            {"reason": "prometheus_unavailable"},
            headers={"Retry-After": "5"},
        )

    def query_error(exc: PrometheusQueryError) -> Response:
        # bad_data means the query we built is wrong: our bug, a 500 with the query in the log.
        # Anything else (execution: timeout, too many samples) is Prometheus unable to answer.
        if exc.error_type == "bad_data":
            rid = request_id()
            api_log.error("Prometheus rejected query %r (request %s): %s", exc.query, rid, exc)
            return error_response(
                ErrorCode.INTERNAL_ERROR,
                "internal error; the service log has the details under this request id",
                {"requestId": rid},
            )
        log.warning("Prometheus failed query %r: %s", exc.query, exc)
        return error_response(
            ErrorCode.SERVICE_UNAVAILABLE,
            "Prometheus could not answer the query; retry later",
            {"reason": "prometheus_query_failed", "errorType": exc.error_type},
            headers={"Retry-After": "5"},
        )

    def invalid(exc: InvalidParameter) -> Response:
        return error_response(
            ErrorCode.INVALID_PARAMETER,
            f"invalid parameter {exc.field}: {exc.reason}",
            {"field": exc.field, "reason": exc.reason},
        )

    app.register_error_handler(PrometheusUnavailable, unavailable)
    app.register_error_handler(PrometheusQueryError, query_error)
    app.register_error_handler(InvalidParameter, invalid)
