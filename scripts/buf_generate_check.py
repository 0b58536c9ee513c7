"""Checks `buf generate` (buf.gen.yaml) against the committed generated code.

    python scripts/buf_generate_check.py OUT SET

OUT is where `buf generate -o OUT` wrote (OUT/clients/python/src/...), SET the output of
`buf build protos --exclude-imports --as-file-descriptor-set`. Checked:

- every file buf generates (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py, *_pb2_grpc.pyi) equals the
  committed one byte for byte, and buf generates every committed one of those kinds;
- the committed descriptor set (agentplatform/descriptor_set.binpb, written by protoc with
  source info) holds the same files and, source info aside, the same descriptors as
  buf's, and the same comments at the same places. It cannot be byte for byte: buf's
  compiler records other source spans than protoc's (e.g. an enum value's span ends before
  its `;`), so only the comments are compared. buf does not write the __init__.py files
  and py.typed (scripts/gen_protos.py does).
"""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
SRC = Path("clients") / "python" / "src"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def comments(file: descriptor_pb2.FileDescriptorProto) -> set[tuple[object, ...]]:
    return {
        (
            tuple(loc.path),
            loc.leading_comments,
            loc.trailing_comments,
            *loc.leading_detached_comments,
        )
        for loc in file.source_code_info.location
    }


def main() -> int:
    out, set_path = Path(sys.argv[1]) / SRC, Path(sys.argv[2])
    committed_root = ROOT / SRC
    problems: list[str] = []
    theirs = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    ours = {
        p.relative_to(committed_root)
        for p in (committed_root / "agentplatform").rglob("*")
        if p.is_file() and p.name.endswith(GENERATED)
    }
    problems += [f"buf does not generate {n}" for n in sorted(ours - theirs)]
    problems += [f"buf generates {n}, not committed" for n in sorted(theirs - ours)]
    problems += [
        f"differs from buf's output: {n}"
        for n in sorted(ours & theirs)
        if (out / n).read_bytes() != (committed_root / n).read_bytes()
    ]

    buf_set = descriptor_pb2.FileDescriptorSet.FromString(set_path.read_bytes())
    committed = descriptor_pb2.FileDescriptorSet.FromString(
        (committed_root / "agentplatform" / "descriptor_set.binpb").read_bytes()
    )
    buf_files = {f.name: f for f in buf_set.file}
    our_files = {f.name: f for f in committed.file}
    if set(buf_files) != set(our_files):
        problems.append(f"descriptor set files: buf {sorted(buf_files)}, ours {sorted(our_files)}")
    for name in sorted(set(buf_files) & set(our_files)):
        theirs_file, ours_file = buf_files[name], our_files[name]
        if comments(theirs_file) != comments(ours_file):
            problems.append(f"descriptor set: the comments of {name} differ")
        theirs_file.ClearField("source_code_info")
        ours_file.ClearField("source_code_info")
        if theirs_file != ours_file:
            problems.append(f"descriptor set: {name} differs (source info aside)")

    if problems:
        print("buf generate differs from the committed code:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    print(f"buf generate: {len(ours)} files identical; descriptor set equivalent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
