#!/usr/bin/env bash
# Cached top-64 teacher vs live full-vocabulary teacher: heal's time and peak memory, 8 steps of 2 x 512
# on a plain-SVD keep-0.8 model (no calibration statistics, so the peak RSS is the model, the teacher and
# training). One thread each, one after the other. Results: teacher-{topk64,live}.{json,log,time} here and
# out/heal/teacher-*/ranklm.json (training[0].seconds, teacher.prepare_seconds).
set -u
cd "$(dirname "$0")/../../.."
R=benchmarks/results/heal
for mode in topk64:64 live:0; do
  name=${mode%%:*}; k=${mode##*:}
  OMP_NUM_THREADS=1 /usr/bin/time -v -o "$R/teacher-$name.time" ranklm compress --recipe svd --keep 0.8 --trainer heal \
    --train-opt steps=8 --train-opt eval_every=8 --train-opt top_k="$k" --calib-windows 32 --threads 1 --no-eval \
    --output "out/heal/teacher-$name" --overwrite --json > "$R/teacher-$name.json" 2> "$R/teacher-$name.log"
  cp "out/heal/teacher-$name/ranklm.json" "$R/teacher-$name.ranklm.json"
done
