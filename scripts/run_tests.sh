#!/usr/bin/env bash
# Installs the test dependencies into .venv and runs the suite once per Keras
# backend, each in its own pytest process (as Keras's own CI does).
# Usage: bash scripts/run_tests.sh [backend ...] [-- extra pytest args]
#        bash scripts/run_tests.sh --keras-min [-- extra pytest args]
# --keras-min: the smoke subset (`pytest -m smoke`, see tests/conftest.py) on
# the oldest Keras pyproject.toml admits, with JAX, in .venv-keras-min
# (installed from .ci/requirements-keras-min.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
if [ "${1:-}" = "--keras-min" ]; then
  mode=keras-min
  shift
fi

if [ "$mode" = keras-min ]; then
  venv=.venv-keras-min
  requirements=.ci/requirements-keras-min.txt
  # The pin must be the declared floor, or this run tests something else.
  floor=$(sed -n 's/^ *"keras>=\([0-9.]*\)".*/\1/p' pyproject.toml)
  pin=$(sed -n 's/^keras==\([0-9.]*\)$/\1/p' "$requirements")
  if [ -z "$floor" ] || [ "$floor" != "$pin" ]; then
    echo "pyproject.toml declares keras>=${floor:-?} but $requirements pins keras==${pin:-?}; make them equal" >&2
    exit 2
  fi
else
  venv=.venv
  requirements=.ci/requirements-test.txt
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  # Keeps the checkout clean without a .gitignore entry (as Python 3.13's
  # venv does by itself).
  echo '*' >"$venv/.gitignore"
fi
. "$venv/bin/activate"
if [ -z "${KERAS_LOWRANK_SKIP_INSTALL:-}" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$requirements"
fi

# Read without importing keras (its import needs a backend).
keras_version=$(python -c "import importlib.metadata as m; print(m.version('keras'))")
backends=()
if [ "$mode" = keras-min ]; then
  backends=(jax)
  got=$keras_version
  if [ "$got" != "$pin" ]; then
    echo "$venv has keras $got, not the pinned $pin" >&2
    exit 2
  fi
  [ "${1:-}" = "--" ] && shift
  set -- -m smoke "$@"
else
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do backends+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  # Longest first, so the short torch run fills the lane that frees up first.
  [ ${#backends[@]} -gt 0 ] || backends=(tensorflow jax torch)
fi

export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0

# One backend's pytest process. -p no:cacheprovider keeps the clean checkout
# clean; its own --basetemp keeps concurrent runs out of each other's tmp_path.
run_backend() {
  local backend=$1; shift
  local rc=0
  echo "=== pytest on KERAS_BACKEND=$backend, keras $keras_version ==="
  KERAS_BACKEND=$backend python -m pytest -p no:cacheprovider -q \
    --basetemp="$tmp_root/$backend" "$@" || rc=$?
  if [ $rc -eq 5 ]; then
    # pytest's "no tests collected": a selection that matches nothing is a
    # failure here, never a pass.
    echo "=== KERAS_BACKEND=$backend: pytest ran no tests (exit 5); check the selection ===" >&2
  fi
  echo "=== KERAS_BACKEND=$backend: exit $rc ==="
  return $rc
}

# The backends' processes run side by side, KERAS_LOWRANK_TEST_JOBS at a time
# (default: one per core, at most one per backend). A run is mostly
# single-threaded Python and XLA/TF tracing, so on CI's 2 cores two at a time
# take about half the wall time of one after another. Each process still has
# one backend, as Keras's own CI does; its output is printed whole when it ends.
cores=$(nproc 2>/dev/null || echo 1)
jobs=${KERAS_LOWRANK_TEST_JOBS:-$cores}
[ "$jobs" -le ${#backends[@]} ] || jobs=${#backends[@]}
[ "$jobs" -ge 1 ] || jobs=1
tmp_root=$(mktemp -d)
# Stopped early (SIGTERM, or an error here), no backend's pytest may outlive
# the script: each runs in a background subshell, so stop its children too.
cleanup() {
  local pid
  for pid in $(jobs -p); do
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp_root"
}
trap cleanup EXIT
trap 'exit 143' TERM

status=0
if [ "$jobs" -eq 1 ]; then
  for backend in "${backends[@]}"; do
    run_backend "$backend" "$@" || status=1
  done
  exit $status
fi

# A progress line every KERAS_LOWRANK_TEST_TICK seconds (default 300), so a
# log watcher sees the run is alive while the whole outputs wait.
tick=${KERAS_LOWRANK_TEST_TICK:-300}
started=$SECONDS
declare -A running=()
sleep "$tick" & ticker=$!
progress() {
  local pid backend pct line=""
  for pid in "${!running[@]}"; do
    backend=${running[$pid]}
    pct=$( (grep -o '\[ *[0-9]*%\]' "$tmp_root/$backend.log" || true) | tail -n 1 | tr -d ' []')
    line+=" $backend (${pct:-0%})"
  done
  echo "=== $(( (SECONDS - started) / 60 )) min, still running:$line ==="
}
finish_one() {
  local pid rc=0
  while true; do
    rc=0
    wait -n -p pid "${!running[@]}" "$ticker" || rc=$?
    [ "$pid" = "$ticker" ] || break
    progress
    sleep "$tick" & ticker=$!
  done
  local backend=${running[$pid]}
  unset "running[$pid]"
  cat "$tmp_root/$backend.log"
  [ $rc -eq 0 ] || status=1
}
for backend in "${backends[@]}"; do
  [ ${#running[@]} -lt "$jobs" ] || finish_one
  run_backend "$backend" "$@" >"$tmp_root/$backend.log" 2>&1 &
  running[$!]=$backend
done
while [ ${#running[@]} -gt 0 ]; do finish_one; done
kill "$ticker" 2>/dev/null || true
exit $status
