"""The Helm chart (helm/k8s-gpu-monitor), rendered and linted by Helm's own Go SDK.

Every variant is rendered with ``helm_python`` (Helm's Go SDK in a wheel), linted, and every
object it renders is validated against the Kubernetes 1.28 to 1.31 schemas
(``kubernetes-validate``) and, for the prometheus-operator objects, against the operator's CRD
schemas (npm ``@kubernetes-models/prometheus-operator``, run by ``tests/helm/validate-crds.mjs``;
``make crd-schemas`` installs it). The tests also hold the chart to what docs/deployment.md says
the exporter needs, to the exporter's real flags and the analytics' real config loader, to the
rule files and dashboards it ships (one source: symlinks into rules/ and dashboards/), and read
the Dockerfile for the properties that cannot be built here.
"""

from __future__ import annotations

import ast
import base64
import copy
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from analytics.config import load_config, read_api_tokens
from analytics.pricing import parse_pricing, render_rules
from exporter.collectors import OPTIONAL_COLLECTORS
from exporter.main import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "k8s-gpu-monitor"
FIXTURES = REPO_ROOT / "tests" / "helm"
RELEASE = "gpu"
NAMESPACE = "gpu-monitoring"
KUBE_VERSIONS = ("1.28.0", "1.29.0", "1.30.0", "1.31.0")
OPERATOR_GROUP = "monitoring.coreos.com"
CRD_SCHEMAS = Path(
    os.environ.get("K8S_GPU_MONITOR_CRD_SCHEMAS", REPO_ROOT / ".cache" / "crd-schemas")
)
OPERATOR_PACKAGE = CRD_SCHEMAS / "node_modules" / "@kubernetes-models" / "prometheus-operator"

ALL_COLLECTORS = list(OPTIONAL_COLLECTORS)
NO_PROCESS = [name for name in ALL_COLLECTORS if name != "process"]

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-service-monitor": {"monitoring": {"kind": "none"}},
    "pod-monitor": {"monitoring": {"kind": "podMonitor"}},
    "prometheus-annotations": {
        "monitoring": {"kind": "annotations"},
        "prometheusRule": {"enabled": False},
    },
    "extra-pod-labels": {"exporter": {"podLabels": ["team", "app", "project"]}},
    "custom-node-selector": {
        "exporter": {
            "nodeSelector": {"gpu-pool": "h100"},
            "gpuNodeAffinity": {"enabled": False},
        }
    },
    "process-collector-off": {"exporter": {"collectors": NO_PROCESS}},
    "everything-on": {
        "commonLabels": {"cost-center": "platform"},
        "imagePullSecrets": [{"name": "regcred"}],
        "exporter": {
            "image": {"digest": "sha256:" + "a" * 64},
            "runtimeClassName": "nvidia",
            "priorityClassName": "system-node-critical",
            "gpuResources": ["example.com/gpu"],
            "hostPID": False,
            "podAnnotations": {"example.com/owner": "platform"},
            "podExtraLabels": {"tier": "monitoring"},
            "updateStrategy": {"maxUnavailable": 0, "maxSurge": 1},
            "extraEnv": [{"name": "GPU_EXPORTER_LOG_LEVEL", "value": "debug"}],
        },
        "analytics": {
            "auth": {"tokens": ["token-one", "token-two"]},
            "pricing": {"models": {"NVIDIA L4": 0.8}, "shared_gpu_split": "usage"},
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [{"host": "gpu.example.com"}],
                "tls": [{"hosts": ["gpu.example.com"], "secretName": "gpu-analytics-tls"}],
            },
            "networkPolicy": {
                "enabled": True,
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
                        }
                    }
                ],
                "egress": {
                    "enabled": True,
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                            }
                        }
                    ],
                },
            },
            "extraEnv": [{"name": "GPU_ANALYTICS_REFRESH_SECONDS", "value": "120"}],
        },
        "prometheusRule": {
            "pricingRules": render_rules(
                parse_pricing({"models": {"NVIDIA L4": 0.8}, "shared_gpu_split": "usage"})
            )
        },
        "dashboards": {"namespace": "monitoring", "annotations": {"grafana_folder": "GPU"}},
    },
    "existing-token-secret": {
        "analytics": {"auth": {"existingSecret": "gpu-api-tokens", "existingSecretKey": "t.txt"}}
    },
}


# --- rendering --------------------------------------------------------------------------------


@functools.cache
def _chart(path: Path = CHART) -> helm_python.Chart:
    return helm_python.Chart.load(str(path))


def _objects_of(manifests: dict[str, str]) -> list[dict[str, Any]]:
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@functools.cache
def _render_variant(variant: str) -> tuple[dict[str, str], tuple[dict[str, Any], ...]]:
    manifests = _chart().render(VARIANTS[variant], name=RELEASE, namespace=NAMESPACE)
    return manifests, tuple(_objects_of(manifests))


