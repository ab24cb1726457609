#!/usr/bin/env bash
# Issue 29, the equal-bytes table on the packaged SmolLM2 in bfloat16 (what users ship): one bench, one
# calibration (32 x 512, kfac output gradients from 32 windows), 40 x 512 evaluation windows of the held-out
# speeches and the packaged Hamlet. The columns are byte budgets equal to the bytes of pure weight-only
# quantization of the targets at 8, 4, 3 and 2 bits with groups of 64 (float16 scale + int8 zero per group:
# (N + 0.375) / 16 of the bfloat16 bytes), so every row is compared with `--keep 1 --quantize intN` at no more
# bytes. Rows: float factors (low-rank alone), factors quantized at one width (ranks from the joint knapsack
# at that width; int8, int4 and int3: a fixed int2 row was left out for time), and the joint allocator over
# int2/int3/int4/int8.
# Usage: bash benchmarks/equal_bytes.sh [OUT] [extra bench flags, e.g. --threads 1]
#        (then bash benchmarks/quant_only.sh for the pure-quantization rows)
set -euo pipefail
OUT=${1:-benchmarks/results/equal-bytes}
shift || true
mkdir -p "$OUT"
B8=0.5234375; B4=0.2734375; B3=0.2109375; B2=0.1484375
ranklm bench --dtype bfloat16 \
  --recipes kfac-global,kfac-global:int8,kfac-global:int4,kfac-global:int3,kfac-global:int2/int3/int4/int8 \
  --budget-bytes "$B8,$B4,$B3,$B2" --calib-windows 32 --seq-len 512 --fisher-windows 32 --memory-mode whole \
  --eval-data default --eval-data hamlet --gen-prompts 0 \
  --latency --latency-shapes 1x512,8x128 --latency-reps 3 --decode-tokens 64x32 \
  "$@" --output "$OUT/bench" --overwrite --json > "$OUT/bench.json" 2> "$OUT/bench.log"
