#!/usr/bin/env bash
# Make sure the services the tests talk to answer on loopback, starting (and on a
# bare Debian machine, installing) them when they do not:
#   Redis       127.0.0.1:6379
#   PostgreSQL  127.0.0.1:5432, user postgres, trust auth, database "test"
# Prints what it did; exits non-zero when a service cannot be brought up.
set -uo pipefail
log() { echo "ensure-services: $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done; return 1; }

status=0
# -- Redis ---------------------------------------------------------------------------
if port_open 6379; then
  log "redis: up"
else
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p /tmp/ls-backend-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/ls-backend-redis --logfile /tmp/ls-backend-redis/redis.log >/dev/null 2>&1 || true
  if wait_port 6379; then log "redis: started"; else log "redis: could not be started"; status=1; fi
fi

# -- PostgreSQL ----------------------------------------------------------------------
if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql || true; fi
  version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
  if [ -n "$version" ]; then
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba" 2>/dev/null; then
      as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba" || true
    fi
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
  fi
  if wait_port 5432; then log "postgresql: started"; else log "postgresql: could not be started"; status=1; fi
else
  log "postgresql: up"
fi
if port_open 5432 && command -v psql >/dev/null; then
  if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" 2>/dev/null | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "create database test" >/dev/null 2>&1 && log "postgresql: created database test"
  fi
fi
exit $status
