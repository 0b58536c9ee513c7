"""The client package works with exactly the oldest versions it claims, and brings nothing
of the servers: a fresh venv gets agentplatform-client (built from clients/python) with
the floors of its pyproject.toml pinned exactly, makes a round trip to a tiny server in that
venv, and holds only the client's dependencies and one new top-level package.

Slow-ish (a venv and four wheels from PyPI): marked `pypi`; it runs in CI (`.ci/run`),
and locally it skips if PyPI cannot be reached (`-m "not pypi"` deselects it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.pypi

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
# Distributions the client must never pull in (the servers' dependencies).
SERVER_ONLY = {
    "sqlalchemy",
    "alembic",
    "psycopg",
    "psycopg-binary",
    "redis",
    "hiredis",
    "pyjwt",
    "argon2-cffi",
    "cryptography",
    "prometheus-client",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "grpcio-status",
    "grpcio-health-checking",
    "grpcio-reflection",
    "agentplatform",
}
# What the client's dependencies themselves require (grpcio needs typing-extensions).
ALLOWED = {"agentplatform-client", "grpcio", "protobuf", "googleapis-common-protos"}
ALLOWED_TRANSITIVE = {"typing-extensions"}


def floors() -> dict[str, str]:
    """The `>=` floor of each dependency in clients/python/pyproject.toml."""
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+),<[0-9.]+", requirement)
        assert match, f"a floor and a ceiling: {requirement}"
        found[match.group(1).lower()] = match.group(2)
    return found


ROUND_TRIP = r"""
import grpc
from concurrent import futures
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.client import AgentsClient, NotFound, connect, static_token

calls = []
DETAILS = "grpc-status-details-bin"


def refuse(context, code, message, detail):
    status = status_pb2.Status(code=code.value[0], message=message)
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)
    context.set_trailing_metadata(((DETAILS, status.SerializeToString()),))
    context.abort(code, message)


class Agents(agent_pb2_grpc.AgentServiceServicer):
    def GetAgent(self, request, context):
        calls.append(dict(context.invocation_metadata()).get("authorization"))
        if request.id == "gone":
            info = error_details_pb2.ErrorInfo(reason="AGENT_NOT_FOUND")
            refuse(context, grpc.StatusCode.NOT_FOUND, "no agent", info)
        if len(calls) == 1:  # refused once with a RetryInfo, then served
            delay = duration_pb2.Duration(nanos=50_000_000)
            retry = error_details_pb2.RetryInfo(retry_delay=delay)
            refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry)
        return agent_pb2.GetAgentResponse(agent=agent_pb2.Agent(id=request.id, name="bot"))


server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
agent_pb2_grpc.add_AgentServiceServicer_to_server(Agents(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with connect(f"127.0.0.1:{port}", static_token("tok")) as channel:
    agents = AgentsClient(channel)
    assert agents.get("a1").name == "bot"
    assert calls == ["Bearer tok", "Bearer tok"], calls
    try:
        agents.get("gone")
    except NotFound as error:
        assert error.reason == "AGENT_NOT_FOUND", error.reason
    else:
        raise AssertionError("no NotFound")
server.stop(None)
import google.protobuf, importlib.metadata as md
versions = {
    "grpcio": grpc.__version__,
    "protobuf": google.protobuf.__version__,
    "googleapis-common-protos": md.version("googleapis-common-protos"),
}
print(json.dumps(versions))
""".replace("import grpc\n", "import grpc, json\n", 1)


def run(
    *args: str | Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: PLW1510 - the caller checks
        [str(a) for a in args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )


def test_the_oldest_claimed_versions_install_and_make_a_round_trip(tmp_path: Path) -> None:
    pins = floors()
    assert set(pins) == ALLOWED - {"agentplatform-client"}
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    install = run(
        python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--only-binary=grpcio,protobuf,googleapis-common-protos",
        *(f"{name}=={version}" for name, version in pins.items()),
        CLIENT,
        env=env,
    )
    if install.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"pip install failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}")
        pytest.skip(f"pip install failed (PyPI unreachable?): {install.stderr.strip()[-300:]}")

    # Only the client, its dependencies (at exactly the floors) and theirs.
    listed = run(python, "-m", "pip", "list", "--format=json", env=env)
    installed = {
        p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)
    }
    installed.pop("pip", None)
    installed.pop("setuptools", None)
    assert not SERVER_ONLY & set(installed), installed
    assert set(installed) <= ALLOWED | ALLOWED_TRANSITIVE, installed
    for name, version in pins.items():
        assert installed[name] == version

    # One top-level package: agentplatform (RECORD and top_level.txt of the distribution).
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", env=env)
    purelib = Path(site.stdout.strip())
    (dist_info,) = purelib.glob("agentplatform_client-*.dist-info")
    tops = {
        line.split(",")[0].split("/")[0]
        for line in (dist_info / "RECORD").read_text().splitlines()
        if line and not line.startswith(("../", dist_info.name))
    }
    assert tops == {"agentplatform"}
    assert (dist_info / "top_level.txt").read_text().split() == ["agentplatform"]
    assert (purelib / "agentplatform" / "py.typed").is_file()
    assert (purelib / "agentplatform" / "descriptor_set.binpb").is_file()

    # Generated code and client library at those versions: a round trip, from outside the
    # repository (so nothing of it is importable but the installed package).
    trip = run(python, "-c", ROUND_TRIP, env=env, cwd=tmp_path)
    assert trip.returncode == 0, trip.stderr
    assert json.loads(trip.stdout.strip().splitlines()[-1]) == pins
    assert sys.version_info >= (3, 11)
