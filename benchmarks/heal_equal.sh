#!/usr/bin/env bash
# Issue 27's equal-training table: kfac-global, svd-llm, ARS and SoftLMs (learned ranks; each on its usual base)
# at keep 0.8 / 0.6 / 0.4, with no training and with the same heal budget (the heal defaults: same steps, windows
# and cached top-64 teacher for every cell). One bench per trainer: the cells of a bench share the statistics, the
# 32 x 512 calibration windows and the 40 x 512 evaluation windows (default corpus, then Hamlet, 40 windows each);
# heal validates on the validation part. Usage: [KEEPS=0.8,0.6,0.4] [RECIPES=...] [TRAINERS="none heal"]
# [THREADS=2] bash benchmarks/heal_equal.sh   Results: benchmarks/results/heal-equal/<trainer>/.
set -eu
cd "$(dirname "$0")/.."
R=${RESULTS:-benchmarks/results/heal-equal}
for trainer in ${TRAINERS:-none heal}; do
  ranklm bench --recipes "${RECIPES:-kfac-global,svd-llm,whiten+ars,whiten+softlm}" --keep "${KEEPS:-0.8,0.6,0.4}" \
    --calib-windows 32 --eval-data default --eval-data hamlet --eval-windows 40 --gen-prompts 0 --trainer "$trainer" \
    --threads "${THREADS:-2}" --overwrite --output "$R/$trainer"
done
