"""End to end: simulated GPU -> real Prometheus -> real Alertmanager -> webhook, and back.

A one-node fleet runs two L4s: GPU 0 serves at 50% and overheats (92 °C) for 18 s shortly
after start; GPU 1, held by team nlp's notebook, goes idle for 24 s (an idle spell the fleet
schedules, found ahead of time) and then busy again. Prometheus evaluates the pricing rules and
the GPU rules and alerts generated from the values with short windows and `for`s, and sends
to an Alertmanager configured from examples/alertmanager.yml (its webhook URLs pointed at this
test, its waits shortened). The test's webhook receives each alert with the labels and
annotations the rules give it, from the receiver the example routes it to, and then its
resolved notification once the GPU cools or gets busy.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from exporter.simulator.fleet import parse_fleet
from tests.conftest import REPO_ROOT
from tests.integration.monitoring_stack import (
    Notification,
    WebhookReceiver,
    alertmanager,
    rule_variant,
    webhook_receiver,
)

pytestmark = pytest.mark.integration

EXAMPLE = REPO_ROOT / "examples" / "alertmanager.yml"
NODE = "e2e-node"
IDLE_WINDOW = 6.0
OVERHEAT_AT, OVERHEAT_UNTIL = 12.0, 30.0
SPELL = 24.0
OVERRIDES: dict[str, Any] = {
    "recording_interval": "2s",
    "idle": {"window": f"{IDLE_WINDOW:g}s", "threshold": 0.05, "namespace_thresholds": None},
    "alerts": {"GPUHighTemperature": {"for": "2s"}, "GPUAllocatedIdle": {"for": "2s"}},
}


def _fleet(idle_every: float) -> dict[str, Any]:
    steady = {
        "pattern": "inference",
        "base": 50,
        "amplitude": 0,
        "noise": 0,
        "burst_probability": 0,
        "idle_probability": 0,
    }
    spells = {
        **steady,
        "idle_every": f"{idle_every:g}s",
        "idle_probability": 1,
        "idle_length": f"{SPELL:g}s",
        "memory": 0.3,
    }
    return {
        "seed": 7,
        "nodes": [
            {
                "name": NODE,
                "gpus": [{"model": "L4", "workload": steady}, {"model": "L4", "workload": spells}],
                "pods": [
                    {
                        "name": "serve-0",
                        "namespace": "ml",
                        "labels": {"team": "vision"},
                        "containers": [
                            {"name": "server", "devices": [0], "processes": [{"command": "vllm"}]}
                        ],
                    },
                    {
                        "name": "notebook-0",
                        "namespace": "notebooks",
                        "labels": {"team": "nlp"},
                        "containers": [
                            {
                                "name": "jupyter",
                                "devices": [1],
                                "processes": [{"command": "python3"}],
                            }
                        ],
                    },
                ],
                "faults": [
                    {
                        "gpu": 0,
                        "kind": "overheat",
                        "at": f"{OVERHEAT_AT:g}s",
                        "until": f"{OVERHEAT_UNTIL:g}s",
                        "temperature": 92,
                    }
                ],
            }
        ],
    }


def _fleet_with_a_spell_soon(now: float) -> tuple[dict[str, Any], float, float]:
    """A fleet whose GPU 1 is busy now and idle for one spell starting 20-40 s from now."""
    for idle_every in range(160, 1200):
        data = _fleet(idle_every)
        fleet = parse_fleet(data, "e2e fleet")
        spells = fleet.idle_spells(NODE, 1, None, now - 30, now + 120)
        if len(spells) == 1 and now + 20 <= spells[0][0] <= now + 40:
            start, end = spells[0]
            if end - start == SPELL:
                return data, start, end
    raise AssertionError("no idle_every puts an idle spell 20-40 s from now")


def _alertmanager_config(webhook: str) -> dict[str, Any]:
    """examples/alertmanager.yml with every receiver posting here, and short waits."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{webhook}/{receiver['name']}"

    def shorten(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    return dict(config)


@dataclass
class EndToEnd:
    webhook: WebhookReceiver
    exporter_started: float
    spell: tuple[float, float]


@pytest.fixture(scope="module")
def e2e(
    module_prometheus: Any,
    module_exporter_process: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EndToEnd]:
    work = tmp_path_factory.mktemp("alertmanager-e2e")
    data, spell_start, spell_end = _fleet_with_a_spell_soon(time.time())
    fleet = work / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(data, sort_keys=False))
    rule_files = rule_variant(work / "rules", OVERRIDES, pricing_interval="2s")
    with contextlib.ExitStack() as stop:
        webhook = stop.enter_context(webhook_receiver())
        am = stop.enter_context(alertmanager(_alertmanager_config(webhook.url), work / "am"))
        started = time.time()
        exporter = module_exporter_process(
            NODE,
            fleet=fleet,
            extra_args=["--pod-labels", "team", "--collection-interval", "1s"],
        )
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am]}]}]},
            "scrape_configs": [
                {"job_name": "gpu-exporter", "static_configs": [{"targets": [exporter.address]}]}
            ],
        }
        server = module_prometheus(config=config)
        server.wait_for_targets_up(1, timeout=30)
        yield EndToEnd(webhook, started, (spell_start, spell_end))


def _is(name: str, status: str, receiver: str) -> Any:
    def match(note: Notification, alert: dict[str, Any]) -> bool:
        return (
            alert["labels"].get("alertname") == name
            and alert["status"] == status
            and note.receiver == receiver
        )

    return match


