#!/usr/bin/env bash
# The main job: set up, then open JupyterLab on the quickstart notebook with the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/jupyter lab examples/01_quickstart.ipynb "$@"
