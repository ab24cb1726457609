#!/usr/bin/env bash
# Issue "Fast both ways", GPU part: the prefill / decode speed-up tables on a lent GPU, in one short run.
# Compresses the packaged model on the host's CPUs (svd-llm, 32 x 512 calibration, keep 0.8 / 0.6 / 0.5),
# then measures every checkpoint on the GPU in float32 and bfloat16 with
#   ranklm evaluate CKPT --device cuda --dtype DTYPE --windows 8 --latency --json
# (dense counterpart = the factors merged, same process, interleaved medians; decode = 128 new tokens
# after a 128-token prompt at batch 1 with a KV cache).
# Usage: bash benchmarks/gpu_latency.sh [OUTDIR]   (RANKLM="python3 -m ranklm" where ranklm is not on PATH)
set -uo pipefail
OUT=${1:-benchmarks/results/gpu}
RANKLM=${RANKLM:-ranklm}
CK=${CKPT_DIR:-out/gpu}
KEEPS=${KEEPS:-"0.8 0.6 0.5"}
mkdir -p "$OUT" "$CK"
: > "$OUT/compress.jsonl"; : > "$OUT/latency.jsonl"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
for k in $KEEPS; do
  echo "== compress svd-llm keep $k (host CPUs)" >&2
  /usr/bin/time -f "wall %e s" $RANKLM compress --keep "$k" --calib-windows 32 --no-eval --output "$CK/svd-llm-$k" \
    --overwrite --json >> "$OUT/compress.jsonl"
done
for k in $KEEPS; do
  for dt in float32 bfloat16; do
    echo "== evaluate svd-llm-$k on cuda, $dt" >&2
    $RANKLM evaluate "$CK/svd-llm-$k" --device cuda --dtype "$dt" --windows 8 --latency --json >> "$OUT/latency.jsonl"
  done
done
