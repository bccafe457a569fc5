"""GPU prices from a YAML file, turned into Prometheus recording rules.

Prometheus itself records the cost of every device, pod, namespace and team each rule interval,
so a 30-day report sums a few recorded series instead of re-joining raw device series. The same
`Pricing` also answers price questions in Python (`Pricing.device_price`, `Pricing.mig_price`),
so reports and tests can check the recorded values against it.

Run ``python -m analytics.pricing --pricing examples/pricing.yaml --out rules/pricing.yml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from analytics.sources import (
    DEVICE_LABELS,
    MIG_LABELS,
    SOURCES,
    TEAM_SOURCES,
    RuleInputs,
    default_team_source,
    rule_inputs,
)

#: Compute slices of a whole GPU in MIG mode (A100, H100, H200, B200): the default denominator.
MIG_SLICES = 7
SPLIT_MODES = ("even", "usage")
DEFAULT_TEAM_LABEL = "label_team"
DEFAULT_INTERVAL = "1m"
GROUP_NAME = "gpu-cost"

#: Recorded series; every value is in US dollars per hour.
DEVICE_PRICE = "device:gpu_price_dollars_per_hour"
MIG_PRICE = "mig:gpu_price_dollars_per_hour"
NODE_OVERRIDE = "node:gpu_price_override:info"
DEVICE_UNPRICED = "device:gpu_unpriced:info"
MIG_UNPRICED = "mig:gpu_unpriced:info"
POD_COST = "pod:gpu_cost_dollars_per_hour:allocated"
#: GPU-equivalents each pod holds: 1 per whole GPU, k/7 per MIG instance of k compute slices,
#: split between the pods sharing a device. Summed over time it gives GPU-hours.
POD_DEVICES = "pod:gpu_allocated_devices:share"
#: The report aggregates recorded from the pod series, and the labels each is summed by.
#: Every sum keeps `cluster` (empty with one cluster), so reports can also group by cluster.
AGGREGATE_LABELS = {
    "namespace": "cluster, namespace",
    "team": "cluster, team",
    "node": "cluster, node",
    "model": "cluster, model",
    # MIG instances only; the same profile costs more on a dearer model.
    "mig_profile": "cluster, model, mig_profile",
}
DEVICE_UNALLOCATED = "device:gpu_cost_dollars_per_hour:unallocated"
CLUSTER_ALLOCATED = "cluster:gpu_cost_dollars_per_hour:allocated"
CLUSTER_UNALLOCATED = "cluster:gpu_cost_dollars_per_hour:unallocated"
NODE_PRICE = "node:gpu_price_dollars_per_hour:sum"
MODEL_PRICE = "model:gpu_price_dollars_per_hour:sum"
CLUSTER_PRICE = "cluster:gpu_price_dollars_per_hour:sum"

#: Busy GPU-equivalents (POD_DEVICES times the held device's activity) and the part of
#: POD_DEVICES held while activity was measured: efficiency = utilized / measured.
POD_UTILIZED_DEVICES = "pod:gpu_utilized_devices:share"
POD_MEASURED_DEVICES = "pod:gpu_measured_devices:share"
#: The pod series summed per report aggregate (see `aggregated`).
POD_SERIES = (POD_COST, POD_DEVICES, POD_UTILIZED_DEVICES, POD_MEASURED_DEVICES)


def aggregated(pod_series: str, aggregate: str) -> str:
    """The recorded sum of a pod series by a report aggregate:
    `pod:gpu_cost_dollars_per_hour:allocated` by namespace is
    `namespace:gpu_cost_dollars_per_hour:sum`."""
    if aggregate not in AGGREGATE_LABELS or pod_series not in POD_SERIES:
        raise ValueError(f"no recorded sum of {pod_series} by {aggregate}")
    return f"{aggregate}:{pod_series.split(':')[1]}:sum"


NAMESPACE_COST = aggregated(POD_COST, "namespace")
TEAM_COST = aggregated(POD_COST, "team")
NODE_COST = aggregated(POD_COST, "node")
MODEL_COST = aggregated(POD_COST, "model")
MIG_PROFILE_COST = aggregated(POD_COST, "mig_profile")

DEVICE_BY = DEVICE_LABELS
MIG_BY = MIG_LABELS

_PROM_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_K8S_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_PROFILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")
#: "3g.40gb" -> 3 compute slices; "1c.3g.40gb" (a compute instance in a 3g GPU instance) -> 1.
_SLICES = re.compile(r"^(?:(\d+)c\.)?(\d+)g\.")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_TOP_KEYS = (
    "currency",
    "models",
    "default_price",
    "mig_profiles",
    "shared_gpu_split",
    "node_overrides",
    "team_label",
)


class PricingError(ValueError):
    """A pricing file that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class MigProfilePrice:
    """A per-profile override: a share of the parent GPU's price, or an absolute price."""

    share: float | None = None
    price: float | None = None


