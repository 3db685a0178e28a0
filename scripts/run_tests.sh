#!/usr/bin/env bash
# Installs the test dependencies into .venv and runs the suite once per Keras
# backend, each in its own pytest process (as Keras's own CI does).
# Usage: bash scripts/run_tests.sh [backend ...] [-- extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if [ -z "${KERAS_LOWRANK_SKIP_INSTALL:-}" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r .ci/requirements-test.txt
fi

backends=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do backends+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#backends[@]} -gt 0 ] || backends=(jax tensorflow torch)

export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0
status=0
for backend in "${backends[@]}"; do
  echo "=== pytest on KERAS_BACKEND=$backend ==="
  # -p no:cacheprovider keeps the clean checkout clean.
  if ! KERAS_BACKEND=$backend python -m pytest -p no:cacheprovider -q "$@"; then
    status=1
  fi
done
exit $status
