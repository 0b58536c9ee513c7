#!/usr/bin/env bash
# Makes sure the PostgreSQL and Redis the tests need answer on 127.0.0.1, starting the
# machine's own servers if they are installed but stopped, and installs pgbouncer (the
# transaction-pooler tests start a private one) when it is missing and apt-get may run.
set -uo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 6379 && command -v redis-server >/dev/null 2>&1; then
  echo "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}" >/dev/null
fi
if ! port_open 5432 && command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "starting the PostgreSQL cluster"
  for version in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
fi
has_pgbouncer() { command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; }
if ! has_pgbouncer && command -v apt-get >/dev/null 2>&1; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
  if [ "${#as_root[@]}" -eq 0 ] || sudo -n true 2>/dev/null; then
    echo "installing pgbouncer"
    "${as_root[@]}" apt-get install -y --no-install-recommends pgbouncer >/dev/null 2>&1 \
      || { "${as_root[@]}" apt-get update >/dev/null 2>&1 \
        && "${as_root[@]}" apt-get install -y --no-install-recommends pgbouncer >/dev/null 2>&1; }
  fi
  has_pgbouncer || echo "warning: pgbouncer could not be installed (its tests fail with CI=true)"
fi
for _ in $(seq 1 30); do
  port_open 5432 && port_open 6379 && exit 0
  sleep 1
done
port_open 5432 || echo "warning: PostgreSQL does not answer on 127.0.0.1:5432"
port_open 6379 || echo "warning: Redis does not answer on 127.0.0.1:6379"
exit 0
