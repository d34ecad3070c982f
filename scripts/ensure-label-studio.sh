#!/usr/bin/env bash
# Make sure a real Label Studio is ready for the end-to-end tests:
#   $LS_BACKEND_CACHE/label-studio-venv      its own virtualenv with label-studio==1.23.2
#   $LS_BACKEND_CACHE/label-studio-template  a migrated data folder with the admin user and token,
#                                            copied by each test run so that a start takes seconds
# LS_BACKEND_CACHE defaults to ~/.cache/ls-backend. Safe to run again: it only does what is missing,
# and rebuilds a template that has no completion marker (an interrupted build).
# The virtualenv is made with LS_PYTHON, else PYTHON, else the first of python3.11, python3.12, python3
# that is Python 3.10 or newer (what Label Studio supports).
set -euo pipefail

LS_VERSION=1.23.2
CACHE="${LS_BACKEND_CACHE:-$HOME/.cache/ls-backend}"
VENV="$CACHE/label-studio-venv"
TEMPLATE="$CACHE/label-studio-template"
MARKER_NAME=".ls-backend-template-complete"
MARKER="$TEMPLATE/$MARKER_NAME"
BUILD_TIMEOUT="${LS_TEMPLATE_TIMEOUT:-600}"

# Credentials baked into the template (a throwaway local instance on 127.0.0.1, never exposed).
ADMIN_EMAIL="admin@example.com"
ADMIN_PASSWORD="ls-backend-e2e-password"
ADMIN_TOKEN="lsbackende2e0000000000000000000000000000"

say() { echo "ensure-label-studio: $*"; }
die() { echo "ensure-label-studio: ERROR: $*" >&2; exit 1; }

# the interpreter that makes the virtualenv
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' >/dev/null 2>&1; }
if [[ -n "${LS_PYTHON:-}" || -n "${PYTHON:-}" ]]; then
    if [[ -n "${LS_PYTHON:-}" ]]; then chosen="LS_PYTHON=$LS_PYTHON"; PYTHON="$LS_PYTHON"; else chosen="PYTHON=$PYTHON"; fi
    command -v "$PYTHON" >/dev/null 2>&1 || die "$chosen is not an executable; set LS_PYTHON to a Python 3.10 or newer (3.11 is what the tests use)"
    new_enough "$PYTHON" || die "$chosen is not a Python 3.10 or newer, which Label Studio $LS_VERSION needs; set LS_PYTHON to one"
else
    PYTHON=""
    for candidate in python3.11 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && new_enough "$candidate"; then PYTHON="$candidate"; break; fi
    done
    [[ -n "$PYTHON" ]] || die "no Python 3.10 or newer found (tried python3.11, python3.12, python3); set LS_PYTHON to one"
fi
mkdir -p "$CACHE" || die "cannot create the cache folder $CACHE"

# One builder at a time: parallel test runs wait here instead of building twice.
exec 9>"$CACHE/.ensure-label-studio.lock"
if command -v flock >/dev/null 2>&1; then
    flock -w 1800 9 || die "timed out waiting for another ensure-label-studio.sh (lock $CACHE/.ensure-label-studio.lock)"
fi
# With the lock held, any build folder left is a killed builder's (SIGKILL runs no trap): stop the
# Label Studio it started, if it still runs, and remove the folder.
for stale in "$CACHE"/label-studio-template.build.*; do
    [[ -d "$stale" ]] || continue
    old_pid="$(cat "$stale/.label-studio.pid" 2>/dev/null || true)"
    if [[ "$old_pid" =~ ^[0-9]+$ ]] && kill -0 "$old_pid" 2>/dev/null; then
        say "stopping the Label Studio (pid $old_pid) a killed build left running"
        kill -TERM -- "-$old_pid" 2>/dev/null || kill -TERM "$old_pid" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$old_pid" 2>/dev/null || break; sleep 0.25; done
        kill -KILL -- "-$old_pid" 2>/dev/null || true
    fi
    rm -rf "$stale"
done

# Does Label Studio answer $1 with the admin token? Python's urllib, as minimal images have no curl;
# no proxy, as the server is on 127.0.0.1.
answers() {
    "$VENV/bin/python" - "$1" "$ADMIN_TOKEN" >/dev/null 2>&1 <<'PY'
import sys
import urllib.request

opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request(sys.argv[1], headers={"Authorization": "Token " + sys.argv[2]})
with opener.open(request, timeout=5) as response:  # an HTTP error status raises: exit 1
    response.read()
PY
}

installed_version() {
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null || true
}

# 1. the virtualenv
if [[ -x "$VENV/bin/label-studio" && "$(installed_version)" == "$LS_VERSION" ]]; then
    say "Label Studio $LS_VERSION already installed in $VENV"
