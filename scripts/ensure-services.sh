#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer, for the integration and end-to-end tests.
# On a machine without them, installs Debian's packages (postgresql, redis-server); then configures PostgreSQL for
# trust auth on loopback with the `postgres` role and a `test` database, starts both and waits for them.
# Idempotent: on a machine where both already answer it returns in well under a second.
set -euo pipefail

PG_PORT=5432
REDIS_PORT=6379

pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "ERROR: '$*' needs root; run this script as root or install sudo." >&2; exit 1; fi; }
wait_for() {  # wait_for NAME CHECK: up to 30 s
  for _ in $(seq 1 60); do "$2" && return 0; sleep 0.5; done
  return 1
}

missing=()
[ -x "$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -n1)" ] || missing+=(postgresql)
command -v pg_isready >/dev/null || missing+=(postgresql-client)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  started=$(date +%s)
  echo "==> installing ${missing[*]} from Debian's packages (first time only, about a minute)"
  as_root apt-get update -qq
  # The packages' own start scripts are not needed (no init system here): this script starts the servers.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    postgresql postgresql-client redis-server >/dev/null
  echo "==> installed in $(( $(date +%s) - started )) s"
fi

if ! pg_up; then
  version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -qx "$version main"; then
    echo "==> creating PostgreSQL $version cluster 'main'"
    as_root pg_createcluster "$version" main --port "$PG_PORT" >/dev/null
  fi
  conf=/etc/postgresql/$version/main
  # Tests connect as `postgres` over TCP with no password: trust on loopback only, ahead of every other rule.
  if ! grep -q "^# batch-gateway tests" "$conf/pg_hba.conf"; then
    echo "==> PostgreSQL: trust auth for 127.0.0.1 and ::1"
    as_root sed -i "1i # batch-gateway tests: trust on loopback\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust" \
      "$conf/pg_hba.conf"
  fi
  as_root tee "$conf/conf.d/batch-gateway-tests.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  echo "==> starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for PostgreSQL pg_up || {
    echo "ERROR: PostgreSQL does not answer on 127.0.0.1:$PG_PORT. See /var/log/postgresql/ and retry." >&2; exit 1; }
fi
if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc "SELECT 1" >/dev/null 2>&1; then
  echo "ERROR: PostgreSQL answers but refuses 'postgres' without a password on 127.0.0.1." >&2
  echo "       Add 'host all all 127.0.0.1/32 trust' at the top of its pg_hba.conf and reload it." >&2
  exit 1
fi
if [ -z "$(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'")" ]; then
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "CREATE DATABASE test" >/dev/null
fi

if ! redis_up; then
  echo "==> starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --logfile /tmp/batch-gateway-redis.log >/dev/null
  wait_for Redis redis_up || {
    echo "ERROR: Redis does not answer on 127.0.0.1:$REDIS_PORT. See /tmp/batch-gateway-redis.log and retry." >&2; exit 1; }
fi
echo "==> PostgreSQL (127.0.0.1:$PG_PORT) and Redis (127.0.0.1:$REDIS_PORT) are up"
