#!/usr/bin/env bash
# Issue 29, pure weight-only quantization of the targets (the baseline rows of benchmarks/equal_bytes.sh), in the
# same tool and checkpoint format: `ranklm compress --keep 1 --quantize intN` (no calibration: nothing is
# factored), evaluated on the held-out speeches (40 x 512, by compress) and on Hamlet, with CPU latency against
# the dense bfloat16 model (evaluate --latency: prefill 1x512 and 8x128, decode 64 + 32 tokens, interleaved).
# One thread (--threads 1), as the bench of equal_bytes.sh ran beside another job.
# Usage: bash benchmarks/quant_only.sh [OUT] [CKPT_DIR]
set -euo pipefail
OUT=${1:-benchmarks/results/equal-bytes}
CK=${2:-out/equal-bytes}
mkdir -p "$OUT" "$CK"
for n in 8 4 3 2; do
  ranklm compress --dtype bfloat16 --keep 1 --quantize "int$n" --output "$CK/int$n" --overwrite --threads 1 --json \
    > "$OUT/int$n.json" 2> "$OUT/int$n.log"
  ranklm evaluate "$CK/int$n" --data hamlet --windows 40 --threads 1 --json > "$OUT/int$n-hamlet.json" 2>> "$OUT/int$n.log"
  ranklm evaluate "$CK/int$n" --latency --latency-shapes 1x512,8x128 --latency-reps 3 --decode-tokens 64x32 --threads 1 --json \
    > "$OUT/int$n-latency.json" 2>> "$OUT/int$n.log"
done
