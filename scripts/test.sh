#!/usr/bin/env bash
# Set up and run the whole test suite (CPU; the browser tests drive Debian's headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -q "$@"
