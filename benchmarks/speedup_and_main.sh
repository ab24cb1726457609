#!/usr/bin/env bash
# The README's main command, and the measured speed-ups at keep 0.5 (svd-llm and whiten+softlm):
# every number comes from `ranklm compress` / `ranklm evaluate --latency --json`.
# Usage: bash benchmarks/speedup_and_main.sh   (from the repository root; ~30 min on 2 cores)
set -euo pipefail
out=benchmarks/results
mkdir -p "$out/speedup" out
ranklm compress --output out/smollm2-svd-llm-0.8 --overwrite --json > "$out/main-command.json"
ranklm compress --keep 0.5 --calib-windows 32 --no-eval --output out/svd-llm-0.5 --overwrite --json > "$out/speedup/svd-llm-0.5-compress.json"
ranklm evaluate out/svd-llm-0.5 --windows 4 --latency --json > "$out/speedup/svd-llm-0.5.json"
ranklm compress --base whiten --allocator softlm --keep 0.5 --calib-windows 32 --no-eval --output out/softlm-0.5 --overwrite --json > "$out/speedup/softlm-0.5-compress.json"
ranklm evaluate out/softlm-0.5 --windows 4 --latency --json > "$out/speedup/softlm-0.5.json"
