#!/usr/bin/env bash
# Dense vs svd vs svd-llm perplexity at keep 0.8 and 0.6 on the packaged SmolLM2 and the default
# corpus, through the CLI with its defaults (128 x 512 calibration windows, 40 x 512 evaluation windows).
# Usage: bash benchmarks/spine_cli.sh [OUTDIR]   -> OUTDIR/results.jsonl (one JSON summary per run)
set -euo pipefail
out=${1:-benchmarks/results/spine}
mkdir -p "$out"
: > "$out/results.jsonl"
for keep in 0.8 0.6; do
  for recipe in svd svd-llm; do
    cmd="ranklm compress --keep $keep --recipe $recipe --output $out/ckpt-$recipe-$keep --overwrite --json"
    start=$(date +%s)
    json=$($cmd)
    end=$(date +%s)
    echo "$json" | python -c "import json,sys; d=json.load(sys.stdin); d['command']='$cmd'; d['wall_s']=$((end-start)); print(json.dumps(d))" >> "$out/results.jsonl"
    tail -1 "$out/results.jsonl"
  done
done
