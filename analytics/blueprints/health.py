"""Health: liveness and readiness probes, and the seed's cluster health (``/api/v1/gpu/health``).

``/healthz`` says only that the process serves requests (Kubernetes restarts it otherwise), so
it never touches Prometheus: an outage there must not restart every analytics pod. ``/readyz``
stays 200 during a Prometheus outage (it reports reachability), so the pods stay in their
Service and answer the 503 envelope themselves. ``/api/v1/gpu/health`` reports whether
Prometheus answers and how many GPU exporter targets are up.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from analytics.auth import API_PREFIX
from analytics.context import services
from analytics.envelope import success, utc_timestamp
from analytics.openapi import operation
from analytics.scope import scoped

root = Blueprint("health_root", __name__)
api = Blueprint("health", __name__)

_PROBE_TAG = "probes"
_TAG = "health"


@root.get("/healthz")
def healthz() -> Response:
    """Liveness: always 200 while the process can serve."""
    return success({"status": "ok"})


@root.get("/readyz")
def readyz() -> Response:
    """Readiness: 200 once the app serves, with Prometheus' reachability as information.

    Not 503 while Prometheus is down: that would take every analytics pod out of its
    Service, and clients would get the ingress's connection errors instead of our 503
    envelope saying what is wrong.
    """
    reachable = services().prometheus.healthy()
    return success({"status": "ready", "prometheus": {"reachable": reachable}})


def _target(labels: Any) -> dict[str, str]:
    return {"job": str(labels.get("job", "")), "instance": str(labels.get("instance", ""))}


@api.get("/gpu/health")
@scoped("open")
def gpu_health() -> Response:
    """Cluster health: Prometheus reachable, and the GPU exporter targets that are up/down.

    ``status`` is ``healthy`` when every exporter target is up, ``degraded`` when some are
    down and ``unhealthy`` when none is up (or none is scraped at all). A Prometheus outage is
    the 503 envelope, like every endpoint that needs Prometheus.
    """
    ctx = services()
    selector = ctx.config.up_selector
    samples = ctx.prometheus.query(selector)
    up = sorted((_target(s.labels) for s in samples if s.value == 1), key=_sort_key)
    down = sorted((_target(s.labels) for s in samples if s.value != 1), key=_sort_key)
    if samples and not down:
        status = "healthy"
    elif up:
        status = "degraded"
    else:
        status = "unhealthy"
    return success(
        {
            "status": status,
            "prometheus": {"reachable": True},
            "exporters": {
                "source": ctx.config.source,
                "selector": selector,
                "total": len(samples),
                "up": len(up),
                "down": len(down),
                "downTargets": down,
            },
            "checkedAt": utc_timestamp(ctx.clock()),
        }
    )


def _sort_key(target: dict[str, str]) -> tuple[str, str]:
    return target["job"], target["instance"]


_TARGET = {
    "type": "object",
    "properties": {"job": {"type": "string"}, "instance": {"type": "string"}},
}
_REACHABLE = {"type": "object", "properties": {"reachable": {"type": "boolean"}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": operation(
            summary="Liveness probe: 200 while the process serves",
            tag=_PROBE_TAG,
            data={"type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}},
        )
    },
    "/readyz": {
        "get": operation(
            summary="Readiness probe: 200 when Prometheus answers, else 503",
            tag=_PROBE_TAG,
            data={
                "type": "object",
                "properties": {
                    "status": {"type": "string", "enum": ["ready"]},
                    "prometheus": _REACHABLE,
                },
            },
            errors=(503,),
        )
    },
    f"{API_PREFIX}/gpu/health": {
        "get": operation(
            summary="Cluster GPU health: Prometheus reachability and exporter targets up",
            tag=_TAG,
            operation_id="getGpuHealth",
            data={
                "type": "object",
                "required": ["status", "prometheus", "exporters", "checkedAt"],
                "properties": {
                    "status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy"]},
                    "prometheus": _REACHABLE,
                    "exporters": {
                        "type": "object",
                        "properties": {
                            "source": {"type": "string", "enum": ["exporter", "dcgm"]},
                            "selector": {"type": "string"},
                            "total": {"type": "integer"},
                            "up": {"type": "integer"},
                            "down": {"type": "integer"},
                            "downTargets": {"type": "array", "items": _TARGET},
                        },
                    },
                    "checkedAt": {"type": "string", "format": "date-time"},
                },
            },
            errors=(503,),
        )
    },
}
