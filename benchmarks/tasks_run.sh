#!/usr/bin/env bash
# MiniLM + Rotten Tomatoes: the runs behind benchmarks/tasks.md (three queues run side by side, 1 thread each).
# Settings scaled to a shared, oversubscribed 2-core CPU: 100 steps x 16 examples, max 64 tokens, lr 2e-4 (see tasks.md;
# lr 3e-4 collapsed to the majority class: results/tasks/lr3e-4-100steps/).
# The pilot (results/tasks/pilot-50steps/) used --steps 50 --lr 2e-4.
set -u
cd "$(dirname "$0")/.."
R=benchmarks/results/tasks
C=${CKPT_DIR:-/tmp/bench}
COMMON="--steps 100 --batch-size 16 --max-length 64 --lr 2e-4 --seed 0 --threads 1 --json --overwrite"
run() { name=$1; shift; OMP_NUM_THREADS=1 ranklm finetune "$@" $COMMON --output $C/$name > $R/$name.json 2> $R/$name.log; }
first() {  # run side by side: the comparison the issue asks for first
  run dense --keep 1 &
  run static-svd-0.6 --keep 0.6 --allocator static --base svd &
  run rankdyna-svd-0.6 --keep 0.6 --allocator rankdyna --base svd --alloc-opt delta_t=5 &
  run static-svd-0.4 --keep 0.4 --allocator static --base svd &
  run rankdyna-svd-0.4 --keep 0.4 --allocator rankdyna --base svd --alloc-opt delta_t=5 &
  run static-fwsvd-0.6 --keep 0.6 --allocator static --base fwsvd &
  run ars-svd-0.6 --keep 0.6 --allocator ars --base svd &
  wait
}
second() {  # the other methods at keep 0.6, side by side
  run static-tfwsvd-0.6 --keep 0.6 --allocator static --base tfwsvd &
  run softlm-svd-0.6 --keep 0.6 --allocator softlm --base svd &
  OMP_NUM_THREADS=1 ranklm info --diagnose $C/dense --data rotten-tomatoes --keep 0.6 --json > $R/diagnose-dense-0.6.json 2> $R/diagnose-dense-0.6.log &
  wait
}
rest() {  # not run yet for lack of time (see tasks.md)
  for k in 0.4; do run static-fwsvd-$k --keep $k --allocator static --base fwsvd; run static-tfwsvd-$k --keep $k --allocator static --base tfwsvd
    run ars-svd-$k --keep $k --allocator ars --base svd; run softlm-svd-$k --keep $k --allocator softlm --base svd; done
}
case "${1:-first}" in
  first) first ;; second) second ;; rest) rest ;; all) first; second; rest ;;
esac