@dataclass(frozen=True)
class NodeOverride:
    """Prices on nodes whose labels match (spot, reserved); the first matching override wins.

    `prices` replaces the list price of the models it names; every other price on those nodes
    (other models, the default price, absolute MIG profile prices) is multiplied by `multiplier`.
    """

    name: str
    match: tuple[tuple[str, str], ...]
    multiplier: float = 1.0
    prices: tuple[tuple[str, float], ...] = ()

    def matches(self, node_labels: Mapping[str, str]) -> bool:
        """Whether a node with these `kube_node_labels` labels (label_* names) matches."""
        return all(node_labels.get(key) == value for key, value in self.match)


@dataclass(frozen=True)
class Pricing:
    """Validated prices; build it with `load_pricing` or `parse_pricing`."""

    models: tuple[tuple[str, float], ...] = ()
    default_price: float | None = None
    mig_profiles: tuple[tuple[str, MigProfilePrice], ...] = ()
    shared_gpu_split: str = "even"
    node_overrides: tuple[NodeOverride, ...] = ()
    team_label: str = DEFAULT_TEAM_LABEL
    currency: str = "USD"
    source: str = field(default="<memory>", compare=False)

    def override_for(self, node_labels: Mapping[str, str]) -> NodeOverride | None:
        """The first node override matching the node's `label_*` labels, if any."""
        return next((o for o in self.node_overrides if o.matches(node_labels)), None)

    def device_price(
        self, model: str, node_labels: Mapping[str, str] | None = None
    ) -> float | None:
        """$/h of a whole GPU of this model on a node with these labels; None when unpriced.

        Computed in the same order as the recording rules, so the floats agree exactly.
        """
        base = dict(self.models).get(model, self.default_price)
        override = self.override_for(node_labels or {})
        if override is None:
            return base
        own = dict(override.prices)
        if model in own:
            return own[model]
        return None if base is None else base * override.multiplier

    def mig_price(
        self, model: str, profile: str, node_labels: Mapping[str, str] | None = None
    ) -> float | None:
        """$/h of one MIG instance of this profile on a GPU of this model; None when unpriced."""
        custom = dict(self.mig_profiles).get(profile)
        if custom is not None and custom.price is not None:
            override = self.override_for(node_labels or {})
            return custom.price if override is None else custom.price * override.multiplier
        gpu = self.device_price(model, node_labels)
        if gpu is None:
            return None
        if custom is not None and custom.share is not None:
            return gpu * custom.share
        slices = compute_slices(profile)
        if slices is None or not 1 <= slices <= MIG_SLICES:
            return None
        return gpu * slices / MIG_SLICES


def compute_slices(profile: str) -> int | None:
    """Compute slices of a MIG profile name ("3g.40gb" -> 3, "1c.3g.40gb" -> 1), if it has any."""
    found = _SLICES.match(profile)
    if found is None:
        return None
    return int(found.group(1) or found.group(2))


def node_label_name(key: str) -> str:
    """The `kube_node_labels` label for a node label key, as kube-state-metrics names it.

    `label_*` names pass through; a Kubernetes key such as `karpenter.sh/capacity-type` becomes
    `label_karpenter_sh_capacity_type` (invalid characters to `_`, camelCase to snake_case).
    """
    if key.startswith("label_") and _PROM_LABEL.match(key):
        return key
    sanitized = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    return "label_" + re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", sanitized).lower()


# -- loading and validation --------------------------------------------------------------------


