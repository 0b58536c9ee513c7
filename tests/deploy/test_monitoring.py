"""The monitoring kit (deploy/k8s/components/monitoring): its PromQL parses, what it reads is
recorded or exported, every alert has a runbook entry, and the prod overlay (only prod)
wires it: PodMonitors on the pods' `metrics` port, the scrape policy, no prometheus.io
annotations. That its metric names are the services' own is proven against a real
scrape in tests/e2e/test_monitoring_metrics_e2e.py; that the objects match the CRDs'
schemas, by scripts/validate_deploy.sh."""

from __future__ import annotations

import re

import pytest

from tests import monitoring_kit as kit
from tests.deploy.test_k8s_policy import ROOT, Doc, of_kind, render

RUNBOOK = ROOT / "docs" / "operations.md"


def test_the_parser_rejects_what_prometheus_rejects() -> None:
    parser = kit.promql()
    parser.parse('sum by (le) (rate(grpc_server_handling_seconds_bucket{grpc_type="unary"}[5m]))')
    for garbage in (
        "sum(rate(x[5m])",  # unbalanced
        'x{a="b"',  # unclosed selector
        "rate(x)",  # rate of an instant vector: a type error
        "x > > 1",
        "histogram_quantile(0.95)",  # wrong arity
        "foo bar",
    ):
        with pytest.raises(ValueError, match=r"."):  # the parser says why
            parser.parse(garbage)


def test_every_expression_parses() -> None:
    parser = kit.promql()
    failures = []
    count = 0
    for expression in kit.expressions():
        count += 1
        try:
            parser.parse(expression.text)
        except ValueError as error:
            failures.append(f"{expression.where}: {error}\n{expression.text}")
    assert count > 40
    assert not failures, "\n\n".join(failures)


def test_recording_rule_names_are_recorded_before_use() -> None:
    recorded = kit.recorded_names()
    for name in recorded:
        assert re.fullmatch(r"agentplatform:[a-z0-9_]+:[a-z0-9_]+", name), name
    unknown = {
        f"{selector.where}: {selector.metric}"
        for expression in kit.expressions()
        for selector in kit.selectors(expression)
        if ":" in selector.metric and selector.metric not in recorded
    }
    assert not unknown, "recording rules used but never recorded: " + ", ".join(sorted(unknown))


def test_every_alert_has_a_severity_a_summary_and_a_runbook_entry() -> None:
    runbook = RUNBOOK.read_text()
    problems = []
    for rule in kit.rules():
        if "alert" not in rule:
            continue
        name = rule["alert"]
        if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
            problems.append(f"{name}: severity must be critical or warning")
        if not rule.get("annotations", {}).get("summary"):
            problems.append(f"{name}: no summary")
        if f"#### {name}" not in runbook:
            problems.append(f"{name}: no '#### {name}' entry in docs/operations.md")
    assert not problems, "\n".join(problems)


def _named(docs: list[Doc], kind: str, name: str) -> Doc:
    [doc] = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def _scrape_annotations(docs: list[Doc]) -> list[str]:
    return [
        f"{d['metadata']['name']}: {key}"
        for d in of_kind(docs, "Deployment")
        for key in (d["spec"]["template"]["metadata"].get("annotations") or {})
        if key.startswith("prometheus.io/")
    ]


def test_prod_includes_the_kit_and_dev_does_not() -> None:
    prod, dev = render("overlays/prod"), render("overlays/dev")
    assert {d["metadata"]["name"] for d in of_kind(prod, "PodMonitor")} == {"auth-svc", "agent-svc"}
    assert len(of_kind(prod, "PrometheusRule")) == 1
    dashboard = _named(prod, "ConfigMap", "agentplatform-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["agentplatform.json"] == kit.DASHBOARD_FILE.read_text()
    for doc in of_kind(prod, "PodMonitor") + of_kind(prod, "PrometheusRule") + [dashboard]:
        assert doc["metadata"]["namespace"] == "agentplatform"
    assert not of_kind(dev, "PodMonitor")
    assert not of_kind(dev, "PrometheusRule")
    # The operator ignores the annotations; a Prometheus following both would scrape twice.
    assert _scrape_annotations(dev), "dev keeps the prometheus.io annotations"
    assert not _scrape_annotations(prod)


def test_each_pod_monitor_scrapes_the_metrics_port_of_its_service_pods() -> None:
    prod = render("overlays/prod")
    for monitor in of_kind(prod, "PodMonitor"):
        name = monitor["metadata"]["name"]
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
        relabeled = {r.get("targetLabel") for r in endpoint["relabelings"]}
        assert {"service", "app_component"} <= relabeled
        assert {r.get("targetLabel") for r in endpoint["metricRelabelings"]} >= {"job_name"}
        selector = monitor["spec"]["selector"]
        scraped = []
        for deployment in of_kind(prod, "Deployment"):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            if not (
                selector["matchLabels"].items() <= labels.items()
                and all(labels.get(e["key"]) in e["values"] for e in selector["matchExpressions"])
            ):
                continue
            ports = {
                port.get("name")
                for container in deployment["spec"]["template"]["spec"]["containers"]
                for port in container.get("ports", [])
            }
            assert "metrics" in ports, f"{deployment['metadata']['name']} has no metrics port"
            scraped.append(deployment["metadata"]["name"])
        assert name in scraped, f"PodMonitor {name} finds no server pods"


def test_prometheus_may_scrape_the_metrics_port_and_only_that() -> None:
    for target, managed_by in (("overlays/prod", "prometheus-operator"), ("overlays/dev", None)):
        policy = _named(render(target), "NetworkPolicy", "allow-metrics-scrape")
        [rule] = policy["spec"]["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]
        [peer] = rule["from"]
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"
        }
        pods = peer["podSelector"]["matchLabels"]
        assert pods["app.kubernetes.io/name"] == "prometheus"
        assert pods.get("app.kubernetes.io/managed-by") == managed_by
