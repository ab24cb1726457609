#!/usr/bin/env bash
# CPU speed-up tables (issue "Fast both ways"): svd-llm at keep 0.8 / 0.6 / 0.5, and what rank rounding
# (--round-to) and the latency-aware dense rule (--max-flop-ratio) buy, each next to its limit.
# Compression: two at a time, one thread each. Latency: one checkpoint at a time on the otherwise idle
# machine (torch's default threads), `ranklm evaluate CKPT --latency --json` (interleaved medians of the
# checkpoint and its dense counterpart in one process; prefill at 1x128 .. 8x512; decode at batch 1 with a
# KV cache, 128-token prompt + 128 new tokens).
# Usage: bash benchmarks/cpu_latency.sh   (from the repository root; CKPT_DIR to keep checkpoints elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
C=${CKPT_DIR:-out/latency}
R=benchmarks/results/cpu-latency
mkdir -p "$R" "$C"
cells=(
  "svd-llm-0.8|--keep 0.8"
  "svd-llm-0.8-ratio0.6|--keep 0.8 --max-flop-ratio 0.6"
  "svd-llm-0.6|--keep 0.6"
  "svd-llm-0.6-ratio0.45|--keep 0.6 --max-flop-ratio 0.45"
  "svd-llm-0.5|--keep 0.5"
  "svd-llm-0.5-round32|--keep 0.5 --round-to 32"
  "svd-llm-0.5-ratio0.4-round32|--keep 0.5 --max-flop-ratio 0.4 --round-to 32"
)
compress() {
  local name=${1%%|*} args=${1#*|}
  echo "ranklm compress --recipe svd-llm $args --calib-windows 32 --no-eval --output $C/$name --overwrite --json" >> "$R/commands.txt"
  OMP_NUM_THREADS=1 ranklm compress --recipe svd-llm $args --calib-windows 32 --no-eval --output "$C/$name" --overwrite --json \
    > "$R/compress-$name.json" 2> "$R/compress-$name.log"
}
if [ -z "${SKIP_COMPRESS:-}" ]; then
  : > "$R/commands.txt"
  for ((i = 0; i < ${#cells[@]}; i += 2)); do
    compress "${cells[i]}" &
    if [ $((i + 1)) -lt ${#cells[@]} ]; then compress "${cells[i + 1]}" & fi
    wait
  done
fi
# learned checkpoints made elsewhere (EXTRA="dir1 dir2"; e.g. the SoftLMs keep-0.5 checkpoint of learned.sh)
for ck in ${EXTRA:-}; do cells+=("$(basename "$ck")|"); ln -sfn "$(realpath "$ck")" "$C/$(basename "$ck")"; done
sed -i '/^ranklm evaluate/d' "$R/commands.txt"
for cell in "${cells[@]}"; do
  name=${cell%%|*}
  echo "ranklm evaluate $C/$name --windows 4 --latency --latency-reps 5 --latency-warmup 1 --json" >> "$R/commands.txt"
  ranklm evaluate "$C/$name" --windows 4 --latency --latency-reps 5 --latency-warmup 1 --json > "$R/latency-$name.json" 2> "$R/latency-$name.log"
done
python benchmarks/latency_table.py "$R" > "$R/table.md"
cat "$R/table.md"
