"""Policy checks on the rendered Kubernetes manifests (deploy/k8s/base and every overlay).

Each target is rendered with `kubectl kustomize` (or a standalone `kustomize build`); the
test is skipped when neither is installed, and fails with CI=true. Schema validation of
the same renders is scripts/validate_deploy.sh's job; this file checks our own rules:
native gRPC probes, resources, the restricted securityContext, pinned images, no secret
values, a shutdown budget longer than the drain, an HPA and a PDB per Deployment, and a
default-deny NetworkPolicy.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.helpers import unavailable

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(
    p.parent.relative_to(K8S).as_posix() for p in K8S.glob("overlays/*/kustomization.yaml")
)
TARGETS = ["base", *OVERLAYS]
RUN_AS_USER = 10001
DEFAULT_GRACE_SECONDS = 10.0
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
# Setting names whose value is a secret: they must come from a Secret (valueFrom) or a
# mounted file (`*_FILE`), never a literal in a manifest or ConfigMap.
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|PRIVATE_KEY|DATABASE_URL|REDIS_URL)$")

Doc = dict[str, Any]


def _unavailable(what: str) -> NoReturn:
    unavailable(f"{what} is not installed; install it to check deploy/k8s")


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        _unavailable("PyYAML (pip: pyyaml)")


def _renderer() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    _unavailable("kubectl (or kustomize)")


def render(target: str) -> list[Doc]:
    yaml = _yaml()
    result = subprocess.run(
        [*_renderer(), str(K8S / target)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"rendering {target} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=TARGETS)
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return render(request.param)


# ---- helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    kind: str
    name: str
    pod: Doc  # the pod template's metadata + spec
    spec: Doc  # the pod spec
    doc_replicas: int | None = None  # the workload's own `replicas`, if stated

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}"

    def containers(self) -> Iterator[Doc]:
        yield from self.spec.get("initContainers") or []
        yield from self.spec.get("containers") or []


def workloads(docs: list[Doc]) -> list[Workload]:
    found = []
    for doc in docs:
        kind = doc.get("kind")
        if kind in (*LONG_RUNNING, "Job"):
            template = doc["spec"]["template"]
        elif kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
        else:
            continue
        found.append(
            Workload(
                kind,
                doc["metadata"]["name"],
                template,
                template["spec"],
                (doc.get("spec") or {}).get("replicas"),
            )
        )
    return found


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc.get("kind") == kind]


def config_maps(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data") or {} for doc in of_kind(docs, "ConfigMap")}


def environment(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """The literal environment a container sees (envFrom ConfigMaps, then env values)."""
    maps = config_maps(docs)
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref:
            prefix = source.get("prefix", "")
            env.update({prefix + k: v for k, v in maps.get(ref["name"], {}).items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def grace_seconds(container: Doc, docs: list[Doc]) -> float:
    drain = [
        float(v)
        for k, v in environment(container, docs).items()
        if k.endswith("_GRACE_SECONDS") and "CONNECTION_AGE" not in k
    ]
    return max(drain, default=DEFAULT_GRACE_SECONDS)


def prestop_sleep_seconds(container: Doc) -> float | None:
    """The preStop delay: the native sleep action or `exec: [sleep, N]`; None if absent."""
    pre_stop = (container.get("lifecycle") or {}).get("preStop")
    if not pre_stop:
        return None
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = (pre_stop.get("exec") or {}).get("command") or []
    if len(command) == 2 and Path(command[0]).name == "sleep":
        return float(command[1])
    return 0.0


def effective(workload: Workload, container: Doc, key: str) -> Any:
    """A securityContext field as the kubelet applies it: container first, then pod."""
    own = container.get("securityContext") or {}
    if key in own:
        return own[key]
    return (workload.spec.get("securityContext") or {}).get(key)


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


# ---- the rules (each returns the violations it finds) ----------------------------------------


def is_worker(w: Workload) -> bool:
    """A background-job Deployment (`worker`): no gRPC port, no Service, no HPA."""
    return (w.pod.get("metadata", {}).get("labels") or {}).get(
        "app.kubernetes.io/component"
    ) == "worker"


def worker_probe_violations(w: Workload) -> list[str]:
    problems = []
    for c in w.spec.get("containers") or []:
        named = {p.get("name") for p in c.get("ports") or []}
        probe = (c.get("livenessProbe") or {}).get("httpGet") or {}
        if probe.get("path") != "/healthz" or probe.get("port") not in named:
            problems.append(f"{w.label} container {c['name']}: liveness must GET /healthz")
        if c.get("args") != ["worker"]:
            problems.append(f"{w.label} container {c['name']}: must run `worker`")
    return problems


def probe_violations(docs: list[Doc]) -> list[str]:
    problems = []
    for w in workloads(docs):
        if w.kind not in LONG_RUNNING:
            continue  # Jobs run to completion: no probes
        if is_worker(w):
            problems += worker_probe_violations(w)
            continue
        for c in w.spec.get("containers") or []:
            where = f"{w.label} container {c['name']}"
            ports = {p["containerPort"] for p in c.get("ports") or []}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe or "grpc" not in probe:
                    problems.append(f"{where}: {kind} must be a native grpc probe")
                    continue
                if probe["grpc"].get("port") not in ports:
                    problems.append(f"{where}: {kind} port is not a containerPort")
                service = probe["grpc"].get("service", "")
                if kind == "livenessProbe" and service:
                    problems.append(f"{where}: liveness must check the process (service '')")
                if kind != "livenessProbe" and not service:
                    problems.append(f"{where}: {kind} must check the named service")
    return problems


def resource_violations(docs: list[Doc]) -> list[str]:
    problems = []
    for w in workloads(docs):
        for c in w.containers():
            resources = c.get("resources") or {}
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (resources.get(section) or {}):
                        problems.append(f"{w.label} container {c['name']}: no {section}.{resource}")
    return problems


def security_violations(docs: list[Doc]) -> list[str]:
    problems = []
    for w in workloads(docs):
        for c in w.containers():
            where = f"{w.label} container {c['name']}"
            expected = {
                "runAsNonRoot": True,
                "runAsUser": RUN_AS_USER,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
            }
            for key, want in expected.items():
                if effective(w, c, key) != want:
                    problems.append(f"{where}: securityContext.{key} must be {want}")
            drop = ((c.get("securityContext") or {}).get("capabilities") or {}).get("drop") or []
            if "ALL" not in drop:
                problems.append(f"{where}: capabilities must drop ALL")
            seccomp = effective(w, c, "seccompProfile") or {}
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile must be RuntimeDefault")
            if (c.get("securityContext") or {}).get("privileged"):
                problems.append(f"{where}: must not be privileged")
        if w.spec.get("hostNetwork") or w.spec.get("hostPID") or w.spec.get("hostIPC"):
            problems.append(f"{w.label}: must not share host namespaces")
    return problems


def image_violations(docs: list[Doc]) -> list[str]:
    problems = []
    for w in workloads(docs):
        for c in w.containers():
            image = c.get("image", "")
            if "@sha256:" in image:
                continue
            name, _, tag = image.rpartition(":")
            if not name or "/" in tag or tag in ("", "latest"):
                problems.append(f"{w.label} container {c['name']}: image {image!r} needs a tag")
    return problems


def secret_violations(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in of_kind(docs, "Secret"):
        if doc.get("data") or doc.get("stringData"):
            problems.append(f"Secret/{doc['metadata']['name']} carries values")
    for name, data in config_maps(docs).items():
        for key in data:
            if SECRET_NAME.search(key):
                problems.append(f"ConfigMap/{name}: {key} is a secret (use a Secret)")
    for w in workloads(docs):
        for c in w.containers():
            for item in c.get("env") or []:
                if SECRET_NAME.search(item["name"]) and "value" in item:
                    problems.append(f"{w.label}: {item['name']} is a literal (use secretKeyRef)")
    return problems


def shutdown_violations(docs: list[Doc]) -> list[str]:
    problems = []
    for w in workloads(docs):
        if w.kind not in LONG_RUNNING or is_worker(w):
            continue  # a worker takes no traffic: nothing to drain
        budget = w.spec.get("terminationGracePeriodSeconds", 30)
        for c in w.spec.get("containers") or []:
            delay = prestop_sleep_seconds(c)
            if delay is None:
                problems.append(f"{w.label}: {c['name']} has no preStop delay")
                delay = 0.0
            needed = grace_seconds(c, docs) + delay
            if budget <= needed:
                problems.append(
                    f"{w.label}: terminationGracePeriodSeconds {budget} must exceed "
                    f"drain grace + preStop ({needed:g}s)"
                )
    return problems


def scaling_violations(docs: list[Doc]) -> list[str]:
    problems = []
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    pdbs = of_kind(docs, "PodDisruptionBudget")
    services = of_kind(docs, "Service")
    for w in workloads(docs):
        if w.kind != "Deployment":
            continue
        if is_worker(w):
            if w.doc_replicas is None:
                problems.append(f"{w.label}: a worker states its replicas (no HPA owns them)")
            continue
        labels = w.pod.get("metadata", {}).get("labels") or {}
        targets = [
            h
            for h in hpas
            if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            and h["spec"]["scaleTargetRef"]["name"] == w.name
        ]
        if not targets:
            problems.append(f"{w.label}: no HorizontalPodAutoscaler")
        for hpa in targets:
            metrics = hpa["spec"].get("metrics") or []
            if not any(m.get("resource", {}).get("name") == "cpu" for m in metrics):
                problems.append(f"{w.label}: the HPA does not scale on CPU")
            if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
                problems.append(f"{w.label}: HPA minReplicas > maxReplicas")
        if not any(selects(p["spec"].get("selector") or {}, labels) for p in pdbs):
            problems.append(f"{w.label}: no PodDisruptionBudget selects its pods")
        serving = [
            s
            for s in services
            if s["spec"].get("selector")
            and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
        ]
        names = {p.get("name") for s in serving for p in s["spec"].get("ports") or []}
        if not {"grpc", "metrics"} <= names:
            problems.append(f"{w.label}: no Service with ports named grpc and metrics")
    return problems


def network_violations(docs: list[Doc]) -> list[str]:
    for policy in of_kind(docs, "NetworkPolicy"):
        spec = policy["spec"]
        if (
            spec.get("podSelector") == {}
            and {"Ingress", "Egress"} <= set(spec.get("policyTypes") or [])
            and not spec.get("ingress")
            and not spec.get("egress")
        ):
            return []
    return ["no default-deny NetworkPolicy (podSelector {}, Ingress+Egress, no rules)"]


def service_account_violations(docs: list[Doc]) -> list[str]:
    accounts = {d["metadata"]["name"]: d for d in of_kind(docs, "ServiceAccount")}
    problems = []
    for w in workloads(docs):
        account = accounts.get(w.spec.get("serviceAccountName", "default"), {})
        mounted = w.spec.get(
            "automountServiceAccountToken", account.get("automountServiceAccountToken", True)
        )
        if mounted:
            problems.append(f"{w.label}: mounts a service account token")
    return problems


RULES = [
    probe_violations,
    resource_violations,
    security_violations,
    image_violations,
    secret_violations,
    shutdown_violations,
    scaling_violations,
    network_violations,
    service_account_violations,
]


# ---- tests ---------------------------------------------------------------------------------


def test_renders_both_services(docs: list[Doc]) -> None:
    names = {w.label for w in workloads(docs)}
    assert {"Deployment/auth-svc", "Deployment/agent-svc"} <= names
    assert {"Deployment/auth-svc-worker", "Deployment/agent-svc-worker"} <= names
    assert {"Job/auth-svc-migrate", "Job/agent-svc-migrate", "Job/auth-svc-create-admin"} <= names


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_policy(docs: list[Doc], rule: Any) -> None:
    assert rule(docs) == []


def test_migrations_run_as_jobs_not_on_start(docs: list[Doc]) -> None:
    for w in workloads(docs):
        for c in w.spec.get("containers") or []:
            env = environment(c, docs)
            migrate_on_start = [v for k, v in env.items() if k.endswith("_MIGRATE_ON_START")]
            assert migrate_on_start == ["false"], f"{w.label}: set *_MIGRATE_ON_START=false"
            profile = [v for k, v in env.items() if k.endswith("_PROFILE")]
            assert profile == ["prod"], f"{w.label}: run the prod profile"
    migrations = [w for w in workloads(docs) if w.name.endswith("-migrate")]
    assert all(w.spec["containers"][0].get("args") == ["migrate"] for w in migrations)


def test_rules_catch_a_bad_manifest() -> None:
    """The rules are not vacuous: a Deployment breaking each of them is reported."""
    bad: list[Doc] = [
        {"kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "dg=="}},
        {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"X_GRACE_SECONDS": "60"}},
        {
            "kind": "Deployment",
            "metadata": {"name": "bad"},
            "spec": {
                "template": {
                    "metadata": {"labels": {"app": "bad"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 30,
                        "containers": [
                            {
                                "name": "bad",
                                "image": "example/bad:latest",
                                "envFrom": [{"configMapRef": {"name": "c"}}],
                                "env": [{"name": "X_DATABASE_URL", "value": "postgresql://x"}],
                                "livenessProbe": {"httpGet": {"port": 80, "path": "/"}},
                                "resources": {"limits": {"cpu": "1"}},
                            }
                        ],
                    },
                }
            },
        },
    ]
    for rule in RULES:
        assert rule(bad), f"{rule.__name__} did not flag the bad manifest"
    worker = {
        "kind": "Deployment",
        "metadata": {"name": "bad-worker"},
        "spec": {
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/component": "worker"}},
                "spec": {"containers": [{"name": "w", "args": ["serve"], "ports": []}]},
            }
        },
    }
    assert probe_violations([worker]) == [
        "Deployment/bad-worker container w: liveness must GET /healthz",
        "Deployment/bad-worker container w: must run `worker`",
    ]
    assert scaling_violations([worker]) == [
        "Deployment/bad-worker: a worker states its replicas (no HPA owns them)"
    ]
