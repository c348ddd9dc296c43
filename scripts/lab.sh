#!/usr/bin/env bash
# The main job: set up, then open JupyterLab on the quickstart notebook with the bundled model.
# Extra arguments go to `jupyter lab` (e.g. --no-browser --port 8890).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
root_flag=()
[[ $(id -u) -eq 0 ]] && root_flag=(--allow-root)  # containers and CI machines often run as root
exec .venv/bin/jupyter lab "${root_flag[@]}" examples/01_quickstart.ipynb "$@"
