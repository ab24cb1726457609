#!/usr/bin/env bash
# Issue 26, memory on shape models: the default recipe (kfac-global, --memory-mode auto = bounded) at keep 0.8 with
# 8 calibration and 8 gradient windows on a random-weight model folder (benchmarks/make_shape_model.py), with
# /usr/bin/time -v. Writes OUT/NAME.json (--json summary), OUT/NAME.log (stderr + time -v) and OUT/NAME-ranklm.json
# (timings and artifacts.memory: the preflight's estimate and per-block costs).
# Usage: bash benchmarks/shape_compress.sh MODEL_DIR OUT NAME [extra compress flags...]
set -euo pipefail
MODEL=$1; OUT=$2; NAME=$3; shift 3
CK=out/shape/$NAME
mkdir -p "$OUT" out/shape
/usr/bin/time -v ranklm compress --model "$MODEL" --keep 0.8 --calib-windows 8 --fisher-windows 8 --no-eval "$@" \
  --output "$CK" --overwrite --json > "$OUT/$NAME.json" 2> "$OUT/$NAME.log"
cp "$CK/ranklm.json" "$OUT/$NAME-ranklm.json"
