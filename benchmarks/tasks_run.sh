#!/usr/bin/env bash
# MiniLM + Rotten Tomatoes: the runs behind benchmarks/tasks.md (three queues run side by side, 1 thread each).
# Settings scaled to a shared 2-core CPU: 50 steps x 16 examples, max 64 tokens, lr 2e-4 (see tasks.md).
set -u
cd "$(dirname "$0")/.."
R=benchmarks/results/tasks
C=${CKPT_DIR:-/tmp/bench}
COMMON="--steps 50 --batch-size 16 --max-length 64 --lr 2e-4 --seed 0 --threads 1 --json --overwrite"
run() { name=$1; shift; OMP_NUM_THREADS=1 ranklm finetune "$@" $COMMON --output $C/$name > $R/$name.json 2> $R/$name.log; }
queue_a() { run dense --keep 1; run static-svd-0.6 --keep 0.6 --allocator static --base svd; run static-svd-0.4 --keep 0.4 --allocator static --base svd; }
queue_b() { run rankdyna-svd-0.6 --keep 0.6 --allocator rankdyna --base svd --alloc-opt delta_t=5; run rankdyna-svd-0.4 --keep 0.4 --allocator rankdyna --base svd --alloc-opt delta_t=5; }
queue_c() { run static-fwsvd-0.6 --keep 0.6 --allocator static --base fwsvd; run ars-svd-0.6 --keep 0.6 --allocator ars --base svd; run static-tfwsvd-0.6 --keep 0.6 --allocator static --base tfwsvd; }
case "${1:-all}" in
  a) queue_a ;; b) queue_b ;; c) queue_c ;;
  all) queue_a & queue_b & queue_c & wait ;;
esac
