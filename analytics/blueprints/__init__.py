"""The API areas. Adding one is one line in :data:`BLUEPRINT_MODULES`.

Each listed module defines:

- ``api``: a :class:`flask.Blueprint` mounted under ``/api/v1`` (its routes are relative, e.g.
  ``@api.get("/gpu/cost/analysis")``);
- optionally ``root``: a Blueprint mounted at ``/`` (probes such as ``/healthz``);
- ``OPENAPI_PATHS``: the OpenAPI path items of its routes, keyed by full path
  (``/api/v1/gpu/cost/analysis``), built with the helpers in :mod:`analytics.openapi`.
  A test fails when a route is missing from the document or the document names a route that
  is not served.

Modules are imported by name so that an area is added without touching any other file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from flask import Blueprint

BLUEPRINT_MODULES: tuple[str, ...] = (
    "analytics.blueprints.health",  # probes, /gpu/health
    "analytics.blueprints.cost",  # /gpu/cost/*, /gpu/allocations/cost-statistics
    "analytics.blueprints.usage",  # /gpu/allocations, /gpu/metrics/*, /gpu/overview
    "analytics.blueprints.devices",  # /gpu/devices*, /gpu/mig/*
    "analytics.blueprints.idle",  # /gpu/idle, /gpu/cost/optimization
    "analytics.blueprints.forecast",  # /gpu/forecast, /resources/forecast
)


@dataclass(frozen=True)
class Area:
    """One API area: its blueprints and its part of the OpenAPI document."""

    name: str
    api: Blueprint | None
    root: Blueprint | None
    openapi_paths: dict[str, Any]


def _area(module: ModuleType) -> Area:
    api = getattr(module, "api", None)
    root = getattr(module, "root", None)
    for name, value in (("api", api), ("root", root)):
        if value is not None and not isinstance(value, Blueprint):
            raise TypeError(f"{module.__name__}.{name} must be a flask.Blueprint")
    if api is None and root is None:
        raise TypeError(f"{module.__name__} defines neither `api` nor `root`")
    paths = getattr(module, "OPENAPI_PATHS", None)
    if not isinstance(paths, dict):
        raise TypeError(f"{module.__name__}.OPENAPI_PATHS must be a dict of OpenAPI path items")
    return Area(module.__name__.rpartition(".")[2], api, root, paths)


def load_areas(modules: tuple[str, ...] = BLUEPRINT_MODULES) -> list[Area]:
    """Import every area module and return its blueprints and OpenAPI paths."""
    return [_area(importlib.import_module(name)) for name in modules]
