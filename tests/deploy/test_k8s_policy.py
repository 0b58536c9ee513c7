"""Policy checks on the rendered Kubernetes manifests (deploy/k8s/base and every overlay).

Each target is rendered with `kubectl kustomize` (or a standalone `kustomize build`); the
test is skipped when neither is installed, and fails with CI=true. Schema validation of
the same renders is scripts/validate_deploy.sh's job; this file checks our own rules:
native gRPC probes, resources, the restricted securityContext, pinned images, no secret
values, a shutdown budget longer than the drain, an HPA and a PDB per Deployment, a
default-deny NetworkPolicy, an appProtocol on every Service port, the servers' worker
threads at the measured default, and Argo CD sync waves that run the migration Jobs after
what they need and before the Deployments. The examples (deploy/k8s/examples: an overlay
plus an opt-in component) are rendered and checked like the overlays.
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
    p.parent.relative_to(K8S).as_posix()
    for pattern in ("overlays/*/kustomization.yaml", "examples/*/kustomization.yaml")
    for p in K8S.glob(pattern)
)
TARGETS = ["base", *OVERLAYS]
RUN_AS_USER = 10001
DEFAULT_GRACE_SECONDS = 10.0
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
# Setting names whose value is a secret: they must come from a Secret (valueFrom) or a
# mounted file (`*_FILE`), never a literal in a manifest or ConfigMap.
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|PRIVATE_KEY|DATABASE_URL|REDIS_URL)$")
# The gRPC worker threads the code defaults to (shared/config/settings.py), the measured
# best (README "Measured figures"): every server must run with it.
MEASURED_MAX_WORKERS = int(
    re.search(  # type: ignore[union-attr]
        r'reader\.integer\("MAX_WORKERS", (\d+)',
        (ROOT / "shared" / "config" / "settings.py").read_text(),
    ).group(1)
)
SYNC_WAVE = "argocd.argoproj.io/sync-wave"
HOOK = "argocd.argoproj.io/hook"
HOOK_DELETE_POLICY = "argocd.argoproj.io/hook-delete-policy"
# Service port name -> the appProtocol it must declare.
APP_PROTOCOLS = {"grpc": "grpc", "grpc-watch": "grpc", "metrics": "http"}

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


def app_protocol_violations(docs: list[Doc]) -> list[str]:
    problems = []
    for service in of_kind(docs, "Service"):
        for port in service["spec"].get("ports") or []:
            where = f"Service/{service['metadata']['name']} port {port.get('name', port['port'])}"
            protocol = port.get("appProtocol")
            if not protocol:
                problems.append(f"{where}: no appProtocol")
            elif port.get("name") in APP_PROTOCOLS and protocol != APP_PROTOCOLS[port["name"]]:
                problems.append(
                    f"{where}: appProtocol {protocol}, not {APP_PROTOCOLS[port['name']]}"
                )
    return problems


def worker_thread_violations(docs: list[Doc]) -> list[str]:
    problems = []
    for w in workloads(docs):
        if w.kind not in LONG_RUNNING or is_worker(w):
            continue
        for c in w.spec.get("containers") or []:
            threads = [v for k, v in environment(c, docs).items() if k.endswith("_MAX_WORKERS")]
            if threads != [str(MEASURED_MAX_WORKERS)]:
                problems.append(
                    f"{w.label} container {c['name']}: *_MAX_WORKERS {threads or 'unset'}, "
                    f"not the measured {MEASURED_MAX_WORKERS} (state it in config.env)"
                )
    return problems


def wave(doc: Doc) -> int:
    return int((doc["metadata"].get("annotations") or {}).get(SYNC_WAVE, "0"))


def job_prerequisites(job: Doc, docs: list[Doc]) -> list[Doc]:
    """What a Job's pods need to exist when they start: the namespace, the network
    policies, its ServiceAccount, the ConfigMaps it reads and the ExternalSecrets that make
    the Secrets it reads."""
    spec = job["spec"]["template"]["spec"]
    config_maps, secrets = set(), set()
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for source in c.get("envFrom") or []:
            config_maps.add((source.get("configMapRef") or {}).get("name"))
            secrets.add((source.get("secretRef") or {}).get("name"))
        for item in c.get("env") or []:
            ref = item.get("valueFrom") or {}
            config_maps.add((ref.get("configMapKeyRef") or {}).get("name"))
            secrets.add((ref.get("secretKeyRef") or {}).get("name"))
    for volume in spec.get("volumes") or []:
        config_maps.add((volume.get("configMap") or {}).get("name"))
        secrets.add((volume.get("secret") or {}).get("secretName"))
    account = spec.get("serviceAccountName", "default")
    needed = []
    for doc in docs:
        kind, name = doc.get("kind"), doc["metadata"]["name"]
        target = ((doc.get("spec") or {}).get("target") or {}).get("name", name)
        if (
            kind in ("Namespace", "NetworkPolicy")
            or (kind == "ServiceAccount" and name == account)
            or (kind == "ConfigMap" and name in config_maps)
            or (kind == "ExternalSecret" and target in secrets)
        ):
            needed.append(doc)
    return needed


def sync_wave_violations(docs: list[Doc]) -> list[str]:
    """Argo CD applies wave by wave, each after the previous one is healthy (a Job: complete).
    The migration Jobs must run after what they need and before any Deployment; a Job
    that waits suspended must not be a hook (a hook must complete) nor hold up the servers."""
    problems = []
    deployments = of_kind(docs, "Deployment")
    first_deployment = min((wave(d) for d in deployments), default=0)
    for job in of_kind(docs, "Job"):
        where = f"Job/{job['metadata']['name']}"
        annotations = job["metadata"].get("annotations") or {}
        if job["spec"].get("suspend"):
            if HOOK in annotations:
                problems.append(f"{where}: suspended, so it must not be a hook")
            if wave(job) < first_deployment:
                problems.append(f"{where}: suspended, so not in a wave before the Deployments")
            continue
        if SYNC_WAVE not in annotations or wave(job) >= first_deployment:
            problems.append(
                f"{where}: sync wave {annotations.get(SYNC_WAVE)} is not before the "
                f"Deployments' ({first_deployment})"
            )
        if HOOK in annotations and "BeforeHookCreation" not in annotations.get(
            HOOK_DELETE_POLICY, ""
        ):
            problems.append(f"{where}: a hook Job needs hook-delete-policy BeforeHookCreation")
        for need in job_prerequisites(job, docs):
            if wave(need) >= wave(job):
                problems.append(
                    f"{where} (wave {wave(job)}) needs {need['kind']}/"
                    f"{need['metadata']['name']} (wave {wave(need)}) in an earlier wave"
                )
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
    app_protocol_violations,
    worker_thread_violations,
    sync_wave_violations,
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


def test_the_watch_port_is_served_exposed_and_allowed(docs: list[Doc]) -> None:
    """AGENT_WATCH_PORT (WatchAgents, grpc.aio) is a containerPort of agent-svc, a port of
    its Service, and open to its callers like the main port."""
    (server,) = [w for w in workloads(docs) if w.label == "Deployment/agent-svc"]
    container = server.spec["containers"][0]
    port = int(environment(container, docs)["AGENT_WATCH_PORT"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["grpc-watch"] == port
    (service,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "agent-svc"]
    exposed = {p["name"]: p for p in service["spec"]["ports"]}
    assert exposed["grpc-watch"]["targetPort"] == "grpc-watch"
    (ingress,) = [
        n for n in of_kind(docs, "NetworkPolicy") if n["metadata"]["name"] == "agent-svc-ingress"
    ]
    for rule in ingress["spec"]["ingress"]:
        assert {named["grpc"], port} <= {p["port"] for p in rule["ports"]}


def test_rules_catch_a_bad_manifest() -> None:
    """The rules are not vacuous: a Deployment breaking each of them is reported."""
    bad: list[Doc] = [
        {"kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "dg=="}},
        {
            "kind": "Service",
            "metadata": {"name": "bad"},
            "spec": {"selector": {"app": "bad"}, "ports": [{"name": "grpc", "port": 1}]},
        },
        {
            "kind": "Job",
            "metadata": {"name": "bad-migrate", "annotations": {SYNC_WAVE: "1"}},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [{"name": "m", "envFrom": [{"configMapRef": {"name": "c"}}]}]
                    }
                }
            },
        },
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


def test_new_rules_report_what_they_should() -> None:
    """appProtocol and sync-wave rules on small hand-made manifests."""
    service = {
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": {
            "ports": [
                {"name": "grpc", "port": 1, "appProtocol": "grpc"},
                {"name": "metrics", "port": 2, "appProtocol": "grpc"},
                {"name": "other", "port": 3},
            ]
        },
    }
    assert app_protocol_violations([service]) == [
        "Service/s port metrics: appProtocol grpc, not http",
        "Service/s port other: no appProtocol",
    ]

    def job(name: str, annotations: dict[str, str], suspend: bool = False) -> Doc:
        pod = {
            "serviceAccountName": "sa",
            "containers": [{"name": "m", "envFrom": [{"configMapRef": {"name": "cm"}}]}],
            "volumes": [{"name": "k", "secret": {"secretName": "keys"}}],
        }
        return {
            "kind": "Job",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"suspend": suspend, "template": {"spec": pod}},
        }

    def obj(kind: str, name: str, at: int, **spec: Any) -> Doc:
        return {
            "kind": kind,
            "metadata": {"name": name, "annotations": {SYNC_WAVE: str(at)}},
            "spec": spec,
        }

    deployment = {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {}}
    ready = [
        obj("ServiceAccount", "sa", -2),
        obj("ConfigMap", "cm", -2),
        obj("ExternalSecret", "es", -2, target={"name": "keys"}),
        obj("NetworkPolicy", "deny", -2),
        deployment,
    ]
    hook = {
        SYNC_WAVE: "-1",
        HOOK: "Sync",
        HOOK_DELETE_POLICY: "BeforeHookCreation",
    }
    assert sync_wave_violations([*ready, job("m", hook)]) == []
    assert sync_wave_violations([*ready, job("m", {})]) == [
        "Job/m: sync wave None is not before the Deployments' (0)"
    ]
    assert sync_wave_violations([*ready, job("m", {**hook, HOOK_DELETE_POLICY: ""})]) == [
        "Job/m: a hook Job needs hook-delete-policy BeforeHookCreation"
    ]
    late = [obj("ConfigMap", "cm", 0), obj("ExternalSecret", "es", -1, target={"name": "keys"})]
    assert sync_wave_violations([*ready[:1], *late, deployment, job("m", hook)]) == [
        "Job/m (wave -1) needs ConfigMap/cm (wave 0) in an earlier wave",
        "Job/m (wave -1) needs ExternalSecret/es (wave -1) in an earlier wave",
    ]
    assert sync_wave_violations([*ready, job("admin", hook, suspend=True)]) == [
        "Job/admin: suspended, so it must not be a hook",
        "Job/admin: suspended, so not in a wave before the Deployments",
    ]


def test_the_migration_jobs_run_in_wave_minus_one(docs: list[Doc]) -> None:
    migrations = [j for j in of_kind(docs, "Job") if j["metadata"]["name"].endswith("-migrate")]
    assert len(migrations) == 2
    assert {wave(j) for j in migrations} == {-1}
    assert {wave(d) for d in of_kind(docs, "Deployment")} == {0}


EXTERNAL_SECRETS = {
    "auth-svc-secrets": {"database-url", "redis-url", "client-secret-key", "key-encryption-keys"},
    "auth-svc-signing-key": {"signing-key.pem", "verify-keys.pem"},
    "agent-svc-secrets": {"database-url", "redis-url", "page-token-secret"},
}


def test_external_secrets_make_the_secrets_the_manifests_read() -> None:
    docs = render("examples/prod-external-secrets")
    made = {
        doc["spec"]["target"]["name"]: {item["secretKey"] for item in doc["spec"]["data"]}
        for doc in of_kind(docs, "ExternalSecret")
    }
    assert made == EXTERNAL_SECRETS
    # Every key a workload reads from those Secrets is made: secretKeyRef keys, and the
    # files the settings name under a mounted Secret (the signing key and the verify keys).
    for w in workloads(docs):
        mounts = {
            v["name"]: v["secret"]["secretName"]
            for v in w.spec.get("volumes") or []
            if "secret" in v
        }
        for c in w.containers():
            for item in c.get("env") or []:
                ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] in made:
                    assert ref["key"] in made[ref["name"]], f"{w.label}: {ref}"
            paths = {
                m["mountPath"]: mounts[m["name"]]
                for m in c.get("volumeMounts") or []
                if m["name"] in mounts
            }
            for value in environment(c, docs).values():
                directory, _, file = value.rpartition("/")
                if paths.get(directory) in made:
                    assert file in made[paths[directory]], f"{w.label}: {value}"
    for doc in of_kind(docs, "ExternalSecret"):
        assert wave(doc) < -1, "the Secrets before the migration Jobs"
        assert doc["spec"]["secretStoreRef"] == {
            "kind": "ClusterSecretStore",
            "name": "agentplatform",
        }
