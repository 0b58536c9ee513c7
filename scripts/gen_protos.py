"""Generate Python code and typed stubs from protos/ into gen/ (one command, reproducible).

    python scripts/gen_protos.py          # regenerate gen/
    python scripts/gen_protos.py --check  # fail if gen/ is not what protos/ generates

The proto tree mirrors the Python package path (`-I protos`), so the generated
`*_pb2_grpc.py` imports resolve without rewriting.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# Vendored imports (google/api/field_behavior.proto): resolved, not generated (their
# Python code comes with googleapis-common-protos).
THIRD_PARTY = ROOT / "third_party" / "googleapis"
GEN = ROOT / "gen"
DESCRIPTOR_SET = "descriptor_set.binpb"


def generate(out: Path) -> None:
    """Runs protoc (from grpcio-tools) with the mypy-protobuf plugins into `out`."""
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Our files' descriptors with their comments (source info), which the generated modules
    # do not keep: the servers' reflection serves these, so `grpcurl describe` shows them.
    descriptors = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{include}",
        "--include_source_info",
        f"--descriptor_set_out={out / 'agentplatform' / DESCRIPTOR_SET}",
        *files,
    ]
    if protoc.main(descriptors) != 0:
        raise SystemExit("protoc failed (descriptor set)")
    for directory in [out, *(d for d in out.rglob("*") if d.is_dir())]:
        if directory != out:
            (directory / "__init__.py").touch()
    (out / "agentplatform" / "py.typed").touch()


def differences(left: Path, right: Path) -> list[str]:
    """Relative paths that differ between two trees (missing on either side included)."""
    names = {p.relative_to(left) for p in left.rglob("*") if p.is_file()}
    names |= {p.relative_to(right) for p in right.rglob("*") if p.is_file()}
    names = {n for n in names if "__pycache__" not in n.parts}
    return sorted(
        str(n)
        for n in names
        if not ((left / n).is_file() and (right / n).is_file())
        or not filecmp.cmp(left / n, right / n, shallow=False)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify gen/ is current")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if check:
            stale = differences(fresh, GEN)
            if stale:
                print("gen/ is out of date; run: python scripts/gen_protos.py", file=sys.stderr)
                print("\n".join(f"  {name}" for name in stale), file=sys.stderr)
                return 1
            print("gen/ is current")
            return 0
        shutil.rmtree(GEN, ignore_errors=True)
        shutil.copytree(fresh, GEN)
    print(f"generated {GEN.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
