#!/usr/bin/env bash
# Set up and run every check CI runs: lint (ruff), format (ruff format), the import contracts
# (import-linter: the layering of the package) and the whole test suite (CPU; the browser tests
# drive Debian's headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -q "$@"
