"""The monitoring kit's PromQL (deploy/k8s/components/monitoring), read for the checks in
tests/deploy/test_monitoring.py and tests/e2e/test_monitoring_metrics_e2e.py.

Every expression is parsed with promql-parser (the Rust `promql-parser` crate, the parser
GreptimeDB and others ship; it type-checks too: `rate(x)` on an instant vector fails), and
walked for the metric selectors it uses. Grafana's own variables are replaced by values
of the right type before parsing (`$__rate_interval` by a duration, `$namespace` by a
string inside its quotes).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, unavailable

KIT = ROOT / "deploy" / "k8s" / "components" / "monitoring"
RULES_FILE = KIT / "prometheusrule.yaml"
DASHBOARD_FILE = KIT / "dashboard.json"
# Labels Prometheus adds to every scraped series under the PodMonitors (podmonitors.yaml):
# the operator's, and our relabelings. A metric exporting one of these would see its own
# renamed to exported_<name>.
TARGET_LABELS = frozenset(
    {"namespace", "pod", "container", "endpoint", "instance", "job", "service", "app_component"}
)
# Exported labels the PodMonitors rename (metricRelabelings): the jobs' `job` collides with
# the target's job, arrives as exported_job and is kept as job_name.
RENAMED_LABELS = {"job": "job_name"}
# Series Prometheus makes itself, not the services.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_GRAFANA_DURATIONS = re.compile(
    r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}"
)
_GRAFANA_VARIABLE = re.compile(r"\$\{\w+(?::\w+)?\}|\$\w+")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$", re.S)


def promql() -> Any:
    """The promql_parser module (dev extras), or skip/fail without it."""
    try:
        return importlib.import_module("promql_parser")
    except ImportError:
        unavailable("promql-parser (pip: promql-parser) is not installed")


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        unavailable("PyYAML (pip: pyyaml) is not installed")


@dataclass(frozen=True)
class Expression:
    where: str  # "rule AgentplatformJobStale", "panel 'Hit ratios' A", ...
    text: str  # as PromQL (Grafana's variables replaced)


@dataclass(frozen=True)
class Selector:
    metric: str
    labels: frozenset[str]  # label names its matchers use
    where: str


def rules(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of the PrometheusRule."""
    document = _yaml().safe_load(path.read_text())
    return [rule for group in document["spec"]["groups"] for rule in group["rules"]]


def recorded_names(path: Path = RULES_FILE) -> set[str]:
    return {rule["record"] for rule in rules(path) if "record" in rule}


def grafana_to_promql(text: str) -> str:
    text = _GRAFANA_DURATIONS.sub("5m", text)
    return _GRAFANA_VARIABLE.sub("grafana_variable", text)


def expressions(
    rules_path: Path = RULES_FILE, dashboard_path: Path = DASHBOARD_FILE
) -> Iterator[Expression]:
    """Every PromQL expression of the rules and the dashboard (panel targets, and the
    selectors inside its variables' label_values())."""
    for rule in rules(rules_path):
        kind = "record" if "record" in rule else "alert"
        yield Expression(f"{kind} {rule[kind]}", rule["expr"])
    dashboard = json.loads(dashboard_path.read_text())
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield Expression(
                f"panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"])
            )
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        match = _LABEL_VALUES.match(query.strip())
        assert match, f"variable {variable['name']}: only label_values(selector, label) is checked"
        yield Expression(f"variable {variable['name']}", grafana_to_promql(match["selector"]))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def selectors(expression: Expression) -> list[Selector]:
    """The metric selectors an expression reads (the parser's vector selectors)."""
    parser = promql()
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, parser.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next(
                (
                    m.value
                    for m in matchers
                    if m.name == "__name__" and m.op == parser.MatchOp.Equal
                ),
                None,
            )
            assert name, f"{expression.where}: a selector without a metric name"
            labels = frozenset(m.name for m in matchers if m.name != "__name__")
            found.append(Selector(name, labels, expression.where))

    parser.walk(parser.parse(expression.text), visit)
    return found


def exported_names(families: list[Any]) -> dict[str, set[str]]:
    """Series names a /metrics scrape exports (prometheus_client's parsed families, with
    or without samples) → the label names seen on them (after the PodMonitors' renames)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names: dict[str, set[str]] = {}
    for family in families:
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(
                RENAMED_LABELS.get(label, label) for label in sample.labels
            )
    return names


def label_values(text: str, label: str) -> set[str]:
    """The values an expression's selectors match `label` against with `=`."""
    parser = promql()
    values: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, parser.VectorSelector):
            values.update(
                m.value
                for m in node.matchers.matchers
                if m.name == label and m.op == parser.MatchOp.Equal
            )

    parser.walk(parser.parse(text), visit)
    return values
