#!/usr/bin/env bash
# One GPU, about 8 minutes: the 7B-layout stage-2 (LoRA) and stage-1 train steps and decoding at batch 1 and
# 32, all with random weights, each in its own process; tables and JSON go to ${OUT:-benchmarks/results}.
#
#   bash benchmarks/gpu_suite.sh            # needs jax[cuda] (pip install -U "jax[cuda12]") and this package
#
# The stage-2 step starts at 16 x 1024 tokens and halves the rows until a step fits in memory.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
python -c "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind, jax.device_count(), 'device(s)')" \
  | tee "$OUT/device.txt"

common=(--size 7b --seq-len 1024 --dtype bfloat16 --frozen-dtype bfloat16 --attention auto --steps 3 --warmup 1)

for rows in 16 8 4; do
  echo "== stage 2 (LoRA), $rows x 1024 tokens" | tee -a "$OUT/suite.log"
  if timeout 240 python benchmarks/train_benchmark.py "${common[@]}" --stages stage2 --rows "$rows" \
       --remat dots_with_no_batch_dims --json "$OUT/stage2.json" > "$OUT/stage2.txt" 2>> "$OUT/suite.log"; then
    cat "$OUT/stage2.txt"; break
  fi
  echo "   did not fit or failed (see suite.log); trying fewer rows" | tee -a "$OUT/suite.log"
done

echo "== stage 1, 8 x 1024 tokens" | tee -a "$OUT/suite.log"
timeout 150 python benchmarks/train_benchmark.py "${common[@]}" --stages stage1 --rows 8 --remat full \
  --json "$OUT/stage1.json" > "$OUT/stage1.txt" 2>> "$OUT/suite.log" && cat "$OUT/stage1.txt"

echo "== decode, batch 1 and 32" | tee -a "$OUT/suite.log"
timeout 120 python benchmarks/generate_benchmark.py --random-size 7b --dtype bfloat16 --batch-sizes 1 32 \
  --prompt-len 128 --new-tokens 128 --repeats 2 --out "$OUT/decode.json" > "$OUT/decode.txt" 2>> "$OUT/suite.log" \
  && cat "$OUT/decode.txt"
echo "results in $OUT"
