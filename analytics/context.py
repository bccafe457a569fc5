"""What a request handler needs from the app: config, Prometheus client, clock, metrics.

Stored on ``app.extensions`` by ``create_app`` (no module-level state), so two apps in one
process, as in the tests, never share a client or a registry.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, current_app
from prometheus_client import CollectorRegistry

from analytics.config import Config

if TYPE_CHECKING:
    from analytics.forecasting import ForecastStore
    from analytics.pricing import Pricing
    from analytics.prometheus import PrometheusClient
    from analytics.telemetry import ServiceMetrics

EXTENSION_KEY = "gpu_analytics"
CLOCK_KEY = "gpu_analytics_clock"

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    """The default clock: aware UTC now."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Services:
    """Per-app dependencies; blueprints reach them through :func:`services`."""

    config: Config
    prometheus: PrometheusClient
    clock: Clock
    registry: CollectorRegistry
    metrics: ServiceMetrics
    #: The pricing file's contents when one is configured (read once, at start-up).
    pricing: Pricing | None = None
    #: Cached forecasts, refitted on a schedule (see analytics.forecasting).
    forecasts: ForecastStore | None = None


def services(app: Flask | None = None) -> Services:
    """The :class:`Services` of ``app`` (default: the app handling this request)."""
    target = app if app is not None else current_app
    found: Services = target.extensions[EXTENSION_KEY]
    return found
