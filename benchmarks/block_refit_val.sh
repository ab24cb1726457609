#!/usr/bin/env bash
# Choosing --block-refit on the VALIDATION split (issue 27): kfac-global at keep 0.8 / 0.6 / 0.4, no training,
# 32 x 512 calibration, every mode in its own bench (same windows), perplexity on the default corpus's
# validation part (14 x 512: speeches that neither calibration nor evaluation reads). No evaluation window is read.
# Results: benchmarks/results/block-refit-val/<mode>/ (results.json, results.md) and <mode>.{json,log}.
set -u
cd "$(dirname "$0")/.."
R=benchmarks/results/block-refit-val
mkdir -p "$R"
for mode in ${MODES:-full off output}; do
  OMP_NUM_THREADS=1 ranklm bench --recipes kfac-global --keep 0.8,0.6,0.4 --calib-windows 32 --eval-data validation \
    --eval-windows 14 --gen-prompts 0 --block-refit "$mode" --threads 1 --output "$R/$mode" --overwrite --json \
    > "$R/$mode.json" 2> "$R/$mode.log"
done