else
    if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "creating the virtualenv $VENV with $PYTHON"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" || die "could not create the virtualenv $VENV"
    else
        say "repairing the virtualenv $VENV (found label-studio '$(installed_version)', want $LS_VERSION)"
    fi
    say "installing label-studio==$LS_VERSION (about 1 GB, a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install "label-studio==$LS_VERSION" \
        || die "pip install label-studio==$LS_VERSION failed (is the package index reachable?)"
    [[ "$(installed_version)" == "$LS_VERSION" && -x "$VENV/bin/label-studio" ]] \
        || die "label-studio $LS_VERSION is still not importable from $VENV after pip install"
    # a template made by another version may need migrations it does not have
    rm -f "$MARKER"
    say "installed label-studio $LS_VERSION"
fi

# 2. the migrated template data folder
if [[ -f "$MARKER" ]] && grep -qx "version=$LS_VERSION" "$MARKER"; then
    say "template data folder ready at $TEMPLATE"
    exit 0
fi

say "building the template data folder $TEMPLATE (database migrations take about a minute)"
BUILD="$CACHE/label-studio-template.build.$$"
LOG="$CACHE/label-studio-template.log"
rm -rf "$BUILD"
mkdir -p "$BUILD"
LS_PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

LS_PID=""
cleanup() {
    local status=$?
    if [[ -n "$LS_PID" ]] && kill -0 "$LS_PID" 2>/dev/null; then
        kill -TERM -- "-$LS_PID" 2>/dev/null || kill -TERM "$LS_PID" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$LS_PID" 2>/dev/null || break; sleep 0.25; done
        kill -KILL -- "-$LS_PID" 2>/dev/null || true
    fi
    if [[ -n "${BUILD:-}" ]]; then rm -rf "$BUILD"; fi
    exit "$status"
}
trap cleanup EXIT

started=$(date +%s)
(
    unset HOST PORT USERNAME PASSWORD USER_TOKEN PYTHONPATH PYTHONHOME
    for name in $(env | grep -oE '^(LABEL_STUDIO|HEARTEX|DJANGO)_[A-Za-z0-9_]*' || true); do unset "$name"; done
    export LABEL_STUDIO_BASE_DATA_DIR="$BUILD" \
        LABEL_STUDIO_USERNAME="$ADMIN_EMAIL" \
        LABEL_STUDIO_PASSWORD="$ADMIN_PASSWORD" \
        LABEL_STUDIO_USER_TOKEN="$ADMIN_TOKEN" \
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
        LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false \
        LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false \
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true \
        LABEL_STUDIO_LATEST_VERSION_CHECK=false \
        PYTHONUNBUFFERED=1
    cd "$BUILD"
    # (9>&-: the server must not hold the builders' lock, or a builder killed hard leaves it held)
    exec setsid "$VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 -p "$LS_PORT" </dev/null 9>&-
) >"$LOG" 2>&1 &
LS_PID=$!
echo "$LS_PID" >"$BUILD/.label-studio.pid"
say "started Label Studio (pid $LS_PID) on 127.0.0.1:$LS_PORT, log $LOG"

ok=""
deadline=$(( $(date +%s) + BUILD_TIMEOUT ))
while (( $(date +%s) < deadline )); do
    if ! kill -0 "$LS_PID" 2>/dev/null; then
        tail -n 30 "$LOG" >&2 || true
        die "Label Studio exited while building the template; see $LOG"
    fi
    if grep -q "Starting development server at http://127.0.0.1:$LS_PORT/" "$LOG" \
        && answers "http://127.0.0.1:$LS_PORT/api/projects"; then
        ok=1
        break
    fi
    sleep 1
done
[[ -n "$ok" ]] || { tail -n 30 "$LOG" >&2 || true; die "Label Studio did not answer on port $LS_PORT within ${BUILD_TIMEOUT}s; see $LOG"; }
say "Label Studio answered with the admin token after $(( $(date +%s) - started ))s; stopping it"

kill -TERM -- "-$LS_PID" 2>/dev/null || kill -TERM "$LS_PID"
for _ in $(seq 1 60); do kill -0 "$LS_PID" 2>/dev/null || break; sleep 0.25; done
kill -0 "$LS_PID" 2>/dev/null && { kill -KILL -- "-$LS_PID" 2>/dev/null || true; sleep 1; }
wait "$LS_PID" 2>/dev/null || true
LS_PID=""
rm -f "$BUILD/.label-studio.pid"

[[ -s "$BUILD/label_studio.sqlite3" ]] || die "no database in $BUILD after the first start; see $LOG"
cat >"$BUILD/$MARKER_NAME" <<EOF
version=$LS_VERSION
email=$ADMIN_EMAIL
password=$ADMIN_PASSWORD
token=$ADMIN_TOKEN
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
rm -rf "$TEMPLATE"
mv "$BUILD" "$TEMPLATE"
BUILD=""
say "template data folder ready at $TEMPLATE ($(( $(date +%s) - started ))s)"
