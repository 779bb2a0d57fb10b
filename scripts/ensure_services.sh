#!/usr/bin/env bash
# Makes sure the system services the test suite uses exist and run: Redis, PostgreSQL (127.0.0.1:5432,
# database `test`, trust auth) and Chromium with its driver. Installs with apt-get only what is missing,
# so on a machine that already has everything it only checks and returns within a second.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
PG_DB=test
REDIS_PORT=6379

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

log() { printf '    %s\n' "$*"; }

apt_updated=0
apt_install() {
  log "installing with apt-get: $*"
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for_port() {
  local host=$1 port=$2 name=$3
  for _ in $(seq 1 60); do
    if port_open "$host" "$port"; then return 0; fi
    sleep 0.5
  done
  echo "error: $name did not start listening on $host:$port" >&2
  return 1
}

as_postgres() {
  if [ -n "$SUDO" ]; then sudo -u postgres "$@"; else runuser -u postgres -- "$@"; fi
}

ensure_redis() {
  command -v redis-server >/dev/null || apt_install redis-server
  if port_open 127.0.0.1 "$REDIS_PORT"; then
    log "redis: running on 127.0.0.1:$REDIS_PORT"
    return
  fi
  log "redis: starting"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
  wait_for_port 127.0.0.1 "$REDIS_PORT" redis
}

pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1; }

pg_sql() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -X -q -tA "$@"; }

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null || [ -z "$(pg_version)" ]; then apt_install postgresql; fi
  local version
  version=$(pg_version)
  if ! port_open "$PG_HOST" "$PG_PORT"; then
    log "postgres: starting cluster $version/main"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for_port "$PG_HOST" "$PG_PORT" postgres
  fi
  if ! pg_sql -d postgres -c 'select 1' >/dev/null 2>&1; then
    # A fresh cluster asks for a password on TCP; the tests connect as postgres without one.
    log "postgres: enabling trust auth for $PG_HOST"
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    $SUDO sed -i "1i host all all $PG_HOST/32 trust" "$hba"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    sleep 1
    pg_sql -d postgres -c 'select 1' >/dev/null
  fi
  if [ "$(pg_sql -d postgres -c "select 1 from pg_database where datname = '$PG_DB'")" != "1" ]; then
    log "postgres: creating database $PG_DB"
    pg_sql -d postgres -c "create database $PG_DB"
  fi
  log "postgres: running on $PG_HOST:$PG_PORT, database $PG_DB"
}

ensure_chromium() {
  local missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
  log "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
}

ensure_redis
ensure_postgres
ensure_chromium
# The serve test runs the exact curl line `make serve` prints.
command -v curl >/dev/null || apt_install curl
