#!/usr/bin/env bash
# The README's main command: fine-tune the pretrained MiniLM on real tweets
# with a LoRA adapter (examples/text_classification.py) on the default
# backend (JAX), with progress bars; a few minutes on 2 CPU cores.
#
# Usage: bash scripts/run_example.sh [example options, e.g. --full]
# Creates/uses .venv; KERAS_LOWRANK_SKIP_INSTALL=1 skips the install step.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if [ -z "${KERAS_LOWRANK_SKIP_INSTALL:-}" ]; then
  python -m pip install -q --upgrade pip
  # torch is pinned here (the CPU build these machines carry), not in the
  # package's requirements.
  python -m pip install -q torch==2.13.0 -e ".[hub,jax,examples]"
fi

export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
exec python examples/text_classification.py "$@"
