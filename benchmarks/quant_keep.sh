#!/usr/bin/env bash
# Issue 29, `--quantize` on the default recipe at fixed keep ratios (the model's own float32): kfac-global with
# float factors against the same ranks with int8 and int4 factors, keep 0.8 and 0.6, one bench (32 x 512
# calibration, 40 x 512 held-out speeches, Hamlet).
# Usage: bash benchmarks/quant_keep.sh [OUT]
set -euo pipefail
OUT=${1:-benchmarks/results/quant-keep}
mkdir -p "$OUT"
ranklm bench --recipes kfac-global,kfac-global:int8,kfac-global:int4 --keep 0.8,0.6 \
  --calib-windows 32 --seq-len 512 --fisher-windows 32 --memory-mode whole \
  --eval-data default --eval-data hamlet --gen-prompts 0 \
  --output "$OUT/bench" --overwrite --json > "$OUT/bench.json" 2> "$OUT/bench.log"
