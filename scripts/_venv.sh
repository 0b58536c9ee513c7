# Sourced by scripts/run and scripts/test: finds Python 3.11+, creates .venv and installs
# the locked dependencies (requirements/*.txt, hash-pinned) whenever they or pyproject.toml
# changed since last time, then the project and the client package (clients/python: the
# generated code and agentplatform.client), editable, without dependencies.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AGENTPLATFORM_VENV:-$ROOT/.venv}"

find_python() {
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: Python 3.11 or newer is required (none found on PATH)" >&2
  return 1
}

ensure_venv() {
  # ensure_venv dev: requirements/dev.txt; ensure_venv "": requirements/runtime.txt. Both are
  # hash-pinned lock files (scripts/lock.sh), installed with --require-hashes; the two local
  # packages (the servers, clients/python) follow, editable and with --no-deps.
  local extras="${1:-}" lock stamp want
  lock="$ROOT/requirements/${extras:-runtime}.txt"
  if [ ! -f "$lock" ]; then
    echo "error: no lock file $lock (extras: ${extras:-none})" >&2
    return 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$(find_python)" -m venv "$VENV"
  fi
  stamp="$VENV/.installed-${extras:-base}"
  want="$(cat "$ROOT/pyproject.toml" "$ROOT/clients/python/pyproject.toml" "$lock" | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "==> installing ${lock#"$ROOT"/} and the local packages into $VENV (log: $VENV/install.log)"
    if ! {
      "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
        "$VENV/bin/python" -m pip install --disable-pip-version-check --require-hashes \
          -r "$lock" &&
        (cd "$ROOT" && "$VENV/bin/python" -m pip install --disable-pip-version-check \
          --no-deps -e ./clients/python -e .)
    } >"$VENV/install.log" 2>&1; then
      tail -n 30 "$VENV/install.log" >&2
      echo "error: installing ${lock#"$ROOT"/} failed; see $VENV/install.log" >&2
      return 1
    fi
    echo "$want" >"$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}
