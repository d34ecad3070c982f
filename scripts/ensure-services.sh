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
# -w: never prompt for a password (there is no one to type it); -q: no command tags
pg_query() { psql -h 127.0.0.1 -U postgres -d postgres -w -qtAc "$1"; }
if ! port_open 5432 && ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql || true; fi
version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
if [ -n "$version" ] && [ -d "/etc/postgresql/$version/main" ] && { ! port_open 5432 || ! pg_query 'select 1' >/dev/null 2>&1; }; then
  # the Debian cluster is down, or up without letting postgres in over TCP: trust loopback, then (re)load
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba" 2>/dev/null; then
    if as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"; then
      log "postgresql: added 'host all all 127.0.0.1/32 trust' to $hba"
    else
      log "postgresql: could not edit $hba (run as root, or with sudo)"
    fi
  fi
  if as_root pg_ctlcluster --skip-systemctl-redirect "$version" main status >/dev/null 2>&1; then
    # running already (apt starts the cluster it installs): pg_hba.conf is read again only on a reload
    if as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload >/dev/null 2>&1; then
      log "postgresql: reloaded cluster $version/main"
    else
      log "postgresql: could not reload cluster $version/main (pg_ctlcluster $version main reload)"
    fi
  else
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
    if wait_port 5432; then log "postgresql: started"; fi
  fi
fi
if ! wait_port 5432; then
  log "postgresql: could not be started"; status=1
elif ! command -v psql >/dev/null; then
  log "postgresql: up, but without psql the database \"test\" cannot be checked (apt-get install postgresql-client)"
elif ! found="$(pg_query "select 1 from pg_database where datname='test'" 2>&1)"; then
  log "postgresql: up, but psql as user postgres on 127.0.0.1 failed: $found"
  log "postgresql: the tests need trust auth for postgres on 127.0.0.1 (a 'host all all 127.0.0.1/32 trust' line first in pg_hba.conf, then a reload)"
  status=1
elif [ "$found" = 1 ]; then
  log "postgresql: up, database test present"
elif created="$(pg_query "create database test" 2>&1)" || pg_query "select 1 from pg_database where datname='test'" 2>/dev/null | grep -qx 1; then
  log "postgresql: up, created database test"
else
  log "postgresql: up, but 'create database test' failed: $created"
  status=1
fi
exit $status
