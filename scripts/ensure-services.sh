#!/usr/bin/env bash
# Make sure the services the tests talk to answer on loopback, starting (and on a
# bare Debian machine, installing) them when they do not:
#   Redis       127.0.0.1:6379
#   PostgreSQL  127.0.0.1:5432, user postgres, trust auth, database "test"
# TEST_REDIS_URL / TEST_DATABASE_URL, where set, name services of your own that the tests use
# instead: they are left alone here.  A PostgreSQL cluster that asks for a password is left as it
# is (its pg_hba.conf is changed only for a cluster installed by this script): set
# TEST_DATABASE_URL to a database the tests may use, with its password, instead.
# Prints what it did; exits non-zero when a service cannot be brought up.
set -uo pipefail
log() { echo "ensure-services: $*"; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else log "needs root for: $* (run as root, or install sudo)"; return 1; fi
}
apt_install() {
  command -v apt-get >/dev/null || { log "cannot install $*: no apt-get here (install it by hand)"; return 1; }
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done; return 1; }

status=0
# -- Redis ---------------------------------------------------------------------------
if [ -n "${TEST_REDIS_URL:-}" ]; then
  log "redis: TEST_REDIS_URL is set; the tests use that one"
elif port_open 6379; then
  log "redis: up"
elif ! command -v redis-server >/dev/null && ! apt_install redis-server; then
  log "redis: could not be started: no redis-server (apt-get install redis-server)"; status=1
else
  mkdir -p /tmp/ls-backend-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/ls-backend-redis --logfile /tmp/ls-backend-redis/redis.log >/dev/null 2>&1 || true
  if wait_port 6379; then
    log "redis: started (a daemon on 127.0.0.1:6379 that stays up; stop it with: redis-cli -p 6379 shutdown nosave)"
  else
    log "redis: could not be started; its log (/tmp/ls-backend-redis/redis.log) ends:"
    tail -n 5 /tmp/ls-backend-redis/redis.log 2>/dev/null | sed 's/^/  /'
    status=1
  fi
fi

# -- PostgreSQL ----------------------------------------------------------------------
# -w: never prompt for a password (there is no one to type it); -q: no command tags
pg_query() { psql -h 127.0.0.1 -U postgres -d postgres -w -qtAc "$1"; }
if [ -n "${TEST_DATABASE_URL:-}" ]; then
  log "postgresql: TEST_DATABASE_URL is set; the tests use that one"
  exit $status
fi
installed=""
if ! port_open 5432 && ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  apt_install postgresql && installed=1
fi
version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
if [ -n "$version" ] && [ -d "/etc/postgresql/$version/main" ] && { ! port_open 5432 || ! pg_query 'select 1' >/dev/null 2>&1; }; then
  # the Debian cluster is down, or up without letting postgres in over TCP; a cluster this script
  # just installed is made to trust loopback (a cluster of yours keeps its authentication)
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if [ -n "$installed" ] && ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba" 2>/dev/null; then
    if as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"; then
      log "postgresql: added 'host all all 127.0.0.1/32 trust' to $hba (the cluster installed here)"
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
  elif as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 && wait_port 5432; then
    log "postgresql: started cluster $version/main"
  fi
fi
if ! wait_port 5432; then
  log "postgresql: could not be started"; status=1
elif ! command -v psql >/dev/null; then
  log "postgresql: up, but without psql the database \"test\" cannot be checked or made (apt-get install postgresql-client)"
  status=1
elif ! found="$(pg_query "select 1 from pg_database where datname='test'" 2>&1)"; then
  log "postgresql: up, but psql as user postgres on 127.0.0.1 failed: $found"
  log "postgresql: the tests need user postgres on 127.0.0.1 without a password (a 'host all all 127.0.0.1/32 trust' line first in pg_hba.conf, then a reload), or TEST_DATABASE_URL naming a database they may use"
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
