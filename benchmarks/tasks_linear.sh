#!/usr/bin/env bash
# Issue 28's equal-terms check: the best static baselines (tfwsvd at keep 0.4, svd at 0.6) and dense with the same
# linear schedule RankDyna uses by default (--lr-schedule linear on every stage after the head warm-up), 3 seeds each;
# validation and test accuracy. Results: benchmarks/results/tasks-linear/<run>-s<seed>.{json,log};
# table: python benchmarks/tasks_table.py benchmarks/results/tasks-linear
set -u
cd "$(dirname "$0")/.."
R=${RESULTS:-benchmarks/results/tasks-linear}
C=${CKPT_DIR:-/tmp/bench-linear}
mkdir -p "$R" "$C"
run() { name=$1-s$seed; shift
  grep -q '"accuracy"' "$R/$name.json" 2>/dev/null && return
  OMP_NUM_THREADS=1 ranklm finetune "$@" --lr-schedule linear --seed "$seed" --task rotten-tomatoes --threads 1 --json \
    --overwrite --output "$C/$name" > "$R/$name.json" 2> "$R/$name.log"; }
for seed in ${SEEDS:-0 1 2}; do run static-tfwsvd-0.4 --keep 0.4 --allocator static --base tfwsvd; done
for seed in ${SEEDS:-0 1 2}; do run static-svd-0.6 --keep 0.6 --allocator static --base svd; done
for seed in ${SEEDS:-0 1 2}; do run dense --keep 1; done
