#!/usr/bin/env bash
# MiniLM + Rotten Tomatoes: the runs behind benchmarks/tasks.md, one after another, one thread each
# (the CLI defaults: 50 head warm-up steps at lr 1e-3, then 200 steps x 16 examples at lr 1e-4, max 64 tokens).
# Usage: [TASK=convention-party] [METHODS="rankdyna-svd static-tfwsvd"] [SEEDS="0 1 2"] [RESULTS=dir] [SKIP_DONE=1] bash benchmarks/tasks_run.sh [KEEPS...]   (default: 0.6 0.4; seeds 0 1 2)
# Runs go method by method, every seed of a method before the next, so a stopped sweep leaves whole cells;
# SKIP_DONE=1 skips a run whose results file already holds an accuracy (resume a stopped sweep).
# Every run is repeated for each seed of SEEDS (--seed: the new head's initialisation and the batch order of every
# stage); results in benchmarks/results/tasks/<run>-s<seed>.json (+ .log), the `--json` output of ranklm finetune;
# `python benchmarks/tasks_table.py` prints mean +- std over the seeds and every seed's row.
set -u
cd "$(dirname "$0")/.."
R=${RESULTS:-benchmarks/results/tasks}
C=${CKPT_DIR:-/tmp/bench-tasks}
SEEDS=${SEEDS:-0 1 2}
METHODS=${METHODS:-dense rankdyna-svd static-svd static-fwsvd static-tfwsvd ars-svd softlm-svd}  # which runs
TASK=${TASK:-rotten-tomatoes}  # a packaged task (rotten-tomatoes, convention-party) or a text,label file
mkdir -p "$R" "$C"
COMMON="--task $TASK --threads 1 --json --overwrite"
run() {
  case " $METHODS " in *" ${1%-[0-9]*} "*) ;; *) return ;; esac
  name=$1-s$seed; shift
  if [ "${SKIP_DONE:-0}" = 1 ] && grep -q '"accuracy"' "$R/$name.json" 2>/dev/null; then return; fi
  OMP_NUM_THREADS=1 ranklm finetune "$@" --seed "$seed" $COMMON --output "$C/$name" > "$R/$name.json" 2> "$R/$name.log"
}
keeps=${*:-0.6 0.4}
for seed in $SEEDS; do run dense --keep 1; done
for k in $keeps; do
  for seed in $SEEDS; do run "rankdyna-svd-$k" --keep "$k" --allocator rankdyna --base svd; done
  for seed in $SEEDS; do run "static-svd-$k" --keep "$k" --allocator static --base svd; done
  for seed in $SEEDS; do run "static-fwsvd-$k" --keep "$k" --allocator static --base fwsvd; done
  for seed in $SEEDS; do run "static-tfwsvd-$k" --keep "$k" --allocator static --base tfwsvd; done
  for seed in $SEEDS; do run "ars-svd-$k" --keep "$k" --allocator ars --base svd; done
  for seed in $SEEDS; do run "softlm-svd-$k" --keep "$k" --allocator softlm --base svd; done
done
# the SVD-drop predictor on the task loss, on the first seed's dense fine-tuned checkpoint
for first in $SEEDS; do break; done
OMP_NUM_THREADS=1 ranklm info --diagnose "$C/dense-s$first" --data "$TASK" --keep 0.6 --json > "$R/diagnose-dense-0.6.json" 2> "$R/diagnose-dense-0.6.log"
