"""The metric catalogue is the one place metric names live; everything else must agree with it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from analytics.metrics_doc import markdown, published_families
from analytics.telemetry import ANALYTICS_METRIC_NAMES
from exporter.catalogue import CATALOGUE, DEVICE_LABELS

ROOT = Path(__file__).resolve().parents[2]
#: Names of our metrics as they appear in PromQL, JSON or YAML: gpu_ followed by a word, not
#: the middle of a recording rule's level:metric:operations name.
METRIC_NAME = re.compile(r"(?<![\w:])gpu_[a-z0-9_]+\b")
#: Label names that start like metric names.
LABEL_NAMES = {label for spec in CATALOGUE.values() for label in spec.labels}
#: Suffixes PromQL adds to or strips from a family's name.
SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def test_metrics_doc_is_generated_from_the_catalogue() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    assert doc == markdown(), "docs/metrics.md is stale: run `make docs`"


def _documented() -> set[str]:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `([a-z_:0-9]+)` \|", doc, re.MULTILINE))


def test_every_metric_the_exporter_publishes_is_documented() -> None:
    """The gate: each family of the exporter's full exposition (the golden file of the
    simulated fleet, every collector) has a row in docs/metrics.md."""
    text = (ROOT / "tests" / "golden" / "exporter-unit.prom").read_text()
    published = {
        f"{f.name}_total" if f.type == "counter" else f.name
        for f in text_string_to_metric_families(text)
    }
    assert len(published) > 30
    assert published - _documented() == set()


def test_every_metric_the_analytics_publishes_is_documented() -> None:
    """The gate: each gpu_analytics_* family the service serves at /metrics (read from a live
    app, not from a list) and each name rules and dashboards may use has a row in
    docs/metrics.md."""
    published = {name for name, _, _ in published_families()}
    assert {"gpu_analytics_http_requests_total", "gpu_analytics_idle_devices"} <= published
    assert published - _documented() == set()
    assert set(ANALYTICS_METRIC_NAMES) - _documented() == set()


def test_promtool_check_metrics_reports_a_lint_finding() -> None:
    """The exposition lint (tests/integration/test_prometheus_scrape.py) fails on any output
    of `promtool check metrics`: it does print one for a finding, here a counter without
    `_total` and a name without a base unit."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run `make test`, which installs it", pytrace=False)
    bad = "# HELP gpu_things Things.\n# TYPE gpu_things counter\ngpu_things 1\n"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert 'counter metrics should have "_total" suffix' in result.stdout + result.stderr
    assert result.returncode != 0


def test_names_follow_prometheus_unit_conventions() -> None:
    units = (
        "_bytes",
        "_seconds",
        "_celsius",
        "_watts",
        "_ratio",
        "_hertz",
        "_total",
        "_bytes_per_second",
        "_info",
        "_up",
        "_state",
        "_active",
        "_pages",
        "_rows",
        "_pending",
        "_failed",
        "_instances",
        "_capacity",
        "_available",
        "_success",
        "_processes",
        "_devices",
    )
    for name, spec in CATALOGUE.items():
        assert name.startswith("gpu_"), name
        assert name.endswith(units), f"{name}: end in a base unit or a documented suffix"
        assert spec.help.endswith("."), f"{name}: HELP is a sentence"
        if spec.type == "counter":
            assert name.endswith("_total")
        if spec.group not in ("exporter",) or name == "gpu_up":
            assert spec.labels[: len(DEVICE_LABELS)] == DEVICE_LABELS or spec.labels[0] == "node"


def test_rules_and_dashboards_use_only_catalogue_names() -> None:
    """Python code names metrics through the catalogue's constants; YAML and JSON cannot."""
    used: dict[str, set[str]] = {}
    for folder in ("rules", "dashboards", "helm"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in {".yml", ".yaml", ".json", ".tpl"}:
                continue
            for name in METRIC_NAME.findall(path.read_text()):
                used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {
        name: files
        for name, files in used.items()
        if name not in CATALOGUE
        and name not in ANALYTICS_METRIC_NAMES  # the analytics service's own metrics
        and name not in LABEL_NAMES
        and not name.endswith(SUFFIXES)
    }
    assert not unknown, f"metrics that nothing exports: {unknown}"