def load_pricing(path: str | Path) -> Pricing:
    """Read and validate a pricing YAML file; a bad file raises `PricingError`."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise PricingError(f"{source}: cannot read the pricing file ({error.strerror})") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PricingError(f"{source}: not valid YAML: {error}") from error
    return parse_pricing(data, str(source))


def parse_pricing(data: Any, source: str = "<pricing>") -> Pricing:
    """Validate parsed YAML into a `Pricing`; unknown keys and bad values raise `PricingError`."""
    v = _Validator(source)
    if data is None:
        data = {}
    top = v.mapping(data, "", "give a mapping with `models:` and optional keys")
    v.known_keys(top, "", _TOP_KEYS)
    currency = top.get("currency", "USD")
    if currency != "USD":
        v.fail(
            "currency",
            f"{currency!r} is not supported",
            "give USD (the recorded series are in dollars); convert prices to USD",
        )
    models_raw = v.mapping(top.get("models", {}), "models", "map GPU model names to USD per hour")
    models: list[tuple[str, float]] = []
    for model, price in models_raw.items():
        where = f"models.{_key(model)}"
        v.name(model, where, "use the GPU model exactly as the `model` label shows it")
        models.append((model, v.price(price, where)))
    default_price = None
    if top.get("default_price") is not None:
        default_price = v.price(top["default_price"], "default_price")
    profiles = _parse_mig_profiles(v, top.get("mig_profiles", {}))
    split = top.get("shared_gpu_split", "even")
    if split not in SPLIT_MODES:
        v.fail("shared_gpu_split", f"{split!r} is not a split mode", "give `even` or `usage`")
    team_label = top.get("team_label", DEFAULT_TEAM_LABEL)
    if not isinstance(team_label, str) or not _PROM_LABEL.match(team_label):
        v.fail(
            "team_label",
            f"{team_label!r} is not a Prometheus label name",
            "give the label on gpu_allocation_info that carries the team, e.g. label_team",
        )
    overrides = _parse_overrides(v, top.get("node_overrides", []), {m for m, _ in models})
    if not models and default_price is None:
        v.fail("models", "no prices given", "list GPU models with a price, or set default_price")
    return Pricing(
        models=tuple(models),
        default_price=default_price,
        mig_profiles=profiles,
        shared_gpu_split=split,
        node_overrides=overrides,
        team_label=team_label,
        currency=currency,
        source=source,
    )


def _parse_mig_profiles(v: _Validator, raw: Any) -> tuple[tuple[str, MigProfilePrice], ...]:
    fix = "map MIG profile names (e.g. 3g.40gb) to {share: 0.5} or {price: 1.5}"
    entries = v.mapping(raw, "mig_profiles", fix)
    out: list[tuple[str, MigProfilePrice]] = []
    for profile, spec in entries.items():
        where = f"mig_profiles.{_key(profile)}"
        if not isinstance(profile, str) or not _PROFILE.match(profile):
            v.fail(where, "is not a MIG profile name", "use the `mig_profile` label, e.g. 3g.40gb")
        body = v.mapping(spec, where, "give {share: <0-1>} or {price: <USD per hour>}")
        v.known_keys(body, where, ("share", "price"))
        if ("share" in body) == ("price" in body):
            v.fail(
                where, "needs exactly one of share or price", "give {share: 0.5} or {price: 1.5}"
            )
        if "share" in body:
            share = v.number(body["share"], f"{where}.share", "give a fraction of the GPU, 0-1")
            if not 0 < share <= 1:
                v.fail(f"{where}.share", f"{share} is outside (0, 1]", "give a fraction, e.g. 0.5")
            out.append((profile, MigProfilePrice(share=share)))
        else:
            out.append((profile, MigProfilePrice(price=v.price(body["price"], f"{where}.price"))))
    return tuple(out)


def _parse_overrides(v: _Validator, raw: Any, models: set[str]) -> tuple[NodeOverride, ...]:
    if not isinstance(raw, list):
        v.fail("node_overrides", "is not a list", "give a list of {match: {...}, multiplier: 0.3}")
    out: list[NodeOverride] = []
    for index, item in enumerate(raw):
        where = f"node_overrides[{index}]"
        body = v.mapping(item, where, "give {match: {<node label>: <value>}, multiplier: 0.3}")
        v.known_keys(body, where, ("name", "match", "multiplier", "prices"))
        name = body.get("name", f"node_overrides[{index}]")
        if not isinstance(name, str) or not name or len(name) > 63:
            v.fail(f"{where}.name", f"{name!r} is not a name", "give a short name such as spot")
        if name in {o.name for o in out}:
            v.fail(f"{where}.name", f"{name!r} is used twice", "give each override its own name")
        match_raw = v.mapping(body.get("match"), f"{where}.match", "give {<node label>: <value>}")
        if not match_raw:
            v.fail(f"{where}.match", "is empty", "give at least one node label and its value")
        match: dict[str, str] = {}
        for key, value in match_raw.items():
            at = f"{where}.match.{_key(key)}"
            if not isinstance(key, str) or not (
                _K8S_LABEL_KEY.match(key) or (key.startswith("label_") and _PROM_LABEL.match(key))
            ):
                v.fail(at, "is not a node label", "give a Kubernetes label key or its label_* name")
            if not isinstance(value, str) or not value:
                v.fail(at, f"{value!r} is not a label value", "give the value as a quoted string")
            match[node_label_name(key)] = value
        if "multiplier" not in body and "prices" not in body:
            v.fail(
                where, "sets no price", "give multiplier: <factor> or prices: {<model>: <USD/h>}"
            )
        multiplier = 1.0
        if "multiplier" in body:
            multiplier = v.price(body["multiplier"], f"{where}.multiplier", "give a factor")
        prices_raw = v.mapping(body.get("prices", {}), f"{where}.prices", "map models to USD/h")
        prices: list[tuple[str, float]] = []
        for model, price in prices_raw.items():
            at = f"{where}.prices.{_key(model)}"
            if model not in models:
                v.fail(at, "is not in models", "give the model's list price under models first")
            prices.append((model, v.price(price, at)))
        out.append(NodeOverride(name, tuple(sorted(match.items())), multiplier, tuple(prices)))
    return tuple(out)


def _key(key: Any) -> str:
    """A key as it appears in a key path: quoted when it holds spaces or dots."""
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else f"'{text}'"


class _Validator:
    """Raises `PricingError` with the file, the key path and the fix."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str, fix: str) -> Any:
        prefix = f"{self.source}: {where}: " if where else f"{self.source}: "
        raise PricingError(f"{prefix}{problem}; {fix}")

    def mapping(self, value: Any, where: str, fix: str) -> dict[Any, Any]:
        if not isinstance(value, dict):
            self.fail(where, f"{_show(value)} is not a mapping", fix)
        return value

    def known_keys(self, body: Mapping[Any, Any], where: str, known: Sequence[str]) -> None:
        for key in body:
            if key not in known:
                at = f"{where}.{_key(key)}" if where else _key(key)
                self.fail(at, "is not a known key", f"use one of {', '.join(known)}")

    def name(self, value: Any, where: str, fix: str) -> None:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"{value!r} is not a name", fix)

    def number(self, value: Any, where: str, fix: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(where, f"{_show(value)} is not a number", fix)
        if not math.isfinite(value):
            self.fail(where, f"{value} is not finite", fix)
        return float(value)

    def price(self, value: Any, where: str, fix: str = "give a price in USD per hour") -> float:
        number = self.number(value, where, fix)
        if number < 0:
            self.fail(where, f"{_show(value)} is negative", fix)
        return number


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# -- recording rules ---------------------------------------------------------------------------


def recording_rules(
    pricing: Pricing,
    interval: str = DEFAULT_INTERVAL,
    team_label: str | None = None,
    inputs: RuleInputs | None = None,
) -> dict[str, Any]:
    """The pricing as a Prometheus rule file (one group), every value in dollars per hour.

    `team_label` (default: the pricing's) is the pod label on the allocations that names the
    team; the team rule exposes it as `team`. `inputs` says where devices, allocations and
    activity come from (default: our exporter's series, see `analytics.sources`).
    """
    if not _DURATION.match(interval):
        raise PricingError(f"interval {interval!r} is not a Prometheus duration such as 1m")
    team = team_label or pricing.team_label
    if not _PROM_LABEL.match(team):
        raise PricingError(f"team label {team!r} is not a Prometheus label name")
    if inputs is None:
        inputs = rule_inputs(interval=interval, team_label=team)
    if pricing.shared_gpu_split == "usage" and inputs.process_use is None:
        raise PricingError(
            f"{pricing.source}: shared_gpu_split: usage needs per-process GPU use, which the "
            f"{inputs.source} source does not publish; use even"
        )
    rules = [_rule(record, expr) for record, expr in inputs.adapters]
    if pricing.node_overrides:
        rules.append(_rule(NODE_OVERRIDE, _override_expr(pricing.node_overrides)))
    # One rule per recorded name (promtool flags duplicates); its parts select disjoint series
    # (one model, one MIG profile, whole GPUs or MIG instances), so `or` just unites them.
    devices = [
        _device_expr(pricing, inputs, f"model={_q(m)}", m, price) for m, price in pricing.models
    ]
    if pricing.default_price is not None:
        known = "|".join(_re2_escape(m) for m, _ in pricing.models)
        selector = f"model!~{_q(known)}" if known else ""
        devices.append(_device_expr(pricing, inputs, selector, None, None))
    rules.append(_rule(DEVICE_PRICE, _union(devices)))
    rules.append(_rule(MIG_PRICE, _union(_mig_exprs(pricing, inputs))))
    rules.append(_rule(DEVICE_UNPRICED, _unpriced_devices(inputs)))
    rules.append(_rule(MIG_UNPRICED, _unpriced_mig(inputs)))
    whole = _pod_whole_expr(pricing.shared_gpu_split, team, inputs)
    rules.append(_rule(POD_COST, _union([whole, _pod_mig_expr(team, inputs)])))
    rules.append(_rule(POD_DEVICES, _pod_devices_expr(team, inputs)))
    rules.append(_rule(POD_UTILIZED_DEVICES, _utilized_expr(inputs)))
    rules.append(_rule(POD_MEASURED_DEVICES, _measured_expr(inputs)))
    # Each pod series summed per report aggregate, so reports over long windows read a few
    # series instead of one per pod.
    for series in POD_SERIES:
        for aggregate in AGGREGATE_LABELS:
            rules.append(_rule(aggregated(series, aggregate), _sum_by(series, aggregate, team)))
    rules.extend(
        [
            _rule(NODE_PRICE, f"sum by (cluster, node) ({DEVICE_PRICE})"),
            _rule(MODEL_PRICE, f"sum by (cluster, model) ({DEVICE_PRICE})"),
            _rule(CLUSTER_PRICE, f"sum by (cluster) ({DEVICE_PRICE})"),
            _rule(DEVICE_UNALLOCATED, _unallocated(inputs)),
            _rule(
                CLUSTER_ALLOCATED,
                "# 0, not absent, when priced GPUs exist and no pod holds any.\n"
                f"sum by (cluster) ({POD_COST}) or (0 * {CLUSTER_PRICE})",
            ),
            _rule(
                CLUSTER_UNALLOCATED,
                f"sum by (cluster) ({DEVICE_UNALLOCATED}) or (0 * {CLUSTER_PRICE})",
            ),
        ]
    )
    return {"groups": [{"name": GROUP_NAME, "interval": interval, "rules": rules}]}


def render_rules(
    pricing: Pricing,
    interval: str = DEFAULT_INTERVAL,
    team_label: str | None = None,
    inputs: RuleInputs | None = None,
) -> str:
    """The rule file as YAML text, with a header saying it is generated and from what."""
    body = yaml.dump(
        recording_rules(pricing, interval, team_label, inputs),
        Dumper=_LiteralDumper,
        sort_keys=False,
        width=1000,
        allow_unicode=True,
    )
    source = pricing.source if pricing.source != "<memory>" else "a Pricing"
    header = (
        "# GPU cost recording rules: generated by `python -m analytics.pricing` from "
        f"{source}.\n"
        "# Do not edit: change the pricing file and regenerate. Every value is in US dollars\n"
        "# per hour; dollars over a window = sum_over_time(series[window]) * interval / 1h.\n"
    )
    return header + body


def _union(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return "\nor\n".join("(\n" + _indent(part) + "\n)" for part in parts)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.strip().split("\n"))


def _times(price: float, multiplier: float) -> str:
    """`price * multiplier` as PromQL, in the order `Pricing` computes it."""
    return _num(price) if multiplier == 1.0 else f"{_num(price)} * {_num(multiplier)}"


def _rule(record: str, expr: str) -> dict[str, str]:
    return {"record": record, "expr": expr.strip() + "\n"}


def _q(text: str) -> str:
    """A PromQL string literal (Go escapes; JSON's are a subset)."""
    return json.dumps(text, ensure_ascii=False)


def _re2_escape(text: str) -> str:
    """Escape RE2 metacharacters (only those: RE2 rejects escapes of letters and spaces)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def _num(value: float) -> str:
    return repr(float(value))


def _override_expr(overrides: Sequence[NodeOverride]) -> str:
    """One series per node naming the first override its kube_node_labels match."""
    terms: list[str] = []
    earlier: list[str] = []
    for override in overrides:
        matchers = ", ".join(f"{k}={_q(v)}" for k, v in override.match)
        selector = f"kube_node_labels{{{matchers}}}"
        # max by (node): kube-state-metrics may run as several replicas (duplicate series).
        term = (
            f"label_replace(max by (cluster, node) ({selector}), "
            f'"override", {_q(override.name)}, "", "")'
        )
        for previous in earlier:
            term += f"\n  unless on (cluster, node) {previous}"
        terms.append(term)
        earlier.append(selector)
    head = (
        "# Which node override prices each node: the first whose labels match (kube-state-metrics\n"
        "# must export them: --metric-labels-allowlist=nodes=[...]).\n"
    )
    return head + "\nor\n".join(f"(\n  {t}\n)" for t in terms)


def _device_expr(
    pricing: Pricing, inputs: RuleInputs, selector: str, model: str | None, price: float | None
) -> str:
    """Whole-GPU prices for one model (or, with model None, every model without a list price)."""
    gpus = f"max by ({DEVICE_BY}) ({inputs.devices}{{{selector}}})"
    base = price if price is not None else pricing.default_price
    assert base is not None
    title = f"# {model}: {base} $/h list price" if model else f"# other models: {base} $/h default"
    if not pricing.node_overrides:
        return f"{title}\n{_num(base)} * {gpus}"
    terms = [f"  {_num(base)} * ({gpus} unless on (cluster, node) {NODE_OVERRIDE})"]
    for override in pricing.node_overrides:
        own = dict(override.prices)
        factor = (
            _num(own[model])
            if model is not None and model in own
            else _times(base, override.multiplier)
        )
        on_nodes = f"{NODE_OVERRIDE}{{override={_q(override.name)}}}"
        terms.append(f"  {factor} * ({gpus} and on (cluster, node) {on_nodes})")
    note = "# GPUs on overridden nodes take the override's price (node overrides, in order).\n"
    return f"{title}\n{note}" + "\nor\n".join(f"(\n{t}\n)" for t in terms)


def _mig_exprs(pricing: Pricing, inputs: RuleInputs) -> list[str]:
    """MIG instance prices: shares of the parent GPU's price, then per-profile overrides."""
    custom = dict(pricing.mig_profiles)
    exclude = ""
    if custom:
        exclude = ", mig_profile!~" + _q("|".join(_re2_escape(p) for p in custom))
    # Each instance takes its parent GPU's price (many instances to one GPU: group_left).
    parent = f"* on (uuid) group_left {DEVICE_PRICE}"
    out: list[str] = []
    for slices in range(1, MIG_SLICES + 1):
        pattern = _slice_profiles(slices)
        selected = f"{inputs.mig_instances}{{mig_profile=~{pattern}{exclude}}}"
        instances = f"max by ({MIG_BY}) ({selected})"
        out.append(
            f"# {slices} of {MIG_SLICES} compute slices: {slices}g.* and {slices}c.*g.* profiles\n"
            f"({instances}\n  {parent}) * {slices} / {MIG_SLICES}"
        )
    for profile, spec in pricing.mig_profiles:
        instances = f"max by ({MIG_BY}) ({inputs.mig_instances}{{mig_profile={_q(profile)}}})"
        if spec.share is not None:
            out.append(
                f"# {profile}: {spec.share} of the GPU's price (mig_profiles)\n"
                f"({instances}\n  {parent}) * {_num(spec.share)}"
            )
            continue
        assert spec.price is not None
        title = f"# {profile}: {spec.price} $/h on any GPU (mig_profiles)"
        if not pricing.node_overrides:
            out.append(f"{title}\n{_num(spec.price)} * {instances}")
            continue
        terms = [f"  {_num(spec.price)} * ({instances} unless on (cluster, node) {NODE_OVERRIDE})"]
        for override in pricing.node_overrides:
            on_nodes = f"{NODE_OVERRIDE}{{override={_q(override.name)}}}"
            terms.append(
                f"  {_times(spec.price, override.multiplier)}"
                f" * ({instances} and on (cluster, node) {on_nodes})"
            )
        out.append(f"{title}\n" + "\nor\n".join(f"(\n{t}\n)" for t in terms))
    return out


def _unpriced_devices(inputs: RuleInputs) -> str:
    return (
        "# GPUs whose model has no price (no models entry and no default_price): they cost\n"
        "# nothing in the rules below, and are listed here so reports can show them as unpriced.\n"
        f"max by ({DEVICE_BY}) ({inputs.devices}) unless on (uuid) {DEVICE_PRICE}"
    )


def _unpriced_mig(inputs: RuleInputs) -> str:
    return (
        "# MIG instances without a price (unknown profile, or the parent GPU is unpriced).\n"
        f"max by ({MIG_BY}) ({inputs.mig_instances}) unless on (mig_uuid) {MIG_PRICE}"
    )


_POD_BY = "cluster, node, gpu, uuid, model, namespace, pod"


def _slice_profiles(slices: int) -> str:
    """The quoted PromQL regex of MIG profiles with `slices` compute slices (`3g.*`, `1c.3g.*`
    counts its compute-instance slices): the PromQL twin of `_SLICES`."""
    return _q(f"({slices}c\\.[0-9]+g|{slices}g)\\..*")


def _whole_holders(team: str, inputs: RuleInputs) -> str:
    """Each pod holding a whole GPU, once (its containers collapse)."""
    return f'max by ({_POD_BY}, {team}) ({inputs.allocations}{{mig_uuid=""}})'


def _mig_holders(team: str, inputs: RuleInputs, profiles: str = "") -> str:
    """Each pod holding a MIG instance, once; `profiles` narrows to a profile regex."""
    narrow = f", mig_profile=~{profiles}" if profiles else ""
    return (
        f"max by ({_POD_BY}, mig_profile, mig_uuid, {team}) "
        f'({inputs.allocations}{{mig_uuid!=""{narrow}}})'
    )


def _pod_whole_expr(split: str, team: str, inputs: RuleInputs) -> str:
    """Whole GPUs: each holder pod pays its share; time-sliced or MPS GPUs have several."""
    holders = _whole_holders(team, inputs)
    price = f"* on (uuid) group_left {DEVICE_PRICE}"
    if split == "even":
        return (
            "# Whole GPUs: the price split evenly between the pods that hold the GPU (one pod\n"
            "# on an exclusive GPU; several on a time-sliced or MPS-shared one). Containers of\n"
            "# one pod count once. Joins on uuid; group_left keeps the pod's labels.\n"
            f"(\n  {holders}\n  {price}\n)\n"
            f"/ on (uuid) group_left\n"
            f"count by (uuid) (\n  {holders}\n)"
        )
    pods = f'max by (uuid, namespace, pod) ({inputs.allocations}{{mig_uuid=""}})'
    assert inputs.process_use is not None  # recording_rules rejects usage without it
    usage = inputs.process_use.replace("\n", "\n    ")
    # Each holder pod's weight: its processes' SM utilization summed, 0 when it runs none.
    weight = f"(\n    ({usage} and on (uuid, namespace, pod) {pods})\n    or 0 * {pods}\n  )"
    return (
        "# Whole GPUs split by measured use: each holder pod's share is its processes' SM\n"
        "# utilization (averaged over one interval) over the sum for the GPU; a GPU whose holders\n"
        "# all read 0 (or report no processes) is split evenly. Joins on uuid (and pod);\n"
        "# group_left keeps the pod's labels.\n"
        f"(\n  {holders}\n  {price}\n)\n"
        # group_left () with an empty list: a "(" right after group_left would be read as one.
        "* on (uuid, namespace, pod) group_left ()\n"
        "(\n"
        "  # usage share, where the GPU's holders used it at all\n"
        f"  {weight}\n"
        "  / on (uuid) group_left ()\n"
        f"  (sum by (uuid) {weight} > 0)\n"
        "  or\n"
        "  # even share otherwise\n"
        f"  {pods}\n"
        "  / on (uuid) group_left\n"
        f"  count by (uuid) ({pods})\n"
        ")"
    )


def _pod_mig_expr(team: str, inputs: RuleInputs) -> str:
    holders = _mig_holders(team, inputs)
    return (
        "# MIG instances: the instance's price, split evenly when several pods share it\n"
        "# (time-sliced MIG; NVML has no per-process utilization on MIG). Joins on mig_uuid.\n"
        f"(\n  {holders}\n  * on (mig_uuid) group_left {MIG_PRICE}\n)\n"
        "/ on (mig_uuid) group_left\n"
        f"count by (mig_uuid) (\n  {holders}\n)"
    )


def _pod_devices_expr(team: str, inputs: RuleInputs) -> str:
    """GPU-equivalents held per pod, independent of prices (so unpriced devices count too)."""
    whole = _whole_holders(team, inputs)
    terms = [
        "# Whole GPUs: 1 each, split evenly between the pods holding it (time-slicing).\n"
        f"(\n  {whole}\n)\n/ on (uuid) group_left\ncount by (uuid) (\n  {whole}\n)"
    ]
    every_holder = _mig_holders(team, inputs)
    for slices in range(1, MIG_SLICES + 1):
        holders = _mig_holders(team, inputs, _slice_profiles(slices))
        terms.append(
            f"# MIG instances of {slices} compute slices: {slices}/{MIG_SLICES} of a GPU each\n"
            f"(\n  {holders} * {slices} / {MIG_SLICES}\n)\n"
            f"/ on (mig_uuid) group_left\ncount by (mig_uuid) (\n  {every_holder}\n)"
        )
    return _union(terms)


def _utilized_expr(inputs: RuleInputs) -> str:
    """Busy GPU-equivalents: each pod's held share times its device's measured activity."""
    return (
        "# Each pod's GPU-equivalents times the activity (0-1) of what it holds, averaged over\n"
        "# the interval: GPU utilization for whole GPUs, SM activity for MIG instances. Devices\n"
        "# without a reading are left out (see the measured rule), never counted as idle.\n"
        f'(\n  {POD_DEVICES}{{mig_uuid=""}}\n  * on (uuid) group_left\n'
        f"  {inputs.whole_activity}\n)\nor\n"
        f'(\n  {POD_DEVICES}{{mig_uuid!=""}}\n  * on (mig_uuid) group_left\n'
        f"  {inputs.mig_activity}\n)"
    )


def _measured_expr(inputs: RuleInputs) -> str:
    """The held GPU-equivalents whose activity was measured: efficiency's denominator."""
    return (
        "# The GPU-equivalents held while their activity was measured (MIG instances on GPUs\n"
        "# without GPM, or devices whose reading failed, are not): efficiency's denominator.\n"
        f'(\n  {POD_DEVICES}{{mig_uuid=""}}\n  and on (uuid)\n  {inputs.whole_activity}\n)\nor\n'
        f'(\n  {POD_DEVICES}{{mig_uuid!=""}}\n  and on (mig_uuid)\n  {inputs.mig_activity}\n)'
    )


def _sum_by(series: str, aggregate: str, team: str) -> str:
    """`series` summed by the labels of a report aggregate."""
    by = AGGREGATE_LABELS[aggregate]
    if aggregate == "mig_profile":
        return f'# MIG instances only.\nsum by ({by}) ({series}{{mig_uuid!=""}})'
    if aggregate != "team" or team == "team":
        return f"sum by ({by}) ({series})"
    return (
        f"# The team is the pod label {team}, renamed team; pods without it sum into one\n"
        "# series with no team label.\n"
        f'sum by ({by}) (label_replace({series}, "team", "$1", {_q(team)}, "(.+)"))'
    )


def _unallocated(inputs: RuleInputs) -> str:
    return f"""
# Priced capacity no pod holds, per GPU.
(
  # whole GPUs (not carved into MIG instances) with no allocation
  {DEVICE_PRICE}
  unless on (uuid) {inputs.mig_instances}
  unless on (uuid) {inputs.allocations}
)
or
sum by ({DEVICE_BY}) (
  # MIG instances no pod holds ...
  ({MIG_PRICE} unless on (mig_uuid) {inputs.allocations}{{mig_uuid!=""}})
  or
  # ... plus the GPU's slices not carved into any instance (above a rounding error)
  (
    {DEVICE_PRICE}
    - on (uuid) group_left
    sum by (uuid) ({MIG_PRICE})
  ) > 1e-9
)
"""


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings (the PromQL expressions) as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.nodes.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


# -- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Write the recording rules for a pricing file (stdout without --out)."""
    parser = argparse.ArgumentParser(prog="python -m analytics.pricing", description=main.__doc__)
    parser.add_argument("--pricing", required=True, help="pricing YAML file")
    parser.add_argument("--out", help="rule file to write (default: stdout)")
    parser.add_argument("--interval", default=DEFAULT_INTERVAL, help="rule evaluation interval")
    parser.add_argument("--team-label", help="pod label carrying the team (default: the file's)")
    parser.add_argument(
        "--shared-gpu-split", choices=SPLIT_MODES, help="override the file's shared_gpu_split"
    )
    parser.add_argument(
        "--source", choices=SOURCES, default="exporter", help="whose GPU metrics Prometheus has"
    )
    parser.add_argument(
        "--exported-labels",
        action="store_true",
        help="pod labels arrive as exported_namespace/exported_pod (honorLabels false)",
    )
    parser.add_argument(
        "--team-source",
        choices=TEAM_SOURCES,
        help="where the team label comes from (default: pod_label; kube_pod_labels for dcgm)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if --out differs from what would be written"
    )
    args = parser.parse_args(argv)
    try:
        pricing = load_pricing(args.pricing)
        if args.shared_gpu_split is not None:
            split = args.shared_gpu_split
            source = f"{pricing.source} with shared_gpu_split: {split}"
            pricing = dataclasses.replace(pricing, shared_gpu_split=split, source=source)
        team = args.team_label or pricing.team_label
        teams_from = args.team_source or default_team_source(args.source)
        inputs = rule_inputs(
            args.source,
            interval=args.interval,
            label_prefix="exported_" if args.exported_labels else "",
            team_label=team,
            team_source=teams_from,
        )
        text = render_rules(pricing, args.interval, team, inputs)
    except (PricingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else ""
        if current != text:
            print(f"{out} is stale: regenerate it from {args.pricing}", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
