#!/usr/bin/env bash
# Makes sure the PostgreSQL and Redis the tests need answer on 127.0.0.1, starting the
# machine's own servers if they are installed but stopped. Fails loudly otherwise.
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
for _ in $(seq 1 30); do
  port_open 5432 && port_open 6379 && exit 0
  sleep 1
done
port_open 5432 || echo "warning: PostgreSQL does not answer on 127.0.0.1:5432"
port_open 6379 || echo "warning: Redis does not answer on 127.0.0.1:6379"
exit 0
