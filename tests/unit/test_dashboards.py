"""Grafana dashboards: generated from code, structurally sound, naming only published metrics.

What each query returns is checked against a real Prometheus in
tests/integration/test_dashboards_live.py; here: the committed JSON is the generator's, and
every dashboard has a data source variable, the cluster/node/namespace/team variables, stable
unique uids, unique panel ids, a grid without overlaps, a unit on every panel, links to the
other dashboards, and queries over metrics that something publishes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from monitoring import dashboards as d
from monitoring.promql import known_metric_names, metric_names, with_matcher
from monitoring.values import load_values

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "dashboards").glob("*.json"))
#: Grafana unit ids the dashboards may use.
UNITS = {
    "short",
    "none",
    "percentunit",
    "bytes",
    "Bps",
    "celsius",
    "watt",
    "kwatth",
    "hertz",
    "s",
    "reqps",
    "currencyUSD",
    "dateTimeAsIso",
}
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table"}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(), parse_constant=_reject_constant))


BOARDS = {path.stem: _load(path) for path in FILES}


def test_the_seven_dashboards_are_committed_and_current() -> None:
    assert sorted(BOARDS) == sorted(spec.uid for spec in d.DASHBOARDS)
    rendered = d.render(load_values())
    for path in FILES:
        assert path.read_text() == rendered[path.name], (
            f"{path.relative_to(ROOT)} is stale: run `make dashboards`"
        )


def test_the_cli_writes_and_checks_the_files(tmp_path: Path) -> None:
    assert d.main(["--out-dir", str(tmp_path)]) == 0
    assert d.main(["--out-dir", str(tmp_path), "--check"]) == 0
    (tmp_path / "gpu-cost.json").write_text("{}\n")
    assert d.main(["--out-dir", str(tmp_path), "--check"]) == 1


def test_uids_and_titles_are_stable_and_unique() -> None:
    assert {b["uid"] for b in BOARDS.values()} == {
        "gpu-overview",
        "gpu-node",
        "gpu-mig",
        "gpu-workloads",
        "gpu-cost",
        "gpu-idle",
        "gpu-forecast",
    }
    titles = [b["title"] for b in BOARDS.values()]
    assert len(titles) == len(set(titles))
    for name, board in BOARDS.items():
        assert board["uid"] == name, "the file is named after the uid"
        assert board.get("id") is None, "no instance-specific id: the JSON imports anywhere"


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_data_source_and_template_variables(uid: str) -> None:
    board = BOARDS[uid]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert board["templating"]["list"][0]["name"] == "datasource"
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("cluster", "node", "namespace", "team"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == d.DATASOURCE, name
        assert var["includeAll"] and var["allValue"] == ".*", name
    for panel in board["panels"]:
        assert panel["datasource"] == d.DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == d.DATASOURCE, panel["title"]


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_panels_have_unique_ids_units_and_no_overlaps(uid: str) -> None:
    panels = BOARDS[uid]["panels"]
    assert panels, uid
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        title = panel["title"]
        assert panel["type"] in PANEL_TYPES, title
        assert panel["description"], title
        assert panel["targets"], title
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit in UNITS, f"{uid}/{title}: unit {unit!r}"
        for override in panel["fieldConfig"]["overrides"]:
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    assert prop["value"] in UNITS, f"{uid}/{title}"
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["y"] >= 0, title
        assert pos["x"] + pos["w"] <= 24, f"{uid}/{title} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{uid}: {title} overlaps {cells[(x, y)]}"
                cells[(x, y)] = title
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title


def test_layout_wraps_rows_without_overlap() -> None:
    panels = [
        d.Panel("a", "stat", [], "short", "x", width=16),
        d.Panel("b", "stat", [], "short", "x", width=16, height=3),
    ]
    assert d.layout(panels) == [
        {"x": 0, "y": 0, "w": 16, "h": 8},
        {"x": 0, "y": 8, "w": 16, "h": 3},
    ]


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_dashboards_link_to_each_other(uid: str) -> None:
    board = BOARDS[uid]
    assert d.TAG in board["tags"]
    (tag_link,) = [link for link in board["links"] if link["type"] == "dashboards"]
    assert tag_link["tags"] == [d.TAG] and tag_link["includeVars"] and tag_link["keepTime"]
    for panel in board["panels"]:
        for link in panel["fieldConfig"]["defaults"]["links"]:
            target = link["url"].split("/d/", 1)[1].split("?", 1)[0]
            assert target in BOARDS, f"{uid}/{panel['title']} links to unknown {target}"
            assert "${datasource:queryparam}" in link["url"]


def test_every_query_names_only_published_metrics() -> None:
    known = known_metric_names(sorted((ROOT / "rules").glob("*.yml")))
    for uid, board in BOARDS.items():
        exprs = [(q.panel, q.expr) for q in d.queries(board)]
        exprs += [
            (f"variable {v['name']}", v["definition"])
            for v in board["templating"]["list"]
            if v["type"] == "query"
        ]
        exprs += [("annotation", a["expr"]) for a in board["annotations"]["list"]]
        for where, expr in exprs:
            for prefix in ("label_values(",):
                if expr.startswith(prefix):
                    expr = expr[len(prefix) :].rsplit(",", 1)[0]
            unknown = metric_names(expr) - known
            assert not unknown, f"{uid}/{where}: {unknown} is published by nothing"


def test_every_query_honours_the_cluster_variable() -> None:
    for board in BOARDS.values():
        for query in d.queries(board):
            assert with_matcher(query.expr, "cluster", d.C) == query.expr, query


def test_overview_has_the_seed_figures() -> None:
    titles = {p["title"] for p in BOARDS["gpu-overview"]["panels"]}
    # The seed's overview: total and active GPUs, allocations, utilization by node,
    # temperature, MIG allocation, cost trend.
    assert {
        "GPUs",
        "GPUs up",
        "Active allocations",
        "GPU activity by node",
        "GPU temperature",
        "MIG instances by profile",
        "GPU cost per hour",
    } <= titles


def test_panel_thresholds_come_from_the_values() -> None:
    values = load_values(
        overrides={
            "idle": {"threshold": 0.125},
            "alerts": {"GPUHighTemperature": {"threshold_celsius": 77}},
        }
    )
    boards = {spec.uid: d.dashboard(spec, values) for spec in d.DASHBOARDS}
    (temperature,) = [
        p for p in boards["gpu-overview"]["panels"] if p["title"] == "GPU temperature"
    ]
    steps = temperature["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1] == {"color": "red", "value": 77.0}
    idle = [p for p in boards["gpu-idle"]["panels"] if p["title"].startswith("Highest activity")]
    assert idle[0]["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 0.125


def test_variables_expand_as_grafana_defaults_them() -> None:
    board = BOARDS["gpu-forecast"]
    expr = 'x{node=~"$node", horizon="$horizon"}[$__rate_interval] ${team}'
    assert d.expand(expr, board) == 'x{node=~".*", horizon="24h"}[1m] .*'
