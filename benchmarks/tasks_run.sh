#!/usr/bin/env bash
# MiniLM + Rotten Tomatoes: the runs behind benchmarks/tasks.md, one after another, one thread each
# (the CLI defaults: 50 head warm-up steps at lr 1e-3, then 200 steps x 16 examples at lr 1e-4, max 64 tokens).
# Usage: bash benchmarks/tasks_run.sh [KEEPS...]   (default: 0.6 0.4); results in benchmarks/results/tasks/
set -u
cd "$(dirname "$0")/.."
R=benchmarks/results/tasks
C=${CKPT_DIR:-/tmp/bench-tasks}
mkdir -p "$R" "$C"
COMMON="--seed 0 --threads 1 --json --overwrite"
run() { name=$1; shift; OMP_NUM_THREADS=1 ranklm finetune "$@" $COMMON --output "$C/$name" > "$R/$name.json" 2> "$R/$name.log"; }
keeps=${*:-0.6 0.4}
run dense --keep 1
for k in $keeps; do
  run "rankdyna-svd-$k" --keep "$k" --allocator rankdyna --base svd
  run "static-svd-$k" --keep "$k" --allocator static --base svd
  run "static-fwsvd-$k" --keep "$k" --allocator static --base fwsvd
  run "static-tfwsvd-$k" --keep "$k" --allocator static --base tfwsvd
  run "ars-svd-$k" --keep "$k" --allocator ars --base svd
  run "softlm-svd-$k" --keep "$k" --allocator softlm --base svd
done
# the SVD-drop predictor on the task loss, on the dense fine-tuned checkpoint
OMP_NUM_THREADS=1 ranklm info --diagnose "$C/dense" --data rotten-tomatoes --keep 0.6 --json > "$R/diagnose-dense-0.6.json" 2> "$R/diagnose-dense-0.6.log"
