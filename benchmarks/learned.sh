#!/usr/bin/env bash
# Learned allocators vs the default (issue "SoftLMs"): SmolLM2, 32 x 512 calibration, 40 x 512 evaluation,
# one thread. Results: benchmarks/results/learned-0.5/ (the three methods side by side at keep 0.5) and
# benchmarks/results/learned-0.6-0.8/ (softlm and svd-llm; ARS at 0.8/0.6 is in results/ars-compress-*.json,
# same protocol, from ranklm compress); the softlm keep-0.5 speed-up in results/softlm-0.5-latency.json.
set -eu
cd "$(dirname "$0")/.."
C=${CKPT_DIR:-out/learned-cells}
R=benchmarks/results
COMMON="--calib-windows 32 --gen-prompts 0 --threads 1 --overwrite"
ranklm bench --recipes whiten+softlm,whiten+ars,svd-llm --keep 0.5 $COMMON --save-dir "$C" --output $R/learned-0.5
ranklm bench --recipes whiten+softlm,svd-llm --keep 0.6,0.8 $COMMON --output $R/learned-0.6-0.8
OMP_NUM_THREADS=1 ranklm evaluate "$C/whiten+softlm@0.5" --windows 8 --latency --json > $R/softlm-0.5-latency.json
