"""Pricing rules over other shapes of the same facts: pod labels renamed `exported_*` by a
scrape with honorLabels false, teams from kube-state-metrics' `kube_pod_labels`, and the
configuration keys that choose them. promtool evaluates the generated rules on exact inputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from analytics.config import ConfigError, load_config
from analytics.pricing import parse_pricing, render_rules
from analytics.sources import interval_range, rule_inputs
from tests.unit.test_pricing import _promtool

PRICING = parse_pricing({"models": {"NVIDIA H100 80GB HBM3": 8.0}})
GPU = 'node="n1",gpu="0",uuid="GPU-0",model="NVIDIA H100 80GB HBM3"'
# The scrape of the exporter pod adds its own namespace and pod; the exporter's are renamed.
SCRAPE = 'job="gpu",namespace="gpu-monitoring",pod="gpu-exporter-abcde"'


def _promtool_test(tmp_path: Path, rules: str, series: list[tuple[str, str]], expect: list) -> str:
    (tmp_path / "rules.yml").write_text(rules)
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": expect,
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    result = subprocess.run(
        [_promtool(), "test", "rules", str(tmp_path / "test.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout + result.stderr if result.returncode else ""


def test_exported_pod_labels_bill_the_workload_pod_not_the_exporter(tmp_path: Path) -> None:
    inputs = rule_inputs(label_prefix="exported_", team_source="kube_pod_labels")
    rules = render_rules(PRICING, inputs=inputs)
    series = [
        (f"gpu_info{{{GPU},{SCRAPE}}}", "1x5"),
        (
            f'gpu_allocation_info{{{GPU},{SCRAPE},exported_namespace="ml",'
            'exported_pod="train-0",exported_container="main"}',
            "1x5",
        ),
        # Teams from kube-state-metrics (two replicas: counted once).
        (
            'kube_pod_labels{instance="ksm-0",namespace="ml",pod="train-0",label_team="vision"}',
            "1x5",
        ),
        (
            'kube_pod_labels{instance="ksm-1",namespace="ml",pod="train-0",label_team="vision"}',
            "1x5",
        ),
    ]
    expect = [
        {
            "expr": "namespace:gpu_cost_dollars_per_hour:sum",
            "eval_time": "2m",
            "exp_samples": [
                {"labels": 'namespace:gpu_cost_dollars_per_hour:sum{namespace="ml"}', "value": 8.0}
            ],
        },
        {
            "expr": "team:gpu_cost_dollars_per_hour:sum",
            "eval_time": "2m",
            "exp_samples": [
                {"labels": 'team:gpu_cost_dollars_per_hour:sum{team="vision"}', "value": 8.0}
            ],
        },
    ]
    assert _promtool_test(tmp_path, rules, series, expect) == ""


def test_pods_missing_from_kube_pod_labels_still_pay_without_a_team(tmp_path: Path) -> None:
    rules = render_rules(PRICING, inputs=rule_inputs(team_source="kube_pod_labels"))
    series = [
        (f"gpu_info{{{GPU}}}", "1x5"),
        (f'gpu_allocation_info{{{GPU},namespace="ml",pod="new-0",container="main"}}', "1x5"),
    ]
    expect = [
        {
            "expr": "team:gpu_cost_dollars_per_hour:sum",
            "eval_time": "2m",
            "exp_samples": [{"labels": "team:gpu_cost_dollars_per_hour:sum", "value": 8.0}],
        },
    ]
    assert _promtool_test(tmp_path, rules, series, expect) == ""


def test_team_source_and_source_come_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "analytics.yaml"
    config.write_text("source: dcgm\nhonor_labels: false\n")
    loaded = load_config(config, env={})
    assert loaded.teams_from == "kube_pod_labels"  # DCGM series carry no pod labels
    assert loaded.rule_inputs().allocations == "pod:gpu_allocation_info:dcgm"
    overridden = load_config(config, env={"GPU_ANALYTICS_TEAM_SOURCE": "pod_label"})
    assert overridden.teams_from == "pod_label"
    config.write_text("team_source: kube-pod-labels\n")
    with pytest.raises(ConfigError, match=r"team_source: unknown team source .*kube_pod_labels"):
        load_config(config, env={})


def test_rule_ranges_stop_a_millisecond_short_of_the_interval() -> None:
    assert interval_range("1m") == "59999ms"
    assert interval_range("1m30s") == "89999ms"
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        interval_range("1 minute")
