#!/usr/bin/env bash
# Issue 27's equal-training table: kfac-global, svd-llm, ARS and SoftLMs (learned ranks; each on its usual base)
# with the same heal budget (the heal defaults: 96 steps on 192 windows, the cached top-64 teacher, which the cells
# share). One bench: every cell is evaluated just before heal (the "no training" column, from the same allocation)
# and after it; the cells share the statistics, the 32 x 512 calibration windows and the 40 x 512 evaluation windows
# (default corpus, then Hamlet); heal validates on the validation part.
# Usage: [KEEPS=0.8,0.6,0.4] [RECIPES=...] [THREADS=2] bash benchmarks/heal_equal.sh   Results: benchmarks/results/heal-equal[-KEEPS]/
set -eu
cd "$(dirname "$0")/.."
K=${KEEPS:-0.8,0.6,0.4}
R=${RESULTS:-benchmarks/results/heal-equal-${K//,/-}}
ranklm bench --recipes "${RECIPES:-kfac-global,svd-llm,whiten+ars,whiten+softlm}" --keep "$K" \
  --calib-windows 32 --eval-data default --eval-data hamlet --eval-windows 40 --gen-prompts 0 --trainer heal \
  --threads "${THREADS:-2}" --overwrite --output "$R"
