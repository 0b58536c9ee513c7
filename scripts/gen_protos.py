"""Generate Python code and typed stubs from protos/ into the client package (one command).

    python scripts/gen_protos.py          # regenerate clients/python/src/agentplatform/
    python scripts/gen_protos.py --check  # fail if it is not what protos/ generates

The generated code lives in the `agentplatform-client` distribution (clients/python), which
the servers depend on. The proto tree mirrors the Python package path (`-I protos`), so the
generated `*_pb2_grpc.py` imports resolve without rewriting. Everything under
`clients/python/src/agentplatform/` is generated except the hand-written packages named in
HAND_WRITTEN (the client library), which regeneration leaves alone and --check ignores.
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
# The output root: generation writes <GEN>/agentplatform/...
GEN = ROOT / "clients" / "python" / "src"
PACKAGE = "agentplatform"
# Hand-written subpackages of agentplatform/ (not generated, kept on regeneration).
HAND_WRITTEN = frozenset({"client"})
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


def generated_files(root: Path) -> set[Path]:
    """The files of `root` that code generation owns (relative to `root`)."""
    names = {p.relative_to(root) for p in (root / PACKAGE).rglob("*") if p.is_file()}
    return {
        n
        for n in names
        if "__pycache__" not in n.parts and not (len(n.parts) > 2 and n.parts[1] in HAND_WRITTEN)
    }


def differences(left: Path, right: Path) -> list[str]:
    """Generated files that differ between two trees (missing on either side included)."""
    names = generated_files(left) | generated_files(right)
    return sorted(
        str(n)
        for n in names
        if not ((left / n).is_file() and (right / n).is_file())
        or not filecmp.cmp(left / n, right / n, shallow=False)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the generated code")
    check = parser.parse_args().check
    target = GEN / PACKAGE
    shown = target.relative_to(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if check:
            stale = differences(fresh, GEN)
            if stale:
                print(f"{shown}/ is stale; run: python scripts/gen_protos.py", file=sys.stderr)
                print("\n".join(f"  {name}" for name in stale), file=sys.stderr)
                return 1
            print(f"{shown}/ (generated code) is current")
            return 0
        target.mkdir(parents=True, exist_ok=True)
        for entry in target.iterdir():
            if entry.name in HAND_WRITTEN:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        shutil.copytree(fresh / PACKAGE, target, dirs_exist_ok=True)
    print(f"generated {shown}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
