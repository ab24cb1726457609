#!/usr/bin/env bash
# Issue "Fast both ways", compression time: svd-llm keep 0.5 with 32 x 512 calibration, the input-Gram
# route for every target (--base-opt output_side=false, the route before output-side whitening) and the
# default (targets with out <= in factored from their output covariance), back to back on the idle
# machine, then the perplexity of both checkpoints on the same 4 x 512 evaluation windows.
# Where the time went is in each checkpoint's ranklm.json "timings" (refit_statistics_s / refit_on_block_s /
# refit_propagate_s split the block-by-block pass), copied to OUT/<name>-timings.json.
# Usage: bash benchmarks/compress_time.sh [OUTDIR] [CKPT_DIR]
set -euo pipefail
OUT=${1:-benchmarks/results/compress-time}
CK=${2:-out/compress-time}
mkdir -p "$OUT" "$CK"
run() {  # run NAME [extra compress flags]
  local name=$1; shift
  local start; start=$(date +%s%N)
  ranklm compress --recipe svd-llm --keep 0.5 --calib-windows 32 --no-eval "$@" --output "$CK/$name" --overwrite --json \
    > "$OUT/$name.json"
  local wall=$(( ($(date +%s%N) - start) / 1000000 ))
  python3 - "$CK/$name/ranklm.json" "$OUT/$name-timings.json" "$wall" "$*" <<'EOF'
import json, sys
meta = json.load(open(sys.argv[1]))
json.dump({"flags": sys.argv[4], "wall_s": int(sys.argv[3]) / 1000, "timings": meta["timings"]}, open(sys.argv[2], "w"), indent=1)
EOF
}
run svd-llm-0.5-input-route --base-opt output_side=false
run svd-llm-0.5-output-side
for name in svd-llm-0.5-input-route svd-llm-0.5-output-side; do
  ranklm evaluate "$CK/$name" --windows 4 --json > "$OUT/$name-eval.json"
done
