#!/usr/bin/env bash
# Issue 28: RankDyna's budget schedule and learning rate, chosen on the VALIDATION split of Rotten Tomatoes
# (keep 0.4, same 200 steps as every task method, three seeds each). Each config is a list of --alloc-opt /
# --lr settings; the default run (warmup 0.1, hold 0.3, delta_t 10, lr 1e-4) is results/tasks-seeds/rankdyna-svd-0.4-s*.
# Usage: [SEEDS="0 1 2"] [KEEP=0.4] [CONFIGS="hold0.5 dt20 lr2e-4 lr5e-5 linear"] bash benchmarks/rankdyna_val.sh
# Results: benchmarks/results/tasks-rankdyna-val/<config>-<keep>-s<seed>.json (+ .log); table: tasks_table.py on the folder.
set -u
cd "$(dirname "$0")/.."
R=${RESULTS:-benchmarks/results/tasks-rankdyna-val}
C=${CKPT_DIR:-/tmp/bench-rankdyna-val}
K=${KEEP:-0.4}
mkdir -p "$R" "$C"
args_of() {
  case $1 in
    hold0.5) echo "--alloc-opt hold=0.5" ;;
    warm0.2) echo "--alloc-opt warmup=0.2" ;;
    dt20) echo "--alloc-opt delta_t=20" ;;
    dt5) echo "--alloc-opt delta_t=5" ;;
    lr2e-4) echo "--lr 2e-4" ;;
    lr5e-5) echo "--lr 5e-5" ;;
    linear) echo "--alloc-opt lr_schedule=linear --alloc-opt lr_warmup=0.1" ;;
    *) echo "unknown config $1" >&2; exit 2 ;;
  esac
}
for cfg in ${CONFIGS:-hold0.5 dt20 lr2e-4 lr5e-5}; do
  for seed in ${SEEDS:-0 1 2}; do
    name=rankdyna-svd-$cfg-$K-s$seed
    if grep -q '"accuracy"' "$R/$name.json" 2>/dev/null; then continue; fi
    # shellcheck disable=SC2046
    OMP_NUM_THREADS=1 ranklm finetune --task rotten-tomatoes --keep "$K" --allocator rankdyna --base svd $(args_of "$cfg") \
      --seed "$seed" --threads 1 --json --overwrite --output "$C/$name" > "$R/$name.json" 2> "$R/$name.log"
  done
done
