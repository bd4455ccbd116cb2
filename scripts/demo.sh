#!/usr/bin/env bash
# Set up and run the main job: the seed's whole story as one HTML report in featuremaps-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/featuremaps demo --out "${1:-featuremaps-demo}" --force
