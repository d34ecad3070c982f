#!/usr/bin/env bash
# Install (first run) and start the backend on port 9090 with embedded defaults:
# models and the store under ./models, the bundled encoder, no Redis needed.
# BIND_HOST and BIND_PORT (or --host / --port) choose where it listens.
# Any setting from the README's table can be set in the environment.
set -euo pipefail
# paths given relative to where the command was typed stay there (made absolute before the cd);
# a path starting with ~ is left for the settings to expand
for name in MODEL_DIR CACHE_DIR BASE_MODEL; do
  value="${!name:-}"
  case "$value" in ""|/*|"~"*) ;; *) printf -v "$name" '%s' "$PWD/$value"; export "${name?}" ;; esac
done
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export MODEL_DIR="${MODEL_DIR:-$PWD/models}"
exec .venv/bin/ls-backend serve --host "${BIND_HOST:-0.0.0.0}" --port "${BIND_PORT:-9090}" "$@"