def render(variant: str) -> list[dict[str, Any]]:
    """The objects the chart renders for a variant (fresh copies; tests may change them)."""
    return copy.deepcopy(list(_render_variant(variant)[1]))


def notes(variant: str) -> str:
    manifests = _render_variant(variant)[0]
    return next(text for name, text in manifests.items() if name.endswith("NOTES.txt"))


def only(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = of_kind(objects, kind, component)
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def of_kind(
    objects: list[dict[str, Any]], kind: str, component: str | None = None
) -> list[dict[str, Any]]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind
        and (
            component is None
            or obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def exporter_args(objects: list[dict[str, Any]]) -> list[str]:
    return list(container(only(objects, "DaemonSet", "exporter"))["args"])


def parse_exporter_args(args: list[str]) -> Any:
    """The DaemonSet's args through the exporter's own parser ($(NODE_NAME) as the kubelet
    expands it)."""
    return build_parser().parse_args([arg.replace("$(NODE_NAME)", "gpu-node-1") for arg in args])


def mounts(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(workload).get("volumeMounts", [])}


def volumes(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}


def rule_files() -> list[Path]:
    """The rule files the chart ships: rules/*.yml and *.yaml, not rules/tests/."""
    return sorted([*REPO_ROOT.glob("rules/*.yml"), *REPO_ROOT.glob("rules/*.yaml")])


def dashboard_files(root: Path = REPO_ROOT) -> list[Path]:
    return sorted((root / "dashboards").glob("*.json"))


# --- loading and linting ----------------------------------------------------------------------


def test_chart_reads_rules_dashboards_and_pricing_through_symlinks() -> None:
    files = {entry["name"] for entry in _chart().files}
    for path in rule_files():
        assert f"files/rules/{path.name}" in files
    for path in dashboard_files():
        assert f"files/dashboards/{path.name}" in files
    assert "files/pricing.yaml" in files
    assert not any(name.startswith("files/rules/tests/") for name in files)
    for link, target in [
        ("rules", "../../../rules"),
        ("dashboards", "../../../dashboards"),
        ("pricing.yaml", "../../../examples/pricing.yaml"),
    ]:
        path = CHART / "files" / link
        assert path.is_symlink() and os.readlink(path) == target, f"{path} must link {target}"


def test_dashboards_directory_exists_for_the_symlink() -> None:
    # Helm's loader fails on a dangling symlink, and git keeps no empty directories.
    assert (REPO_ROOT / "dashboards").is_dir(), (
        "dashboards/ is missing: helm/k8s-gpu-monitor/files/dashboards links to it; commit at "
        "least one file there (a dashboard, or dashboards/.gitkeep)"
    )


@pytest.mark.parametrize("kube_version", ["v1.28.0", "v1.31.0"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_reports_no_errors_or_warnings(variant: str, kube_version: str) -> None:
    report = helm_python.lint(
        str(CHART), VARIANTS[variant], namespace=NAMESPACE, kube_version=kube_version
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_the_schema_accepts_the_default_values() -> None:
    _chart().validate_schema({})
    assert _chart().values["exporter"]["enabled"] is True


# --- Kubernetes and prometheus-operator schemas -----------------------------------------------


def test_the_kubernetes_versions_are_shipped_by_kubernetes_validate() -> None:
    shipped = set(kubernetes_validate.utils.all_versions())
    assert set(KUBE_VERSIONS) <= shipped, sorted(shipped)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_validates_against_kubernetes(variant: str, kube_version: str) -> None:
    failures = []
    for obj in render(variant):
        if obj["apiVersion"].split("/")[0] == OPERATOR_GROUP:
            continue  # CRDs: test_monitoring_objects_validate_against_the_operator_crds
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}")
    assert failures == []


def _operator_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for variant in sorted(VARIANTS):
        for obj in render(variant):
            if obj["apiVersion"].split("/")[0] == OPERATOR_GROUP:
                yield variant, obj


def test_monitoring_objects_validate_against_the_operator_crds() -> None:
    if not OPERATOR_PACKAGE.is_dir():
        pytest.fail(
            f"{OPERATOR_PACKAGE} is missing: run `make crd-schemas` (npm-installs "
            "@kubernetes-models/prometheus-operator, the prometheus-operator CRD schemas)"
        )
    node = shutil.which("node")
    assert node, "node is missing: run `make crd-schemas` (installs Node.js and npm)"
    labelled = list(_operator_objects())
    kinds = {obj["kind"] for _, obj in labelled}
    assert kinds == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    done = subprocess.run(
        [node, str(FIXTURES / "validate-crds.mjs"), str(CRD_SCHEMAS / "node_modules")],
        input=json.dumps([obj for _, obj in labelled]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == len(labelled)
    failures = [
        f"{variant}: {r['kind']}/{r['name']}: {r['error']}"
        for (variant, _), r in zip(labelled, results, strict=True)
        if r["error"]
    ]
    assert failures == []


def test_the_crd_validator_rejects_a_broken_object() -> None:
    """The validator is not a rubber stamp: wrong types and missing fields fail."""
    if not OPERATOR_PACKAGE.is_dir():
        pytest.fail(f"{OPERATOR_PACKAGE} is missing: run `make crd-schemas`")
    broken = [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "broken"},
            "spec": {"selector": {}, "endpoints": [{"port": 9400, "honorLabels": "yes"}]},
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "broken"},
            "spec": {"groups": [{"rules": [{"record": "a:b"}]}]},
        },
    ]
    done = subprocess.run(
        ["node", str(FIXTURES / "validate-crds.mjs"), str(CRD_SCHEMAS / "node_modules")],
        input=json.dumps(broken),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    errors = [r["error"] or "" for r in json.loads(done.stdout)]
    assert "honorLabels must be boolean" in errors[0] and "port must be string" in errors[0]
    assert "required property name" in errors[1] and "required property expr" in errors[1]


# The endpoint fields the chart may set: the CRD validators do not reject unknown fields, so a
# misspelt one ("honorlabels") would be silently dropped by the operator.
_ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings"}


@pytest.mark.parametrize("variant", ["default", "pod-monitor", "everything-on"])
def test_scrape_objects_have_what_the_operator_needs(variant: str) -> None:
    objects = render(variant)
    kind = "PodMonitor" if variant == "pod-monitor" else "ServiceMonitor"
    endpoints_key = "podMetricsEndpoints" if kind == "PodMonitor" else "endpoints"
    jobs = {"exporter": "gpu-exporter", "analytics": "gpu-analytics"}
    for component, job in jobs.items():
        monitor = only(objects, kind, component)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        [endpoint] = spec[endpoints_key]
        assert set(endpoint) <= _ENDPOINT_FIELDS
        assert endpoint["honorLabels"] is True
        assert {"action": "replace", "targetLabel": "job", "replacement": job} in endpoint[
            "relabelings"
        ]
        # The selector must match the pods (PodMonitor) or the Service (ServiceMonitor), and
        # the named port must exist there.
        workload = only(objects, "DaemonSet" if component == "exporter" else "Deployment")
        if kind == "PodMonitor":
            target_labels = workload["spec"]["template"]["metadata"]["labels"]
            ports = {p["name"] for p in container(workload)["ports"]}
        else:
            service = only(objects, "Service", component)
            target_labels = service["metadata"]["labels"]
            ports = {p["name"] for p in service["spec"]["ports"]}
        assert spec["selector"]["matchLabels"].items() <= target_labels.items()
        assert endpoint["port"] in ports
    assert of_kind(objects, "PodMonitor" if kind == "ServiceMonitor" else "ServiceMonitor") == []


def test_without_a_service_monitor_nothing_needs_the_operator_for_scraping() -> None:
    objects = render("no-service-monitor")
    assert of_kind(objects, "ServiceMonitor") == of_kind(objects, "PodMonitor") == []
    assert of_kind(objects, "Service", "exporter") == []
    for workload in (only(objects, "DaemonSet"), only(objects, "Deployment")):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert not any(key.startswith("prometheus.io/") for key in annotations)
    assert "add scrape configs" in notes("no-service-monitor")


def test_plain_prometheus_annotations_mark_both_pods_for_scraping() -> None:
    objects = render("prometheus-annotations")
    assert of_kind(objects, "ServiceMonitor") == of_kind(objects, "PodMonitor") == []
    assert of_kind(objects, "PrometheusRule") == []
    for workload, port in (
        (only(objects, "DaemonSet"), "9400"),
        (only(objects, "Deployment"), "8080"),
    ):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"
    config = yaml.safe_load(only(objects, "ConfigMap", "analytics")["data"]["config.yaml"])
    # The kubernetes-pods job has no honor_labels: pod labels arrive renamed.
    assert config["honor_labels"] is False
    assert config["exporter_up_selector"] == 'up{pod=~"gpu-k8s-gpu-monitor-exporter-.*"}'


# --- the exporter DaemonSet -------------------------------------------------------------------


def test_exporter_runs_only_on_gpu_nodes_and_tolerates_gpu_taints() -> None:
    daemonset = only(render("default"), "DaemonSet", "exporter")
    pod = daemonset["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    keys = {expr["key"] for term in terms for expr in term["matchExpressions"]}
    assert {"nvidia.com/gpu.present", "feature.node.kubernetes.io/pci-10de.present"} <= keys
    assert "nodeSelector" not in pod
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_a_custom_node_selector_replaces_the_gpu_affinity() -> None:
    pod = only(render("custom-node-selector"), "DaemonSet")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu-pool": "h100"}
    assert "affinity" not in pod


def test_exporter_has_exactly_the_privileges_docs_deployment_lists() -> None:
    daemonset = only(render("default"), "DaemonSet", "exporter")
    pod = daemonset["spec"]["template"]["spec"]
    main = container(daemonset)
    # hostPID for per-process attribution; nothing else from the host but two read-only mounts.
    assert pod["hostPID"] is True
    assert "hostNetwork" not in pod and "hostIPC" not in pod
    ctx = main["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in ctx["capabilities"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["privileged"] is False
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    host_paths = {
        name: volume["hostPath"]["path"]
        for name, volume in volumes(daemonset).items()
        if "hostPath" in volume
    }
    assert host_paths == {
        "pod-resources": "/var/lib/kubelet/pod-resources",
        "host-proc": "/proc",
    }
    for name in host_paths:
        assert mounts(daemonset)[name]["readOnly"] is True
    env = {e["name"]: e for e in main["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_MIG_MONITOR_DEVICES"]["value"] == "all"
    assert "runtimeClassName" not in pod
    assert pod["automountServiceAccountToken"] is True


def test_exporter_args_are_the_exporters_real_flags() -> None:
    args = exporter_args(render("default"))
    parsed = parse_exporter_args(args)
    assert parsed.node == "gpu-node-1"
    assert parsed.listen == ("0.0.0.0", 9400)
    assert parsed.collectors == tuple(ALL_COLLECTORS)
    assert parsed.kubelet_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert parsed.procfs == "/host/proc"
    assert parsed.pod_labels == ("team",)
    assert parsed.collection_interval == 5.0
    daemonset = only(render("default"), "DaemonSet")
    assert mounts(daemonset)["pod-resources"]["mountPath"] == str(
        Path(parsed.kubelet_socket).parent
    )
    assert mounts(daemonset)["host-proc"]["mountPath"] == parsed.procfs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exporter_args_parse_in_every_variant(variant: str) -> None:
    parse_exporter_args(exporter_args(render(variant)))


def test_extra_pod_labels_reach_the_exporter() -> None:
    parsed = parse_exporter_args(exporter_args(render("extra-pod-labels")))
    assert parsed.pod_labels == ("team", "app", "project")


def test_process_collector_off_drops_host_pid_and_proc() -> None:
    daemonset = only(render("process-collector-off"), "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    parsed = parse_exporter_args(exporter_args(render("process-collector-off")))
    assert "process" not in parsed.collectors
    assert "hostPID" not in pod
    assert "host-proc" not in volumes(daemonset) and "host-proc" not in mounts(daemonset)
    assert not any(arg.startswith("--procfs") for arg in container(daemonset)["args"])
    # Allocations still need the kubelet socket and the informer.
    assert "pod-resources" in volumes(daemonset)
    assert pod["automountServiceAccountToken"] is True


def test_without_attribution_the_exporter_gets_no_api_access() -> None:
    values = {"exporter": {"collectors": ["device", "ecc", "mig", "xid"]}}
    objects = _objects_of(_chart().render(values, name=RELEASE, namespace=NAMESPACE))
    daemonset = only(objects, "DaemonSet")
    assert daemonset["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert of_kind(objects, "ClusterRole") == of_kind(objects, "ClusterRoleBinding") == []
    assert set(volumes(daemonset)) == {"tmp"}


def test_exporter_resources_probes_priority_and_rollout() -> None:
    daemonset = only(render("default"), "DaemonSet")
    main = container(daemonset)
    # docs/deployment.md "Resources", from docs/benchmarks.md.
    assert main["resources"]["requests"] == {"cpu": "50m", "memory": "96Mi"}
    assert main["resources"]["limits"]["memory"] == "192Mi"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    pod = daemonset["spec"]["template"]["spec"]
    priority = only(render("default"), "PriorityClass")
    assert pod["priorityClassName"] == priority["metadata"]["name"]
    assert 0 < priority["value"] < 1_000_000_000
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0},
    }
    assert pod["terminationGracePeriodSeconds"] <= 30


def test_everything_on_sets_runtime_class_existing_priority_and_pinned_image() -> None:
    objects = render("everything-on")
    pod = only(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["priorityClassName"] == "system-node-critical"
    assert of_kind(objects, "PriorityClass") == []
    assert container(only(objects, "DaemonSet"))["image"].endswith("@sha256:" + "a" * 64)
    # hostPID off: the read-only /proc mount still maps processes (docs/deployment.md).
    assert "hostPID" not in pod
    assert "host-proc" in volumes(only(objects, "DaemonSet"))
    assert "hostPID is off" in notes("everything-on")


def test_cluster_role_is_exactly_what_the_pod_informer_uses() -> None:
    objects = render("default")
    role = only(objects, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    binding = only(objects, "ClusterRoleBinding")
    account = only(objects, "ServiceAccount", "exporter")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    daemonset = only(objects, "DaemonSet")
    assert (
        daemonset["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    )
    # The exporter's only API request: list and watch of /api/v1/pods (exporter/pods.py).
    paths = set()
    for source in (REPO_ROOT / "exporter").rglob("*.py"):
        if "simulator" in source.parts:
            continue
        paths |= set(re.findall(r'resource_path="([^"]+)"', source.read_text()))
    assert paths == {"/api/v1/pods"}


# --- the analytics Deployment -----------------------------------------------------------------


def test_analytics_runs_non_root_read_only_with_probes() -> None:
    objects = render("default")
    deployment = only(objects, "Deployment", "analytics")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    ctx = main["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["resources"]["requests"] and main["resources"]["limits"]
    assert all("hostPath" not in volume for volume in volumes(deployment).values())
    service = only(objects, "Service", "analytics")
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    pdb = only(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert of_kind(objects, "NetworkPolicy") == of_kind(objects, "Ingress") == []


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def _write_mounted_files(objects: list[dict[str, Any]], root: Path) -> Path:
    """Write the ConfigMap and Secret where the Deployment mounts them, under ``root``."""
    deployment = only(objects, "Deployment", "analytics")
    by_volume = volumes(deployment)
    config_path = None
    for name, mount in mounts(deployment).items():
        volume = by_volume[name]
        target = root / mount["mountPath"].lstrip("/")
        if "configMap" in volume:
            configmap = only(objects, "ConfigMap", "analytics")
            assert volume["configMap"]["name"] == configmap["metadata"]["name"]
            target.mkdir(parents=True)
            for key, text in configmap["data"].items():
                (target / key).write_text(text)
            config_path = target / "config.yaml"
        elif "secret" in volume and of_kind(objects, "Secret"):
            secret = only(objects, "Secret")
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            target.mkdir(parents=True)
            for item in volume["secret"]["items"]:
                (target / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
    assert config_path is not None
    return config_path


def _load_rendered_config(objects: list[dict[str, Any]], root: Path) -> Any:
    config_path = _write_mounted_files(objects, root)
    # The files hold absolute in-pod paths: point them under root, as the mounts would.
    text = config_path.read_text().replace("/etc/gpu-analytics/", f"{root}/etc/gpu-analytics/")
    config_path.write_text(text)
    return load_config(config_path, env={})


def test_the_rendered_config_is_accepted_by_the_analytics(tmp_path: Path) -> None:
    objects = render("default")
    config = _load_rendered_config(objects, tmp_path)
    assert config.prometheus.url == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    assert config.listen_address == ("0.0.0.0", 8080)
    assert config.honor_labels is True
    assert config.up_selector == 'up{job="gpu-exporter"}'
    assert config.auth_enabled is False
    assert config.pricing_file is not None
    parse_pricing(yaml.safe_load(config.pricing_file.read_text()), str(config.pricing_file))
    deployment = only(objects, "Deployment")
    args = container(deployment)["args"]
    assert "--config=/etc/gpu-analytics/config/config.yaml" in args
    assert container(deployment)["ports"][0]["containerPort"] == config.listen_address[1]
    assert "WARNING: no API tokens" in notes("default")


def test_default_pricing_is_the_repositorys_example_pricing() -> None:
    configmap = only(render("default"), "ConfigMap", "analytics")
    example = (REPO_ROOT / "examples" / "pricing.yaml").read_text()
    assert configmap["data"]["pricing.yaml"].rstrip() == example.rstrip()


def test_tokens_from_values_become_a_secret_the_analytics_reads(tmp_path: Path) -> None:
    objects = render("everything-on")
    config = _load_rendered_config(objects, tmp_path)
    assert config.api_tokens == ("token-one", "token-two")
    assert read_api_tokens(config.api_tokens_file) == ("token-one", "token-two")
    pricing = config.pricing_file.read_text()
    assert yaml.safe_load(pricing) == {"models": {"NVIDIA L4": 0.8}, "shared_gpu_split": "usage"}
    assert "WARNING: no API tokens" not in notes("everything-on")


def test_an_existing_token_secret_is_mounted_and_not_created() -> None:
    objects = render("existing-token-secret")
    assert of_kind(objects, "Secret") == []
    tokens = volumes(only(objects, "Deployment"))["tokens"]["secret"]
    assert tokens["secretName"] == "gpu-api-tokens"
    assert tokens["items"] == [{"key": "t.txt", "path": "tokens"}]
    config = yaml.safe_load(only(objects, "ConfigMap", "analytics")["data"]["config.yaml"])
    assert config["api_tokens_file"] == "/etc/gpu-analytics/tokens/tokens"


def test_optional_network_policy_and_ingress() -> None:
    objects = render("everything-on")
    deployment = only(objects, "Deployment")
    policy = only(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 9090}
    ingress = only(objects, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {
        "name": only(objects, "Service", "analytics")["metadata"]["name"],
        "port": {"name": "http"},
    }


# --- rules and dashboards ---------------------------------------------------------------------


def test_prometheus_rules_equal_the_rule_files() -> None:
    files = rule_files()
    assert files, "rules/*.yml: no rule files found"
    rules = {
        r["metadata"]["annotations"]["k8s-gpu-monitor/source"]: r
        for r in of_kind(render("default"), "PrometheusRule")
    }
    assert len(rules) == len(files)
    for path in files:
        stem = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")
        rule = rules[f"rules/{stem}"]
        assert rule["spec"]["groups"] == yaml.safe_load(path.read_text())["groups"], path.name
        assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_every_rule_has_what_the_operator_requires() -> None:
    for rule in of_kind(render("default"), "PrometheusRule"):
        names = [group["name"] for group in rule["spec"]["groups"]]
        assert len(names) == len(set(names)), f"{rule['metadata']['name']}: duplicate groups"
        for group in rule["spec"]["groups"]:
            for entry in group["rules"]:
                assert isinstance(entry["expr"], str) and entry["expr"].strip()
                assert ("record" in entry) != ("alert" in entry)


def test_pricing_rules_from_values_replace_the_bundled_ones() -> None:
    rules = of_kind(render("everything-on"), "PrometheusRule")
    [pricing] = [
        r
        for r in rules
        if r["metadata"]["annotations"]["k8s-gpu-monitor/source"] == "rules/pricing"
    ]
    expected = yaml.safe_load(VARIANTS["everything-on"]["prometheusRule"]["pricingRules"])
    assert pricing["spec"]["groups"] == expected["groups"]
    assert len(rules) == len(rule_files())


def test_prometheus_rules_can_be_turned_off() -> None:
    assert of_kind(render("prometheus-annotations"), "PrometheusRule") == []


def _chart_copy_with_dashboards(tmp_path: Path, extra: list[Path]) -> Path:
    """The chart with its symlinks resolved, plus extra dashboards (fixtures stay in tests/)."""
    copy_root = tmp_path / "k8s-gpu-monitor"
    shutil.copytree(CHART, copy_root, symlinks=False)
    dashboards = copy_root / "files" / "dashboards"
    dashboards.mkdir(parents=True, exist_ok=True)
    for path in extra:
        shutil.copy(path, dashboards / path.name)
    return copy_root


def _assert_dashboards_equal_files(
    objects: list[dict[str, Any]], files: list[Path], namespace: str
) -> None:
    configmaps = {
        cm["metadata"]["annotations"]["k8s-gpu-monitor/source"]: cm
        for cm in of_kind(objects, "ConfigMap", "dashboards")
    }
    assert set(configmaps) == {f"dashboards/{path.name}" for path in files}
    for path in files:
        configmap = configmaps[f"dashboards/{path.name}"]
        assert configmap["data"] == {path.name: path.read_text()}, path.name
        json.loads(configmap["data"][path.name])
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["namespace"] == namespace


def test_each_dashboard_configmap_equals_its_json() -> None:
    _assert_dashboards_equal_files(render("default"), dashboard_files(), NAMESPACE)


def test_a_fixture_dashboard_becomes_a_sidecar_configmap(tmp_path: Path) -> None:
    fixtures = sorted((FIXTURES / "dashboards").glob("*.json"))
    assert fixtures
    chart_copy = _chart_copy_with_dashboards(tmp_path, fixtures)
    values = VARIANTS["everything-on"]
    with helm_python.Chart.load(str(chart_copy)) as chart:
        objects = _objects_of(chart.render(values, name=RELEASE, namespace=NAMESPACE))
    files = sorted([*dashboard_files(), *fixtures], key=lambda p: p.name)
    _assert_dashboards_equal_files(objects, files, "monitoring")
    for configmap in of_kind(objects, "ConfigMap", "dashboards"):
        assert configmap["metadata"]["annotations"]["grafana_folder"] == "GPU"
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(configmap, version, strict=True)


# --- values.yaml and values.schema.json -------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"exporter": {"bogus": 1}}, "'bogus' not allowed"),
        ({"typo": True}, "'typo' not allowed"),
        ({"analytics": {"config": {"listen": ":9090"}}}, "'listen' not allowed"),
        ({"analytics": {"config": {"prometheus": {"uri": "http://p:9090"}}}}, "'uri' not allowed"),
        ({"exporter": {"hostPID": "yes"}}, "/exporter/hostPID"),
        ({"analytics": {"replicas": "2"}}, "/analytics/replicas"),
        ({"exporter": {"collectors": ["device", "gpu"]}}, "/exporter/collectors/1"),
        ({"exporter": {"podLabels": [f"label{i}" for i in range(11)]}}, "/exporter/podLabels"),
        ({"exporter": {"collectionInterval": "5 seconds"}}, "/exporter/collectionInterval"),
        ({"monitoring": {"kind": "serviceMonitors"}}, "/monitoring/kind"),
        ({"monitoring": {"exporter": {"interval": "15"}}}, "/monitoring/exporter/interval"),
        (
            {"analytics": {"pricing": {"models": {"NVIDIA L4": "cheap"}}}},
            "/analytics/pricing/models",
        ),
        ({"analytics": {"auth": {"tokens": ["has space"]}}}, "/analytics/auth/tokens/0"),
        ({"exporter": {"updateStrategy": {"maxUnavailable": "ten"}}}, "/exporter/updateStrategy"),
        ({"analytics": {"config": {"source": "nvml"}}}, "/analytics/config/source"),
    ],
)
def test_the_schema_rejects_bad_values_naming_the_key(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as raised:
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    message = str(raised.value)
    assert named in message, message
    with pytest.raises(helm_python.HelmValuesError):
        _chart().validate_schema(values)


def test_an_ingress_without_hosts_fails_with_a_clear_message() -> None:
    with pytest.raises(helm_python.HelmError, match=r"analytics\.ingress\.hosts"):
        _chart().render(
            {"analytics": {"ingress": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE
        )


def _key_line(lines: list[str], path: tuple[str, ...]) -> int:
    """The index of the line that declares the key at ``path`` in values.yaml."""
    start, indent = 0, -1
    for key in path:
        pattern = re.compile(rf"^(\s*){re.escape(key)}:(\s|$)")
        for index in range(start, len(lines)):
            match = pattern.match(lines[index])
            if match and len(match.group(1)) > indent:
                start, indent = index + 1, len(match.group(1))
                break
        else:
            raise AssertionError(f"{'.'.join(path)} not found in values.yaml")
    return start - 1


def _schema_keys(
    schema: dict[str, Any], values: Any, path: tuple[str, ...], root: dict[str, Any]
) -> Iterator[tuple[str, ...]]:
    """Every key of ``values`` that the schema declares (free-form maps are data, not keys)."""
    if "$ref" in schema:
        schema = root["definitions"][schema["$ref"].rsplit("/", 1)[1]]
    properties = schema.get("properties")
    if (
        not isinstance(values, dict)
        or not properties
        or schema.get("additionalProperties") is not False
    ):
        return
    for key, value in values.items():
        yield (*path, key)
        yield from _schema_keys(properties[key], value, (*path, key), root)


def test_every_key_in_values_yaml_has_a_comment() -> None:
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())
    uncommented = []
    keys = list(_schema_keys(schema, yaml.safe_load(text), (), schema))
    assert len(keys) > 100
    for path in keys:
        index = _key_line(lines, path)
        above = next(line for line in reversed(lines[:index]) if line.strip())
        if not above.strip().startswith("#") and "#" not in lines[index]:
            uncommented.append(".".join(path))
    assert uncommented == []


def test_notes_tell_the_user_where_to_look() -> None:
    text = notes("default")
    assert "kubectl -n gpu-monitoring get pods" in text
    assert "port-forward svc/gpu-k8s-gpu-monitor-analytics" in text
    assert "/api/v1/gpu/cost/analysis" in text
    assert "gpu_utilization_ratio" in text
    assert "grafana_dashboard=1" in text
    assert "hostPID" in text
    pricing_warning = "analytics.pricing is set but prometheusRule.pricingRules is not"
    assert pricing_warning not in text
    values = {"analytics": {"pricing": {"models": {"NVIDIA L4": 0.8}}}}
    manifests = _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    assert pricing_warning in next(t for n, t in manifests.items() if n.endswith("NOTES.txt"))


# --- Dockerfile -------------------------------------------------------------------------------


_INSTRUCTIONS = {
    "FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT",
    "CMD", "LABEL", "HEALTHCHECK", "STOPSIGNAL", "VOLUME", "SHELL", "ONBUILD",
}  # fmt: skip


def _dockerfile() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]]]:
    """ARG defaults before the first FROM, and each stage's instructions (heredocs skipped)."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    # Heredoc bodies (the script a RUN feeds to python) are data, not instructions.
    text = re.sub(r"<<'?(\w+)'?([^\n]*)\n.*?\n\1\n", r"\2\n", text, flags=re.S)
    text = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        assert instruction in _INSTRUCTIONS, f"not a Dockerfile instruction: {line}"
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), flags=re.I)
            assert match, f"every stage is named: FROM {rest}"
            current = stages.setdefault(match.group(2), [])
            current.append(("FROM", match.group(1)))
        elif current is None:
            assert instruction == "ARG", line
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.append((instruction, rest))
    return args, stages


def test_dockerfile_is_multi_stage_with_pinned_bases() -> None:
    args, stages = _dockerfile()
    assert {"exporter", "analytics"} <= set(stages) and len(stages) >= 4
    for name, instructions in stages.items():
        base = instructions[0][1]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        if base in stages:
            continue
        pinned = "@sha256:" in base or re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", base)
        assert pinned, f"stage {name}: base {base} is not pinned to a version or digest"


def _stage_chain(stages: dict[str, list[tuple[str, str]]], name: str) -> list[tuple[str, str]]:
    instructions = stages[name]
    parent = instructions[0][1]
    return (_stage_chain(stages, parent) if parent in stages else []) + instructions


@pytest.mark.parametrize(("target", "port"), [("exporter", "9400"), ("analytics", "8080")])
def test_final_images_are_non_root_without_build_tools(target: str, port: str) -> None:
    _, stages = _dockerfile()
    chain = _stage_chain(stages, target)
    users = [rest for instruction, rest in chain if instruction == "USER"]
    assert users, f"{target}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{target}: runs as {users[-1]}"
    runs = " ".join(rest for instruction, rest in chain if instruction == "RUN")
    for tool in ("apt-get", "apk", "gcc", "build-essential", "make ", "pip install", "pip wheel"):
        assert tool not in runs, f"{target}: final image runs {tool}"
    # The installers the base image ships are removed.
    assert "site-packages/pip " in runs + " " and "/usr/local/bin/pip*" in runs
    copies = [rest for instruction, rest in stages[target] if instruction == "COPY"]
    assert copies and all(rest.startswith("--from=") for rest in copies)
    assert ("EXPOSE", port) in stages[target]
    assert any(instruction == "ENTRYPOINT" for instruction, _ in stages[target])


def test_builder_stages_install_binary_wheels_only() -> None:
    _, stages = _dockerfile()
    for name in ("build-exporter", "build-analytics"):
        runs = [rest for instruction, rest in stages[name] if instruction == "RUN"]
        installs = [run for run in runs if "pip install" in run]
        assert installs and all(
            "--only-binary=:all:" in run or "--no-deps" in run for run in installs
        )
        assert any("pip uninstall --yes pip" in run for run in runs)


def _module_file(name: str) -> Path | None:
    path = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(source: Path, module: str) -> Iterator[str]:
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            yield base
            # `from package import module` imports that module too.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _third_party_imports_reachable_from(entry: str) -> set[str]:
    """Top-level third-party modules imported by ``entry`` and every project module it imports,
    lazily imported ones included (``--simulate`` runs in the image too)."""
    seen: set[str] = set()
    todo = [entry]
    third_party: set[str] = set()
    while todo:
        module = todo.pop()
        source = _module_file(module)
        if module in seen or source is None:
            continue
        seen.add(module)
        for name in _imports_of(source, module):
            top = name.split(".")[0]
            if top in {"exporter", "analytics"}:
                todo.append(name)
            elif top and top not in sys.stdlib_module_names:
                third_party.add(top)
    return third_party


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_exporter_image_installs_every_distribution_the_exporter_imports() -> None:
    _, stages = _dockerfile()
    [declared] = [rest for instruction, rest in stages["build-exporter"] if instruction == "ARG"]
    name, _, value = declared.partition("=")
    assert name == "EXPORTER_DISTRIBUTIONS"
    wanted = {_normalise(dist) for dist in value.strip('"').split()}
    # Those distributions and what they depend on.
    installed = set(wanted)
    for dist in wanted:
        for requirement in importlib.metadata.requires(dist) or ():
            if "extra ==" not in requirement:
                name = re.split(r"[<>=!~;\[ (]", requirement, maxsplit=1)[0]
                installed.add(_normalise(name))
    providers = importlib.metadata.packages_distributions()
    modules = _third_party_imports_reachable_from("exporter.main")
    assert {"pynvml", "prometheus_client", "grpc", "kubernetes"} <= modules
    missing = {
        module: providers.get(module)
        for module in modules
        if not {_normalise(d) for d in providers.get(module, [])} & installed
    }
    assert missing == {}
    # And every one of them is a dependency in pyproject.toml (the Dockerfile reads the ranges).
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    declared_names = {_normalise(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements}
    assert wanted <= declared_names


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    assert set(patterns) >= {"!pyproject.toml", "!README.md", "!exporter/", "!analytics/"}


# --- README -----------------------------------------------------------------------------------


def test_readme_has_an_install_section_with_a_values_example_and_an_upgrade_note() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert readme.index("make demo") < readme.index("## Install on a cluster")
    section = readme.split("## Install on a cluster", 1)[1].split("\n## ", 1)[0]
    assert "helm install" in section and "helm upgrade" in section
    assert "-f " in section or "--values" in section
    example = re.search(r"```yaml\n(.*?)```", section, flags=re.S)
    assert example, "a values example in a yaml block"
    _chart().validate_schema(yaml.safe_load(example.group(1)))
