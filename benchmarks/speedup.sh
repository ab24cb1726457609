#!/usr/bin/env bash
# Measured speed-up of svd-llm at keep 0.5: `ranklm evaluate --latency --json` on its checkpoint
# (interleaved medians, dense counterpart = the factors merged, same process).
# Usage: bash benchmarks/speedup.sh   (from the repository root)
set -euo pipefail
out=benchmarks/results/speedup
mkdir -p "$out" out
ranklm compress --keep 0.5 --calib-windows 32 --no-eval --output out/svd-llm-0.5 --overwrite --json > "$out/svd-llm-0.5-compress.json"
ranklm evaluate out/svd-llm-0.5 --windows 4 --latency --json > "$out/svd-llm-0.5.json"
