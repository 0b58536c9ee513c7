"""Supply chain: the hash-pinned lock files (requirements/), the images' base and labels.

Offline: the locks are current (scripts/check_locks.py) and the check catches each way a
lock goes stale; both Dockerfiles pin one base image by tag and digest in a literal FROM
(what Dependabot reads), install from the runtime lock with --require-hashes, and carry
the OCI labels. Marked `pypi` (CI runs them; locally they skip without PyPI): the runtime
lock alone installs into a fresh venv as the Dockerfiles install it, and a re-resolution
(`scripts/lock.sh --check`) gives the committed locks back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest
import yaml

from scripts import check_locks
from tests.helpers import unavailable

ROOT = Path(__file__).resolve().parents[2]

DOCKERFILES = sorted(ROOT.glob("Dockerfile.*"))
BASE = re.compile(r"^FROM (python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}) AS base$", re.M)
OCI_LABELS = {"title", "description", "version", "revision", "source", "licenses"}


# ---- lock files ----------------------------------------------------------------------------


def test_the_locks_are_current() -> None:
    assert check_locks.check() == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of what the locks are made from, and the locks."""
    for path in ("pyproject.toml", "clients/python/pyproject.toml", "requirements"):
        source, target = ROOT / path, tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
    assert check_locks.check(tmp_path) == []
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_a_new_dependency_makes_the_locks_stale(tree: Path) -> None:
    edit(tree / "pyproject.toml", '"alembic>=1.13,<2",', '"alembic>=1.13,<2",\n    "rich>=13",')
    problems = check_locks.check(tree)
    assert any("runtime.txt was not made from the current pyproject" in p for p in problems)
    assert any("runtime.txt: rich>=13 (pyproject.toml) is not pinned" in p for p in problems)
    assert any("dev.txt: rich>=13 (pyproject.toml) is not pinned" in p for p in problems)


def test_a_comment_in_pyproject_does_not(tree: Path) -> None:
    edit(tree / "pyproject.toml", "dependencies = [", "dependencies = [\n    # a comment")
    assert check_locks.check(tree) == []


def test_a_pin_outside_the_range_or_without_hashes_is_reported(tree: Path) -> None:
    runtime = tree / "requirements" / "runtime.txt"
    pin = re.search(r"^grpcio==(\S+) \\$", runtime.read_text(), re.M)
    assert pin
    edit(runtime, f"grpcio=={pin.group(1)} \\", "grpcio==1.80.0 \\")
    text = runtime.read_text()
    start = text.index("alembic==")
    block = text[start : text.index("\n    # via", start)]
    runtime.write_text(text.replace(block, block.split(" \\")[0]))
    problems = check_locks.check(tree)
    assert "requirements/runtime.txt: alembic: no --hash" in problems
    assert any("grpcio==1.80.0 does not satisfy grpcio<2,>=1.85.1" in p for p in problems)
    assert any(p.startswith("grpcio: runtime.txt pins 1.80.0, dev.txt") for p in problems)


def test_an_extra_s_dependencies_must_be_pinned(tree: Path) -> None:
    """redis[hiredis]: hiredis comes only with the extra (the installed metadata says so)."""
    for name in ("runtime", "dev"):
        lock = tree / "requirements" / f"{name}.txt"
        text = lock.read_text()
        start = text.index("hiredis==")
        end = re.search(r"^\S", text[start + 1 :], re.M)
        assert end
        lock.write_text(text[:start] + text[start + 1 + end.start() :])
    problems = check_locks.check(tree)
    assert any(
        "runtime.txt: hiredis" in p and "(redis[hiredis]) is not pinned" in p for p in problems
    )


