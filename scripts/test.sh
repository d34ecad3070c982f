#!/usr/bin/env bash
# Install what the tests need and run the whole suite:
#   - the project's .venv with the test extras
#   - Redis and PostgreSQL on loopback (started, or installed on a bare Debian machine)
#   - a Label Studio 1.23.2 virtualenv and migrated data folder, cached under ~/.cache/ls-backend
# Arguments go to pytest (for example: scripts/test.sh -k predict).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/bootstrap.sh test || exit 1
bash scripts/ensure-services.sh || echo "test: some services are missing; the tests that need them will say so"
if [ -f scripts/ensure-label-studio.sh ]; then
  bash scripts/ensure-label-studio.sh || echo "test: Label Studio could not be prepared; the end-to-end tests will say so"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest "$@"
code=$?
if [ "$code" = 5 ]; then
  echo "test: no tests were collected" >&2
  exit 1
fi
exit $code
