# Sourced by scripts/run and scripts/test: finds Python 3.11+, creates .venv and installs
# the project (with the given extras) whenever pyproject.toml changed since last time.
# The client package (clients/python: the generated code and agentplatform.client) goes in
# by the same pip command, editable, so the servers' dependency on it resolves locally.
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
  local extras="${1:-}" spec="." stamp want
  [ -n "$extras" ] && spec=".[$extras]"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$(find_python)" -m venv "$VENV"
  fi
  stamp="$VENV/.installed-${extras:-base}"
  want="$(cat "$ROOT/pyproject.toml" "$ROOT/clients/python/pyproject.toml" | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "==> installing $spec into $VENV (log: $VENV/install.log)"
    if ! {
      "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
        (cd "$ROOT" && "$VENV/bin/python" -m pip install --disable-pip-version-check \
          -e ./clients/python -e "$spec")
    } >"$VENV/install.log" 2>&1; then
      tail -n 30 "$VENV/install.log" >&2
      echo "error: installing $spec failed; see $VENV/install.log" >&2
      return 1
    fi
    echo "$want" >"$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}
