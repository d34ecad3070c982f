#!/usr/bin/env bash
# Create or refresh the project's virtualenv (.venv) with the given extras.
#   scripts/bootstrap.sh            runtime only
#   scripts/bootstrap.sh test       runtime + test tools
# TORCH_INDEX_URL: where to take torch from (for example PyTorch's CPU or CUDA wheel index);
# unset, torch==2.13.0 comes from the default index (or a local wheel where pip is set up for one).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python="$candidate"; break
    fi
  done
fi
[ -n "$python" ] || { echo "bootstrap: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $python"
  "$python" -m venv .venv
fi
stamp=".venv/.ls-backend-installed${extras:+-$extras}"
digest="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
echo "bootstrap: installing into .venv (first run takes a few minutes)"
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" torch==2.13.0
  else
    "${pip[@]}" torch==2.13.0
  fi
fi
"${pip[@]}" -e ".${extras:+[$extras]}"
echo "$digest" > "$stamp"
