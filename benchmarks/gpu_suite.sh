#!/usr/bin/env bash
# One GPU, about 7 minutes on an H100: the 7B-layout stage-2 (LoRA; scanned and unrolled layers) and
# stage-1 train steps, decoding at batch 1 and 32 (per-layer weight and KV-cache buffers), all with random
# weights, each in its own process, then the cuDNN-attention checks; tables and JSON go to
# ${OUT:-benchmarks/results}.
#
#   bash benchmarks/gpu_suite.sh        # needs a CUDA build of jax (pip install -U "jax[cuda12]") and this repo
#
# Each train step takes the largest of its row counts (x 1024 tokens) whose compiled step fits in memory.
# PROFILE=1 also traces each benchmark's step after timing it and writes where the device time goes
# (per kernel class and per kernel) to OUT/profile_<name>.txt. DECODE_COMPARE=1 adds decoding at batch 1
# and 32 with one dispatch per token (--decode-chunk 1), against the default on-device chunks.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
"$PY" -c "import jax, flax, optax; d = jax.devices()[0]; print(d.platform, d.device_kind, jax.device_count(),
'device(s); jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)" | tee "$OUT/device.txt"

step() {  # step NAME TIMEOUT COMMAND...: run one benchmark, its table to NAME.txt, its log to suite.log
  local name=$1 limit=$2 start=$SECONDS; shift 2
  local profile=()
  [ -n "${PROFILE:-}" ] && profile=(--profile "$OUT/trace_$name")
  echo "== $name" | tee -a "$OUT/suite.log"
  timeout "$limit" "$@" "${profile[@]}" > "$OUT/$name.txt" 2>> "$OUT/suite.log" && cat "$OUT/$name.txt" \
    || echo "   $name failed or timed out (see suite.log)"
  if [ -n "${PROFILE:-}" ]; then
    find "$OUT/trace_$name" -name summary.txt -exec cat {} + > "$OUT/profile_$name.txt" 2>/dev/null
    head -12 "$OUT/profile_$name.txt"
  fi
  echo "   ($((SECONDS - start)) s)"
}


SIZE="${SIZE:-7b}"  # SIZE=tiny for a dry run of the script itself
train=("$PY" benchmarks/train_benchmark.py --size "$SIZE" --seq-len 1024 --dtype bfloat16 --frozen-dtype bfloat16
       --attention auto --remat none --steps 3 --warmup 1)
decode=("$PY" benchmarks/generate_benchmark.py --random-size "$SIZE" --dtype bfloat16 --prompt-len 128 --new-tokens 128
        --repeats 3)
step stage2 100 "${train[@]}" --stages stage2 --rows 16 12 8 --json "$OUT/stage2.json"
# Unrolled layers: no per-layer weight slices or stacked activations, half the memory (measured faster).
step stage2_unrolled 200 "${train[@]}" --stages stage2 --unrolled --rows 8 4 --json "$OUT/stage2_unrolled.json"
step stage1 120 "${train[@]}" --stages stage1 --rows 16 12 8 --json "$OUT/stage1.json"
step decode 120 "${decode[@]}" --batch-sizes 1 32 --unstack-layers --out "$OUT/decode.json"
if [ -n "${DECODE_COMPARE:-}" ]; then
  step decode_per_token 120 "${decode[@]}" --batch-sizes 1 32 --unstack-layers --decode-chunk 1 \
    --out "$OUT/decode_per_token.json"
fi
echo "== cuDNN attention against the XLA reference" | tee -a "$OUT/suite.log"
JAX_PLATFORMS=cuda timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_attention_cudnn.py \
  > "$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
echo "results in $OUT"
