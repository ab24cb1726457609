#!/usr/bin/env bash
# Issue 26, "same result": kfac-global (the default method) on the packaged SmolLM2 with 32 x 512 calibration,
# whole-model statistics against the bounded mode (--memory-mode bounded: block by block, factors spilled to
# disk), at one keep ratio per call, with peak resident memory from /usr/bin/time -v. Writes
# OUT/<mode>-<keep>.json (the --json summary), OUT/<mode>-<keep>.log (stderr + time -v) and
# OUT/<mode>-<keep>-ranklm.json (the checkpoint's ranklm.json: rank map, timings, artifacts.memory).
# Usage: bash benchmarks/kfac_bounded.sh MODE KEEP [OUTDIR] [CKPT_DIR] [extra compress flags...]
set -euo pipefail
MODE=$1; KEEP=$2
OUT=${3:-benchmarks/results/kfac-bounded}
CK=${4:-out/kfac-bounded}
shift 4 || shift $#
mkdir -p "$OUT" "$CK"
name="$MODE-$KEEP"
/usr/bin/time -v ranklm compress --keep "$KEEP" --calib-windows 32 --seq-len 512 --fisher-windows 32 \
  --memory-mode "$MODE" --threads 1 "$@" --output "$CK/$name" --overwrite --json \
  > "$OUT/$name.json" 2> "$OUT/$name.log"
cp "$CK/$name/ranklm.json" "$OUT/$name-ranklm.json"
