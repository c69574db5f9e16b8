#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer; start them if they are down.
# The integration and end-to-end tests use both for real.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  echo "==> PostgreSQL is down; starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! redis_up; then
  echo "==> Redis is down; starting it"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  for _ in $(seq 1 30); do redis_up && break; sleep 1; done
fi

pg_up || { echo "ERROR: PostgreSQL does not answer on 127.0.0.1:5432. Start it (pg_ctlcluster ... main start) and retry." >&2; exit 1; }
redis_up || { echo "ERROR: Redis does not answer on 127.0.0.1:6379. Start redis-server and retry." >&2; exit 1; }
echo "==> PostgreSQL and Redis are up"
