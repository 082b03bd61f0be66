#!/usr/bin/env bash
# Set up (or reuse) .venv at the repo root, then run the demo or the tests.
#   bash scripts/run.sh demo [thresher demo flags]
#   bash scripts/run.sh test [pytest flags]
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}

python_bin() {
  # torch 2.14.1 + torchvision 0.29.1 are available for CPython 3.11 here; prefer it.
  for p in python3.11 python3; do command -v "$p" >/dev/null 2>&1 && { echo "$p"; return; }; done
  echo "no python3 found" >&2; exit 1
}

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$(python_bin)" -m venv .venv
  fi
  # Reinstall only when the project's dependencies changed since the last successful install.
  local stamp=.venv/.thresher-installed want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # GPU machines: install the "gpu" extra instead of "cpu" (faiss-gpu); never both.
    .venv/bin/python -m pip install --quiet -e ".[${THRESHER_EXTRA:-cpu},dev]"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    setup
    exec .venv/bin/thresher demo "$@"
    ;;
  test)
    setup
    exec .venv/bin/python -m pytest "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash scripts/run.sh demo|test|setup [args]" >&2
    exit 2
    ;;
esac
