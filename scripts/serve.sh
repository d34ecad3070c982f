#!/usr/bin/env bash
# Install (first run) and start the backend on port 9090 with embedded defaults:
# models and the store under ./models, the bundled encoder, no Redis needed.
# Any setting from the README's table can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export MODEL_DIR="${MODEL_DIR:-$PWD/models}"
exec .venv/bin/ls-backend serve --host "${BIND_HOST:-0.0.0.0}" --port "${BIND_PORT:-9090}" "$@"
