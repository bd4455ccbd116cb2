#!/usr/bin/env bash
# Create .venv (if needed) and install featuremaps into it. Usage: bash scripts/setup.sh [--test]
# --test also installs the test tools and, when missing, Debian's Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip >/dev/null
# torch first, pinned to the releases this project is tested with (a range in pyproject.toml admits them)
if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
  "$VPY" -m pip install --quiet ${TORCH_SPEC:-"torch==2.14.1" "torchvision==0.29.1"}
fi
if [ "${1:-}" = "--test" ]; then
  "$VPY" -m pip install --quiet -e ".[test]"
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium for the browser tests..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
  fi
else
  "$VPY" -m pip install --quiet -e .
fi
