#!/usr/bin/env bash
# buf lint (STANDARD), buf generate (buf.gen.yaml) against the committed code, and buf
# breaking against main (or, on main, the previous commit).
# buf comes from the npm package @bufbuild/buf, installed into .tools/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUF_VERSION=1.75.0
BUF="$ROOT/.tools/node_modules/.bin/buf"
if [ ! -x "$BUF" ] || [ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    if [ "${CI:-}" = "true" ]; then
      echo "error: npm is needed to install buf" >&2
      exit 1
    fi
    echo "skipping buf checks: npm is not installed (install Node.js to run them)"
    exit 0
  fi
  mkdir -p .tools
  npm install --prefix .tools --silent --no-audit --no-fund --ignore-scripts \
    "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
"$BUF" lint
echo "buf lint: ok"

# buf generate (buf.gen.yaml) must give the committed code: its plugins are grpcio-tools'
# and mypy-protobuf's, from the dev venv (scripts/test puts it first on PATH).
VENV_BIN="${AGENTPLATFORM_VENV:-$ROOT/.venv}/bin"
[ -d "$VENV_BIN" ] && export PATH="$VENV_BIN:$PATH"
if python -c 'import grpc_tools, mypy_protobuf' 2>/dev/null; then
  generated="$(mktemp -d)"
  "$BUF" generate -o "$generated/out" >"$generated/log" 2>&1 || {
    cat "$generated/log" >&2
    exit 1
  }
  "$BUF" build protos --exclude-imports --as-file-descriptor-set -o "$generated/set.binpb"
  python scripts/buf_generate_check.py "$generated/out" "$generated/set.binpb"
  rm -rf "$generated"
elif [ "${CI:-}" = "true" ]; then
  echo "error: buf generate needs grpcio-tools and mypy-protobuf (the dev extras)" >&2
  exit 1
else
  echo "skipping buf generate check: grpcio-tools / mypy-protobuf not installed"
fi

against=""
branch="$(git rev-parse --abbrev-ref HEAD 2>/dev/null || true)"
if [ "$branch" != "main" ] && git rev-parse --verify -q main >/dev/null; then
  against="main"
elif git rev-parse --verify -q HEAD~1 >/dev/null; then
  against="$(git rev-parse HEAD~1)"
fi
if [ -n "$against" ] && git cat-file -e "$against:buf.yaml" 2>/dev/null; then
  # Images of our protos module only (the workspace also holds vendored imports, and an
  # earlier commit may have had a workspace of one module: images compare either way).
  images="$(mktemp -d)"
  trap 'rm -rf "$images"' EXIT
  "$BUF" build protos -o "$images/current.binpb"
  "$BUF" build ".git#ref=$against" -o "$images/against.binpb"
  "$BUF" breaking "$images/current.binpb" --against "$images/against.binpb"
  echo "buf breaking against $against: ok"
else
  echo "buf breaking: no earlier protos to compare with"
fi
