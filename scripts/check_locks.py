"""Checks, offline, that the lock files (requirements/runtime.txt, requirements/dev.txt) are
current with respect to pyproject.toml and clients/python/pyproject.toml:

  - each lock records the digest of its inputs (every dependency list of both pyproject
    files, their requires-python, requirements/*.in) as `# inputs-sha256: ...`, written by
    scripts/lock.sh; a dependency changed since the lock was made changes the digest;
  - every dependency pyproject.toml declares is pinned (`==`) at a version its specifier
    allows, and so is every dependency that each requested extra (psycopg[binary],
    PyJWT[crypto], ...) adds, as far as the installed distributions' metadata says;
  - every pin has at least one --hash, and no line names a local path or an editable;
  - what both locks pin, they pin alike (dev.txt is constrained by runtime.txt).

    python scripts/check_locks.py            exit 1 and the problems, or "locks: ok"
    python scripts/check_locks.py --stamp F  (scripts/lock.sh) record the digest in lock F

Regenerate with scripts/lock.sh; `scripts/lock.sh --check` re-resolves against PyPI.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
STAMP = "# inputs-sha256: "
LOCAL = {"agentplatform", "agentplatform-client"}
# The environment the locks are checked for: the images' (CPython 3.11 on Linux).
ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.13",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
}


@dataclass
class Pin:
    name: str
    version: str
    marker: str = ""
    hashes: list[str] = field(default_factory=list)


def parse_lock(text: str) -> tuple[dict[str, Pin], list[str]]:
    """The pins of a `pip-compile --generate-hashes`-style file, and what is malformed."""
    pins: dict[str, Pin] = {}
    problems: list[str] = []
    # Join continuation lines; drop comments (`# via ...`).
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            if current:
                logical.append(current)
                current = ""
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    for line in logical:
        entry = line.strip()
        if entry.startswith(("-e", "--editable", ".", "/", "file:")) or "file:" in entry:
            problems.append(f"a local path or editable: {entry[:80]}")
            continue
        if entry.startswith("-"):
            problems.append(f"an option line: {entry[:80]}")
            continue
        hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", entry)
        requirement = Requirement(re.sub(r"\s*--hash=\S+", "", entry).strip())
        name = canonicalize_name(requirement.name)
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(f"{name}: not pinned with == ({requirement.specifier})")
            continue
        if not hashes:
            problems.append(f"{name}: no --hash")
        pins[name] = Pin(name, specs[0].version, str(requirement.marker or ""), hashes)
    return pins, problems


def _project(root: Path, path: str) -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((root / path).read_text())["project"]
    return project


def inputs_digest(root: Path = ROOT) -> str:
    """What the locks are made from, less comments and formatting."""
    inputs: dict[str, object] = {}
    for path in ("pyproject.toml", "clients/python/pyproject.toml"):
        project = _project(root, path)
        inputs[path] = {
            "requires-python": project.get("requires-python"),
            "dependencies": sorted(project.get("dependencies", [])),  # type: ignore[call-overload]
            "optional-dependencies": {
                extra: sorted(reqs)
                for extra, reqs in project.get("optional-dependencies", {}).items()  # type: ignore[attr-defined]
            },
        }
    for source in sorted((root / "requirements").glob("*.in")):
        lines = [
            line.strip()
            for line in source.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        inputs[f"requirements/{source.name}"] = lines
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def declared(root: Path, lock: str) -> list[Requirement]:
    """The direct dependencies a lock must satisfy (the local packages excluded)."""
    server = _project(root, "pyproject.toml")
    client = _project(root, "clients/python/pyproject.toml")
    found = [*server["dependencies"], *client["dependencies"]]  # type: ignore[misc]
    if lock == "dev":
        found += server["optional-dependencies"]["dev"]  # type: ignore[index]
        found += client["optional-dependencies"]["jwt"]  # type: ignore[index]
    requirements = [Requirement(r) for r in found]
    return [r for r in requirements if canonicalize_name(r.name) not in LOCAL]


def applies(requirement: Requirement, extra: str = "") -> bool:
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({**ENVIRONMENT, "extra": extra})


def extra_requirements(name: str, version: str, extras: set[str]) -> list[Requirement] | None:
    """What the extras of an installed distribution add; None if not installed at `version`."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if Version(dist.version) != Version(version):
        return None
    added = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None:
            continue
        if any(applies(requirement, extra) for extra in extras) and not applies(requirement):
            requirement.marker = None
            added.append(requirement)
    return added


def check_lock(root: Path, lock: str) -> tuple[dict[str, Pin], list[str]]:
    path = root / "requirements" / f"{lock}.txt"
    where = f"requirements/{lock}.txt"
    if not path.is_file():
        return {}, [f"{where} is missing: run scripts/lock.sh"]
    text = path.read_text()
    pins, malformed = parse_lock(text)
    problems = [f"{where}: {p}" for p in malformed]
    stamps = [line[len(STAMP) :].strip() for line in text.splitlines() if line.startswith(STAMP)]
    if stamps != [inputs_digest(root)]:
        problems.append(
            f"{where} was not made from the current pyproject.toml / requirements/*.in "
            "(its inputs-sha256 differs): run scripts/lock.sh and commit the result"
        )
    wanted = [(r, "pyproject.toml") for r in declared(root, lock)]
    seen: set[tuple[str, str]] = set()
    while wanted:
        requirement, why = wanted.pop()
        name = canonicalize_name(requirement.name)
        if not applies(requirement) or (name, str(requirement)) in seen:
            continue
        seen.add((name, str(requirement)))
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{where}: {requirement} ({why}) is not pinned")
            continue
        if not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{where}: {name}=={pin.version} does not satisfy {requirement}")
        if requirement.extras:
            added = extra_requirements(name, pin.version, set(requirement.extras))
            for extra in added or []:
                wanted.append((extra, f"{name}[{','.join(sorted(requirement.extras))}]"))
    return pins, problems


def check(root: Path = ROOT) -> list[str]:
    runtime, problems = check_lock(root, "runtime")
    dev, dev_problems = check_lock(root, "dev")
    problems += dev_problems
    for name, pin in runtime.items():
        other = dev.get(name)
        if other is not None and (other.version, sorted(other.hashes)) != (
            pin.version,
            sorted(pin.hashes),
        ):
            problems.append(
                f"{name}: runtime.txt pins {pin.version}, dev.txt {other.version} "
                "(or other hashes): run scripts/lock.sh"
            )
    return problems


def stamp(path: Path, root: Path = ROOT) -> None:
    lines = [line for line in path.read_text().splitlines() if not line.startswith(STAMP)]
    # After uv's header (the leading comment block), before the first pin.
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    lines.insert(at, STAMP + inputs_digest(root))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--stamp"] and len(argv) == 2:
        stamp(Path(argv[1]))
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    problems = check()
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("locks: ok (requirements/runtime.txt, requirements/dev.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
