"""`docs/metrics.md`: the exporter's catalogue, then every family the analytics service serves.

The analytics part is read from what the service really serves: an app is created (its
Prometheus unreachable, so the refreshed gauges have no samples yet, only their HELP and TYPE)
and its ``/metrics`` is parsed, so a family added anywhere in the service (telemetry, limits)
shows up here, and ``tests/unit/test_catalogue.py`` fails until ``make docs`` documents it.

    python -m analytics.metrics_doc > docs/metrics.md
"""

from __future__ import annotations

import logging
import sys

from prometheus_client.parser import text_string_to_metric_families

from analytics import telemetry
from exporter.catalogue import markdown as exporter_markdown

#: The families of the service's own metrics; prometheus_client's process and platform
#: collectors (``python_*``, ``process_*``) are the library's, documented by it.
PREFIX = "gpu_analytics_"


def published_families() -> list[tuple[str, str, str]]:
    """(name, type, help) of every ``gpu_analytics_*`` family the service's /metrics serves.

    Counters are named with their ``_total`` as in PromQL; ``_created`` companions are left out.
    """
    from analytics.app import create_app
    from analytics.config import Config, PrometheusConfig

    config = Config(
        prometheus=PrometheusConfig(url="http://127.0.0.1:9", timeout_seconds=0.2, retries=0)
    )
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # the refreshes fail against no Prometheus, by design
    try:
        text = create_app(config).test_client().get("/metrics").get_data(as_text=True)
    finally:
        logging.disable(previous)
    families: dict[str, tuple[str, str, str]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX) or family.name.endswith("_created"):
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        families[name] = (name, family.type, family.documentation)
    # Refreshed gauges a refresh has not published yet (their success flags before the first
    # refresh ends): their declarations.
    for value in vars(telemetry).values():
        if isinstance(value, telemetry.Family) and value.name not in families:
            families[value.name] = (value.name, "gauge", value.help)
    missing = set(telemetry.ANALYTICS_METRIC_NAMES) - set(families)
    if missing:
        raise RuntimeError(f"declared in ANALYTICS_METRIC_NAMES, never published: {missing}")
    return sorted(families.values())


def analytics_markdown() -> str:
    lines = [
        "## Analytics service (`gpu-analytics`, its own `/metrics`)",
        "",
        "Read from the service's `/metrics` by `make docs` (`python -m analytics.metrics_doc`).",
        "",
        "| metric | type | meaning |",
        "|---|---|---|",
    ]
    for name, kind, help_text in published_families():
        lines.append(f"| `{name}` | {kind} | {help_text} |")
    lines.append("")
    return "\n".join(lines)


def markdown() -> str:
    """The whole page: the exporter's catalogue, then the analytics service's families."""
    return exporter_markdown() + "\n" + analytics_markdown()


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)  # background refreshes may still be failing at exit
    sys.stdout.write(markdown())
