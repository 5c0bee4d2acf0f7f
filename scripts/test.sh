#!/usr/bin/env bash
# Set up everything the tests need (apt peers + pip test extra) and run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export TCP_NODELAY=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
