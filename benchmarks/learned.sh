#!/usr/bin/env bash
# Learned allocators vs the layer-by-layer default (issue "SoftLMs"): SmolLM2, 32 x 512 calibration,
# 40 x 512 evaluation, the three methods side by side at keep 0.8 / 0.6 / 0.5 in one `ranklm bench` run
# (shared statistics, same windows, CLI defaults of every method: ARS 100 mask steps, SoftLMs 150 steps
# with distillation). Results: benchmarks/results/learned/; the SoftLMs keep-0.5 checkpoint's speed-up
# in benchmarks/results/cpu-latency/ (`EXTRA=out/learned-cells/whiten+softlm@0.5 bash benchmarks/cpu_latency.sh`).
# Before this run, results/learned-0.5/ holds the keep-0.5 bench with SoftLMs on the LM loss (no distillation).
set -eu
cd "$(dirname "$0")/.."
C=${CKPT_DIR:-out/learned-cells}
ranklm bench --recipes whiten+softlm,whiten+ars,svd-llm --keep 0.5,0.6,0.8 --calib-windows 32 --gen-prompts 0 \
  --threads "${THREADS:-2}" --overwrite --save-dir "$C" --output benchmarks/results/learned