def test_overheating_gpu_alerts_the_platform_and_resolves_when_it_cools(e2e: EndToEnd) -> None:
    note, alert = e2e.webhook.wait_for(
        _is("GPUHighTemperature", "firing", "gpu-platform"), timeout=60
    )
    assert note.path == "/gpu-platform"
    labels = alert["labels"]
    assert {
        k: labels[k] for k in ("alertname", "severity", "component", "node", "gpu", "model")
    } == {
        "alertname": "GPUHighTemperature",
        "severity": "warning",
        "component": "gpu-hardware",
        "node": NODE,
        "gpu": "0",
        "model": "NVIDIA L4",
    }
    annotations = alert["annotations"]
    assert annotations["summary"] == f"GPU 0 on {NODE} is above 85 °C"
    assert annotations["description"] == (
        f"GPU 0 (NVIDIA L4) on node {NODE} is at 92 °C, above 85 °C for 2s."
    )
    assert annotations["runbook_url"].endswith("docs/runbook.md#gpuhightemperature")
    # Quiet until the GPU overheated and stayed hot for `for`.
    fired_at = _parse_time(alert["startsAt"])
    assert fired_at >= e2e.exporter_started + OVERHEAT_AT
    _, resolved = e2e.webhook.wait_for(
        _is("GPUHighTemperature", "resolved", "gpu-platform"), timeout=60
    )
    assert resolved["labels"] == labels
    assert _parse_time(resolved["endsAt"]) >= e2e.exporter_started + OVERHEAT_UNTIL


def test_idle_gpu_alerts_its_team_and_resolves_when_busy(e2e: EndToEnd) -> None:
    start, end = e2e.spell
    note, alert = e2e.webhook.wait_for(
        _is("GPUAllocatedIdle", "firing", "team-nlp"), timeout=end - time.time() + 30
    )
    assert note.path == "/team-nlp"
    labels = alert["labels"]
    assert {
        k: labels[k] for k in ("alertname", "severity", "namespace", "pod", "team", "node", "gpu")
    } == {
        "alertname": "GPUAllocatedIdle",
        "severity": "warning",
        "namespace": "notebooks",
        "pod": "notebook-0",
        "team": "nlp",
        "node": NODE,
        "gpu": "1",
    }
    assert alert["annotations"]["summary"] == "Pod notebooks/notebook-0 holds an idle GPU"
    assert alert["annotations"]["description"] == (
        f"Pod notebooks/notebook-0 holds 1 GPU-equivalents on GPU 1 (NVIDIA L4) on node {NODE} "
        f"that stayed below the idle threshold for {IDLE_WINDOW:g}s."
    )
    assert alert["annotations"]["runbook_url"].endswith("docs/runbook.md#gpuallocatedidle")
    # Quiet until the GPU had been idle for the whole window.
    assert _parse_time(alert["startsAt"]) >= start + IDLE_WINDOW
    _, resolved = e2e.webhook.wait_for(
        _is("GPUAllocatedIdle", "resolved", "team-nlp"), timeout=end - time.time() + 30
    )
    assert resolved["labels"] == labels
    assert _parse_time(resolved["endsAt"]) >= end
    # The busy GPU of team vision was never reported idle.
    for note in e2e.webhook.notifications:
        for other in note.payload["alerts"]:
            if other["labels"]["alertname"] == "GPUAllocatedIdle":
                assert other["labels"]["pod"] == "notebook-0"


def _parse_time(text: str) -> float:
    """Alertmanager's RFC 3339 timestamps (nanoseconds, Z) as unix seconds."""
    head, _, rest = text.partition(".")
    fraction = rest.rstrip("Z")[:6] if rest else "0"
    stamp = dt.datetime.strptime(head.rstrip("Z"), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    return stamp.timestamp() + float(f"0.{fraction}")


# -- the example configuration itself -------------------------------------------------------------


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("amtool")
    if binary is None:
        pytest.fail("amtool not found: run `make test`, which installs Alertmanager", pytrace=False)
    return subprocess.run([binary, *args], capture_output=True, text=True, check=False)


def test_example_config_passes_amtool_check_config() -> None:
    result = _amtool("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["severity=critical", "alertname=GPUUnavailable"], "gpu-oncall"),
        (
            ["severity=critical", "alertname=GPUTeamOverBudget", "team=vision"],
            "gpu-oncall,team-vision",
        ),
        (["severity=warning", "alertname=GPUAllocatedIdle", "team=nlp"], "team-nlp"),
        (["severity=warning", "alertname=GPUAllocatedIdle", "team=data"], "team-default"),
        (["severity=warning", "alertname=GPUHighTemperature"], "gpu-platform"),
        (["severity=info", "alertname=GPUPowerThrottling"], "gpu-platform-low"),
    ],
)
def test_example_config_routes_by_severity_and_team(labels: list[str], receivers: str) -> None:
    result = _amtool("config", "routes", "test", f"--config.file={EXAMPLE}", *labels)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == receivers


def test_example_receivers_keep_slack_teams_and_pagerduty_as_comments() -> None:
    text = EXAMPLE.read_text()
    for integration in ("slack_configs:", "msteams_configs:", "pagerduty_configs:"):
        assert f"# {integration}" in text, integration
    assert "hooks.slack.com" not in text and "routing_key:" not in text, "no secrets in the file"


def test_alert_routing_labels_exist_on_the_alerts() -> None:
    """The example routes on severity and team; the alerts carry them."""
    alerts = yaml.safe_load((REPO_ROOT / "rules" / "gpu-alerts.yml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    assert all("severity" in r["labels"] for r in rules)
    team_alerts = {r["alert"] for r in rules if "team" in r["expr"]}
    assert {"GPUAllocatedIdle", "GPUTeamOverBudget"} <= team_alerts
