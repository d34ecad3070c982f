#!/usr/bin/env bash
# Create or refresh the project's virtualenv (.venv) with the given extras.
#   scripts/bootstrap.sh            runtime only
#   scripts/bootstrap.sh test       runtime + test tools
# PYTHON: the Python 3.11 to build .venv with (default: python3.11, else python3 when it is 3.11).
# TORCH_INDEX_URL: where to take torch from (for example PyTorch's CPU or CUDA wheel index);
# unset, torch==2.13.0 comes from the default index (or a local wheel where pip is set up for one)
# on the first install, and later runs keep the torch .venv has.  Set to another index later, it
# reinstalls torch from there on the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
# one bootstrap at a time per checkout (serve.sh and test.sh started together would otherwise remove
# or install into one .venv at once)
if command -v flock >/dev/null; then
  exec 9>.venv.lock
  flock 9 || { echo "bootstrap: could not lock .venv.lock" >&2; exit 1; }
fi
# pyproject.toml: requires-python = ">=3.11,<3.12"
is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "unknown"; }
python="${PYTHON:-}"
if [ -n "$python" ]; then
  command -v "$python" >/dev/null || { echo "bootstrap: PYTHON=$python is not an executable (give the path to a Python 3.11)" >&2; exit 1; }
  if ! is_py311 "$python"; then
    found="$(version_of "$python")"
    if [ "$found" = unknown ]; then found="not a Python that runs"; else found="Python $found"; fi
    echo "bootstrap: PYTHON=$python is $found; the project requires Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
else
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && is_py311 "$candidate"; then
      python="$candidate"; break
    fi
  done
fi
# a bare Debian or Ubuntu machine: Python 3.11 and its venv module are packages of their own
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "bootstrap: needs root to install $* (run as root, or install sudo)" >&2; return 1; fi
}
apt_install() {
  command -v apt-get >/dev/null || return 1
  echo "bootstrap: installing $* with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if [ -z "$python" ] && [ -z "${PYTHON:-}" ] && apt_install python3.11 python3.11-venv; then
  python=python3.11
fi
[ -n "$python" ] || { echo "bootstrap: Python 3.11 is required (set PYTHON=/path/to/python3.11; on Debian or Ubuntu: apt-get install python3.11 python3.11-venv)" >&2; exit 1; }

# A .venv left half-made (an interrupted `python -m venv`, or one created without pip because
# python3.11-venv was missing) or made with another Python is rebuilt rather than reused.
if [ -e .venv ] || [ -L .venv ]; then
  problem=""
  if [ ! -x .venv/bin/python ]; then
    problem="it has no working bin/python"
  elif ! is_py311 .venv/bin/python; then
    problem="its Python is $(version_of .venv/bin/python), not 3.11"
  elif ! .venv/bin/python -c 'import pip' >/dev/null 2>&1; then
    problem="it has no pip (interrupted, or created without python3.11-venv)"
  fi
  if [ -n "$problem" ]; then
    echo "bootstrap: .venv is unusable: $problem; removing it and creating it anew"
    rm -rf .venv
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $python"
  if ! "$python" -m venv .venv && ! { rm -rf .venv && [ -z "${PYTHON:-}" ] && apt_install python3.11-venv &&
                                       "$python" -m venv .venv; }; then
    rm -rf .venv
    echo "bootstrap: '$python -m venv .venv' failed; on Debian or Ubuntu install python3.11-venv (apt-get install python3.11-venv) and run this again" >&2
    exit 1
  fi
fi
stamp=".venv/.ls-backend-installed${extras:+-$extras}"
# where torch was installed from ("" for the default index), so that a changed TORCH_INDEX_URL reinstalls it
torch_stamp=".venv/.ls-backend-torch-index"
torch_from="$(cat "$torch_stamp" 2>/dev/null || true)"
# unset: whatever index the installed torch came from (test.sh without it keeps serve.sh's CPU torch)
torch_index="${TORCH_INDEX_URL-$torch_from}"
digest="$( (cat pyproject.toml scripts/bootstrap.sh; printf 'TORCH_INDEX_URL=%s\n' "$torch_index") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
echo "bootstrap: installing into .venv (first run takes a few minutes)"
torch_args=()
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  torch_args=(torch==2.13.0)
elif [ "$torch_from" != "$torch_index" ]; then
  echo "bootstrap: TORCH_INDEX_URL changed (was ${torch_from:-unset}, now ${torch_index:-unset}); reinstalling torch"
  torch_args=(--force-reinstall torch==2.13.0)
fi
if [ "${#torch_args[@]}" -gt 0 ]; then
  if [ -n "$torch_index" ]; then
    "${pip[@]}" --index-url "$torch_index" "${torch_args[@]}"
  else
    "${pip[@]}" "${torch_args[@]}"
  fi
fi
printf '%s\n' "$torch_index" > "$torch_stamp"
"${pip[@]}" -e ".${extras:+[$extras]}"
echo "$digest" > "$stamp"