def test_a_local_path_in_a_lock_is_reported() -> None:
    pins, problems = check_locks.parse_lock(
        "-e ./clients/python\nfoo==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    )
    assert problems == ["a local path or editable: -e ./clients/python"]
    assert pins["foo"].version == "1.0"


def test_the_lock_tool_and_the_sbom_tool_are_pinned() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = {r.split("==")[0]: r for r in dev["dev"] if "==" in r}
    assert {"uv", "cyclonedx-bom"} <= set(pinned)


# ---- images ----------------------------------------------------------------------------------


def test_both_images_pin_one_base_by_tag_and_digest() -> None:
    bases = set()
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        froms = re.findall(r"^FROM .*$", text, re.M)
        # One external image, written out (Dependabot does not resolve ARGs in FROM); the
        # other stages start from it.
        found = BASE.findall(text)
        assert len(found) == 1, f"{dockerfile.name}: {froms}"
        assert all(f.startswith("FROM base") for f in froms[1:]), froms
        assert froms[0] == f"FROM {found[0]} AS base"
        bases.add(found[0])
    assert len(bases) == 1, f"the Dockerfiles disagree on the base: {bases}"
    dependabot = yaml.safe_load((ROOT / ".github" / "dependabot.yml").read_text())
    assert {"package-ecosystem": "docker", "directory": "/"}.items() <= next(
        u for u in dependabot["updates"] if u["package-ecosystem"] == "docker"
    ).items()


def test_images_install_from_the_lock_with_hashes() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text().replace("\\\n", " ")
        runs = [
            line for line in text.splitlines() if line.startswith("RUN ") and "pip install" in line
        ]
        lock = [r for r in runs if "-r requirements/runtime.txt" in r]
        assert len(lock) == 1, runs
        assert "--require-hashes" in lock[0]
        assert "--only-binary=:all:" in lock[0]
        local = [r for r in runs if "./clients/python" in r]
        assert len(local) == 1, runs
        assert "--no-deps" in local[0]
        assert runs.index(lock[0]) < runs.index(local[0])
        assert "COPY requirements/runtime.txt requirements/" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "!requirements/runtime.txt" in ignore


def test_images_carry_the_oci_labels() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        labels = set(re.findall(r"org\.opencontainers\.image\.([a-z.]+)=", text))
        assert labels >= OCI_LABELS, f"{dockerfile.name}: {OCI_LABELS - labels}"
        args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
        assert args["VERSION"] == version, "ARG VERSION must be pyproject.toml's version"
        for arg in ("REVISION", "SOURCE", "LICENSES"):
            assert f"${{{arg}}}" in text
        # Last, so that a new revision rebuilds no layer.
        assert text.rindex("LABEL ") > text.rindex("RUN ")
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    build = next(
        s for s in ci["jobs"]["images"]["steps"] if "build-push-action" in s.get("uses", "")
    )
    assert "REVISION=${{ github.sha }}" in build["with"]["build-args"]


def test_ci_uploads_the_sbom() -> None:
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    steps = ci["jobs"]["deploy"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert any(r.startswith("bash scripts/sbom.sh build/sbom/") for r in runs)
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["name"] == "sbom"
    assert upload["with"]["path"].startswith("build/sbom/")


# ---- against PyPI ------------------------------------------------------------------------------


def _run(*args: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: PLW1510 - the caller checks
        [str(a) for a in args], capture_output=True, text=True, timeout=900, cwd=cwd, env=env
    )


@pytest.mark.pypi
def test_the_runtime_lock_alone_installs_the_servers(tmp_path: Path) -> None:
    """What the Dockerfiles do, without Docker: the runtime lock with --require-hashes and
    wheels only (so it is complete: pip refuses any unpinned dependency), the client
    package with --no-deps; then both servers' entry modules import from the source tree."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    pip = (python, "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir")
    lock = _run(
        *pip,
        "--only-binary=:all:",
        "--require-hashes",
        "-r",
        ROOT / "requirements" / "runtime.txt",
        cwd=tmp_path,
        env=env,
    )
    if lock.returncode != 0:
        if "THESE PACKAGES DO NOT MATCH THE HASHES" in lock.stderr or "hash" in lock.stderr.lower():
            pytest.fail(lock.stderr[-3000:])
        unavailable(f"pip install -r requirements/runtime.txt failed (PyPI?): {lock.stderr[-300:]}")
    client = _run(*pip, "--no-deps", ROOT / "clients" / "python", cwd=tmp_path, env=env)
    assert client.returncode == 0, client.stderr[-3000:]
    check = _run(python, "-m", "pip", "check", cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stdout
    imports = _run(
        python,
        "-c",
        "import services.auth_svc.__main__, services.agent_svc.__main__, agentplatform.client",
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert imports.returncode == 0, imports.stderr[-3000:]


@pytest.mark.pypi
def test_re_resolving_gives_the_committed_locks_back() -> None:
    """`scripts/lock.sh --check`: uv re-resolves from requirements/*.in, keeping the committed
    pins where they still fit; any difference (a hand-edited pin, a missing dependency, a
    pin that no longer fits) fails with the diff."""
    result = _run("bash", ROOT / "scripts" / "lock.sh", "--check", cwd=ROOT, env=dict(os.environ))
    if result.returncode != 0 and "is not what scripts/lock.sh makes" not in result.stderr:
        unavailable(f"uv pip compile failed (PyPI?): {result.stderr[-500:]}")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
