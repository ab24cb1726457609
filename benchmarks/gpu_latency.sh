#!/usr/bin/env bash
# Issue "Fast both ways", GPU part: the prefill / decode speed-up tables on a lent GPU, in one short run.
# Compresses the packaged model on the host's CPUs (svd-llm, 32 x 512 calibration, one checkpoint per CELL),
# then measures every checkpoint on the GPU, dense counterpart (factors merged) in the same process:
#   eager:        ranklm evaluate CKPT --device cuda --dtype DTYPE --windows 8 --latency $REPS --json
#   CUDA graphs:  the same with --cuda-graphs (forwards and decode steps replayed from captured graphs,
#                 static KV cache): what the kernels cost without launch and Python overhead.
# Decode = 128 new tokens after a 128-token prompt at batch 1 with a KV cache.
# Usage: bash benchmarks/gpu_latency.sh [OUTDIR]   (RANKLM="python3 -m ranklm" where ranklm is not on PATH)
# Cells run in order, each command under its own timeout, so a short lease still returns the first ones.
set -uo pipefail
OUT=${1:-benchmarks/results/gpu}
RANKLM=${RANKLM:-ranklm}
CK=${CKPT_DIR:-out/gpu}
REPS=${REPS:-"--latency-reps 5 --latency-warmup 1"}
DTYPES=${DTYPES:-"float32 bfloat16"}
MODES=${MODES:-"graphs eager"}
# name=compress flags, separated by ';'. Name the recipe in the flags: without --recipe the default
# pipeline runs (kfac-global since issue 13), whatever the cell is called.
CELLS=${CELLS:-"default-0.5=--keep 0.5;default-0.5-ratio0.4-round32=--keep 0.5 --max-flop-ratio 0.4 --round-to 32;svd-llm-0.5=--recipe svd-llm --keep 0.5"}
mkdir -p "$OUT" "$CK"
: > "$OUT/compress.jsonl"; : > "$OUT/latency.jsonl"; : > "$OUT/latency-graphs.jsonl"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$OUT/device.txt" 2>&1

evaluate() {  # evaluate NAME DTYPE FILE [extra flags]
  local name=$1 dt=$2 file=$3; shift 3
  echo "== evaluate $name on cuda, $dt $*" >&2
  timeout 150 $RANKLM evaluate "$CK/$name" --device cuda --dtype "$dt" --windows 8 --latency $REPS "$@" --json >> "$file"
}

IFS=';' read -ra cells <<< "$CELLS"
for cell in "${cells[@]}"; do
  name=${cell%%=*}; flags=${cell#*=}
  echo "== compress $name ($flags) on the host CPUs" >&2
  start=$(date +%s%N)
  # shellcheck disable=SC2086
  timeout 150 $RANKLM compress $flags --calib-windows 32 --no-eval --output "$CK/$name" --overwrite --json \
    >> "$OUT/compress.jsonl" || { echo "compress $name failed" >&2; continue; }
  echo "compress $name wall $(( ($(date +%s%N) - start) / 1000000 )) ms" >&2
  for dt in $DTYPES; do
    for mode in $MODES; do
      if [ "$mode" = graphs ]; then evaluate "$name" "$dt" "$OUT/latency-graphs.jsonl" --cuda-graphs
      else evaluate "$name" "$dt" "$OUT/latency.jsonl"; fi
    done
  done
done
