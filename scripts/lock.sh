#!/usr/bin/env bash
# Regenerates the hash-pinned lock files from pyproject.toml and clients/python/pyproject.toml
# (uv pip compile --generate-hashes; uv is pinned in the dev extras):
#   requirements/runtime.txt  the servers' and the client package's runtime dependencies:
#                             what the images install (--require-hashes)
#   requirements/dev.txt      that, plus the dev extras: what scripts/_venv.sh (so scripts/test,
#                             .ci/run and CI) installs (--require-hashes)
# The inputs are requirements/*.in; the two local packages are left out of both locks and
# installed after them with --no-deps.
#
#   scripts/lock.sh                          after changing a dependency: keeps every pin that
#                                            still satisfies pyproject.toml, resolves the rest
#   scripts/lock.sh --upgrade                everything to the newest versions allowed
#   scripts/lock.sh --upgrade-package grpcio one package (repeatable)
#   scripts/lock.sh --check                  re-resolves into a temporary directory and fails
#                                            if the committed locks differ (needs PyPI)
# Commit the .txt files with the pyproject change. scripts/check_locks.py (offline, run by
# scripts/validate_deploy.sh) fails while they are stale.
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv dev
cd "$ROOT" || exit 1

check=false
args=()
for arg in "$@"; do
  if [ "$arg" = "--check" ]; then check=true; else args+=("$arg"); fi
done

compile() { # compile NAME OUTPUT
  # --universal: one lock for every platform (markers where they differ), with the hashes of
  # every wheel of each pinned version, so the same file installs on Linux (the images, CI)
  # and on a developer's Mac. Python 3.11 is the oldest we support and the images' version.
  uv pip compile --quiet --generate-hashes --universal --python-version 3.11 \
    --no-emit-package agentplatform --no-emit-package agentplatform-client \
    --custom-compile-command "scripts/lock.sh" \
    ${args[@]+"${args[@]}"} -o "$2" "requirements/$1.in"
  python scripts/check_locks.py --stamp "$2"
}

if $check; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  status=0
  for name in runtime dev; do
    # The committed lock is the starting point (its pins are kept where they still fit).
    cp "requirements/$name.txt" "$tmp/$name.txt"
    compile "$name" "$tmp/$name.txt"
    if ! diff -u "requirements/$name.txt" "$tmp/$name.txt"; then
      echo "requirements/$name.txt is not what scripts/lock.sh makes: run it and commit" >&2
      status=1
    fi
  done
  exit $status
fi

for name in runtime dev; do
  echo "==> requirements/$name.txt"
  compile "$name" "requirements/$name.txt"
done
