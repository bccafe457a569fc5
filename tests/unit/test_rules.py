"""GPU recording rules and alerts: generated from monitoring/values.yaml, checked by promtool.

The rule values and alert timings themselves are pinned by promtool unit tests
(rules/tests/gpu_*_test.yml); these tests run them, keep the committed files in step with the
values, check that every record and alert is covered there, that every alert carries what
Alertmanager and the on-call need, and that every metric a rule reads is published somewhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from analytics.pricing import load_pricing
from monitoring import rules
from monitoring.promql import known_metric_names, metric_names
from monitoring.values import (
    SEVERITIES,
    ValuesError,
    deep_merge,
    duration_seconds,
    load_values,
    parse_values,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"
GENERATED = [RULES / rules.RECORDING_FILE, RULES / rules.ALERTS_FILE]
OUR_TESTS = sorted((RULES / "tests").glob("gpu_*_test.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
LEVELS = {"device", "mig", "pod", "node", "namespace", "team", "model", "mig_profile", "cluster"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run make test, which installs it", pytrace=False)
    return path


def _groups(path: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load(path.read_text())["groups"])


def _records() -> list[str]:
    return [r["record"] for g in _groups(GENERATED[0]) for r in g["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [r for g in _groups(GENERATED[1]) for r in g["rules"]]


def test_generated_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", *map(str, GENERATED)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "duplicate" not in result.stdout + result.stderr


def test_promtool_unit_tests_of_the_gpu_rules_pass() -> None:
    assert [p.name for p in OUR_TESTS] == [
        "gpu_alerts_test.yml",
        "gpu_budget_test.yml",
        "gpu_recording_test.yml",
    ]
    result = subprocess.run(
        [_promtool(), "test", "rules", *map(str, OUR_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_rule_files_match_the_values() -> None:
    rendered = rules.render(load_values())
    for path in GENERATED:
        assert path.read_text() == rendered[path.name], (
            f"{path.relative_to(ROOT)} is stale: run `make rules` (python -m monitoring.rules)"
        )


def test_the_cli_writes_and_checks_the_files(tmp_path: Path) -> None:
    assert rules.main(["--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [rules.ALERTS_FILE, rules.RECORDING_FILE]
    assert rules.main(["--out-dir", str(tmp_path), "--check"]) == 0
    (tmp_path / rules.ALERTS_FILE).write_text("stale\n")
    assert rules.main(["--out-dir", str(tmp_path), "--check"]) == 1
    assert rules.main(["--out-dir", str(tmp_path / "missing"), "--check"]) == 1


def test_every_record_has_a_promtool_value_test() -> None:
    tested: set[str] = set()
    for path in OUR_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("promql_expr_test", []):
                if case.get("exp_samples"):
                    tested.add(case["expr"].strip())
    missing = [record for record in _records() if record not in tested]
    assert not missing, f"records without a promtool value test: {missing}"


def test_every_alert_is_tested_firing_quiet_and_resolved() -> None:
    """In one test group: quiet before it fires (its `for` running), firing, quiet again."""
    seen: dict[str, set[str]] = {}
    for path in OUR_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            by_alert: dict[str, list[tuple[float, bool]]] = {}
            for case in group.get("alert_rule_test", []):
                when = duration_seconds(str(case["eval_time"]))
                by_alert.setdefault(case["alertname"], []).append((when, bool(case["exp_alerts"])))
            for name, cases in by_alert.items():
                cases.sort()
                fired = [t for t, firing in cases if firing]
                if not fired:
                    continue
                states = seen.setdefault(name, set())
                states.add("fires")
                if any(t < fired[0] and not firing for t, firing in cases):
                    states.add("quiet")
                if any(t > fired[-1] and not firing for t, firing in cases):
                    states.add("resolves")
    names = sorted({rule["alert"] for rule in _alerts()})
    incomplete = {
        name: sorted({"fires", "quiet", "resolves"} - seen.get(name, set())) for name in names
    }
    assert not {k: v for k, v in incomplete.items() if v}, incomplete


def test_every_alert_has_for_severity_texts_and_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    sections = re.findall(r"^## (\w+)$", runbook, flags=re.MULTILINE)
    names = []
    for rule in _alerts():
        name = rule["alert"]
        names.append(name)
        assert re.fullmatch(r"[0-9]+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["labels"]["component"], name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        url = annotations["runbook_url"]
        assert url.endswith(f"docs/runbook.md#{name.lower()}"), url
        assert name in sections, f"docs/runbook.md has no section for {name}"
    assert sorted(set(sections)) == sorted(set(names)), "runbook sections without an alert"
    for name in sections:
        body = runbook.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Meaning.**", "**Impact.**", "**Check.**", "**Fix.**"):
            assert part in body, f"runbook section {name} lacks {part}"


def test_the_issues_alert_set_is_there() -> None:
    names = {rule["alert"] for rule in _alerts()}
    assert names == {
        "GPUHighTemperature",
        "GPUHighUtilization",
        "GPUMIGProfileNearlyExhausted",
        "GPUDailyCostOverBudget",
        "GPUExporterDown",
        "GPUUnavailable",
        "GPUNVMLUnavailable",
        "GPUXidError",
        "GPUUncorrectableECCErrors",
        "GPURemappedRowsFailed",
        "GPUThermalThrottling",
        "GPUPowerThrottling",
        "GPUAllocatedIdle",
        "GPUTeamOverBudget",
        "GPUCapacityExhaustionForecast",
        "GPUAnalyticsDown",
        "GPUAnalyticsQueriesFailing",
        "GPUNodeNotScraped",
    }


def test_records_are_named_level_metric_operations() -> None:
    records = _records()
    assert len(records) == len(set(records)), "one rule per recorded name"
    pricing = {r["record"] for g in _groups(RULES / "pricing.yml") for r in g["rules"]}
    assert not set(records) & pricing, "the pricing rules' records are not recorded twice"
    for record in records:
        level, metric, *operations = record.split(":")
        assert level in LEVELS, record
        assert metric.startswith("gpu_") and len(operations) <= 1, record


def test_every_metric_a_rule_reads_is_published() -> None:
    known = known_metric_names(sorted(RULES.glob("*.yml")))
    for path in GENERATED:
        for group in _groups(path):
            for rule in group["rules"]:
                unknown = metric_names(rule["expr"]) - known
                assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'sum by (node) (rate(a_total{job="x", b=~"c|d"}[$__rate_interval])) / on (node) '
        "group_left b:c:d * 1e9 # a comment naming not_a_metric\n"
        'or label_replace(vector(0), "x", "$1", "y", "(.+)") unless e offset 5m'
    )
    assert metric_names(expr) == {"a_total", "b:c:d", "e"}


def test_values_agree_with_the_pricing() -> None:
    values = load_values()
    pricing = load_pricing(ROOT / "examples" / "pricing.yaml")
    assert values.team_label == pricing.team_label
    (group,) = _groups(RULES / "pricing.yml")
    assert group["interval"] == values.recording_interval, (
        "recording_interval must equal the pricing rules' interval: the 24-hour spend counts "
        "one recorded sample per interval"
    )


def test_every_recording_group_runs_at_the_values_interval() -> None:
    values = load_values()
    assert {g["interval"] for g in _groups(GENERATED[0])} == {values.recording_interval}
    assert all("interval" not in g for g in _groups(GENERATED[1]))


def test_overrides_change_thresholds_windows_and_for() -> None:
    values = load_values(
        overrides={
            "recording_interval": "2s",
            "idle": {"window": "20s", "threshold": 0.1, "namespace_thresholds": None},
            "alerts": {"GPUHighTemperature": {"for": "3s", "threshold_celsius": 80}},
        }
    )
    text = rules.render(values)
    recording = yaml.safe_load(text[rules.RECORDING_FILE])
    assert {g["interval"] for g in recording["groups"]} == {"2s"}
    idle = next(g for g in recording["groups"] if g["name"] == "gpu-idle")["rules"]
    assert "gpu_utilization_ratio[20s]" in idle[0]["expr"]
    assert "< 0.1)" in idle[1]["expr"] and "namespace=" not in idle[1]["expr"]
    alerts = yaml.safe_load(text[rules.ALERTS_FILE])
    (temperature,) = [
        r for g in alerts["groups"] for r in g["rules"] if r["alert"] == "GPUHighTemperature"
    ]
    assert temperature["for"] == "3s"
    assert temperature["expr"].strip() == "gpu_temperature_celsius > 80"


def test_namespace_idle_overrides_use_their_own_threshold() -> None:
    values = load_values(
        overrides={"idle": {"namespace_thresholds": {"research": 0.02, "kube-system": 0}}}
    )
    expr = next(
        r["expr"]
        for r in rules.recording_rules(values)["groups"][2]["rules"]
        if r["record"] == rules.POD_IDLE
    )
    assert 'namespace!~"research|kube-system"' in expr
    assert 'namespace="research"}' in expr and "< 0.02)" in expr
    assert 'namespace="kube-system"}' in expr and "< 0)" in expr


def test_without_budgets_there_are_no_budget_rules() -> None:
    values = load_values(
        overrides={
            "budgets": {
                "cluster_daily_dollars": None,
                "team_daily_dollars": None,
                "default_team_daily_dollars": None,
            }
        }
    )
    records = [r["record"] for g in rules.recording_rules(values)["groups"] for r in g["rules"]]
    assert rules.CLUSTER_BUDGET not in records and rules.TEAM_BUDGET not in records
    alerts = {r.name for r in rules.alert_rules(values)}
    assert not {"GPUDailyCostOverBudget", "GPUTeamOverBudget"} & alerts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"idle": {"window": "30 minutes"}}, "idle.window: '30 minutes' is not a Prometheus"),
        ({"idle": {"threshold": 5}}, "idle.threshold: 5 is outside [0.0, 1.0]"),
        ({"alerts": {"GPUHighTemperature": {"severity": "page"}}}, "severity: 'page'"),
        ({"alerts": {"GPUHighTemperature": {"for": None}}}, "GPUHighTemperature.for: None"),
        ({"alerts": {"GPUNoSuchAlert": {"for": "1m"}}}, "alerts.GPUNoSuchAlert: is not a known"),
        ({"team_label": "team-name"}, "team_label: 'team-name' is not a Prometheus label"),
        ({"colour": "red"}, "colour: is not a known key"),
        ({"budgets": {"team_daily_dollars": {"nlp": "lots"}}}, "nlp: 'lots' is not a number"),
    ],
)
def test_a_bad_values_file_names_the_key(change: dict[str, Any], message: str) -> None:
    data = deep_merge(yaml.safe_load((ROOT / "monitoring" / "values.yaml").read_text()), change)
    with pytest.raises(ValuesError) as error:
        parse_values(data, "values.yaml")
    assert str(error.value).startswith("values.yaml: ")
    assert message in str(error.value)


def test_generated_files_load_in_the_demo_and_tests_stay_out_of_it() -> None:
    """Prometheus loads rules/*.yml in the demo; promtool tests live in rules/tests/."""
    assert {p.name for p in RULES.glob("*.yml")} >= {"pricing.yml", *[p.name for p in GENERATED]}
    assert not list(RULES.glob("*_test.yml"))
