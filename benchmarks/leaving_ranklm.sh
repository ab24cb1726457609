#!/usr/bin/env bash
# A compressed model outside ranklm (issue "A compressed model that leaves ranklm"): for one checkpoint of
# the default pipeline,
#  1. transformers' own loader vs ranklm.load (logits), in a process with ranklm and in one without it
#     (trust_remote_code=True, the bundled modeling_ranklm.py);
#  2. lm-eval through the plain `hf` model type (a process that never imports ranklm) vs
#     `ranklm evaluate --lm-eval` (the in-memory bridge), on an offline task over the packaged Hamlet text;
#  3. the ONNX serving route: `ranklm evaluate --latency --onnx` (checkpoint and dense twin exported,
#     checked and timed in onnxruntime in one process) and `ranklm export --onnx`.
# Usage: bash benchmarks/leaving_ranklm.sh CKPT   (from the repository root; CKPT = a `ranklm compress` output)
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:?usage: leaving_ranklm.sh CKPT}
R=${RESULTS_DIR:-benchmarks/results/leaving-ranklm}
W=${WORK_DIR:-out/leaving-ranklm}
mkdir -p "$R" "$W"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$W/hf-datasets"
: > "$R/commands.txt"
cp "$CKPT/ranklm.json" "$R/checkpoint-ranklm.json"
cp "$CKPT/README.md" "$R/checkpoint-model-card.md"
python -c "import json,sys; c=json.load(open(sys.argv[1])); q=c['quantization_config']; \
print(json.dumps({'quantization_config': {k: v for k, v in q.items() if k != 'modules'}, 'modules': len(q['modules']), \
'auto_map': c.get('auto_map')}, indent=1))" "$CKPT/config.json" > "$R/checkpoint-config-summary.json"

# 2. lm-eval both ways
python benchmarks/lm_eval_local_task.py "$W/task" > /dev/null
echo "python benchmarks/lm_eval_local_task.py $W/task" >> "$R/commands.txt"
cmd="lm_eval --model hf --model_args pretrained=$CKPT,trust_remote_code=True,dtype=float32 --tasks ranklm_hamlet_ppl --include_path $W/task --device cpu --batch_size 1 --output_path $W/lm-eval-plain"
echo "$cmd" >> "$R/commands.txt"
$cmd > "$R/lm-eval-plain.log" 2>&1
cp "$(find "$W/lm-eval-plain" -name 'results_*.json' | sort | tail -1)" "$R/lm-eval-plain.json"
cmd="ranklm evaluate $CKPT --windows 1 --seq-len ${SEQ_LEN:-512} --lm-eval ranklm_hamlet_ppl --lm-eval-include $W/task --batch-size 1 --json"
echo "$cmd" >> "$R/commands.txt"
$cmd > "$R/lm-eval-bridge.json" 2> "$R/lm-eval-bridge.log"

# 3. ONNX
cmd="ranklm evaluate $CKPT --windows 1 --seq-len ${SEQ_LEN:-512} --latency --onnx --latency-shapes ${SHAPES:-1x128,1x512,8x128} --latency-reps 10 --json"
echo "$cmd" >> "$R/commands.txt"
$cmd > "$R/onnx-latency.json" 2> "$R/onnx-latency.log"
cmd="ranklm export $CKPT --onnx $W/onnx --overwrite"
echo "$cmd" >> "$R/commands.txt"
$cmd > "$R/export-onnx.log" 2>&1
python - "$R" <<'PY'
import json, sys
r = sys.argv[1]
plain = json.load(open(f"{r}/lm-eval-plain.json"))["results"]["ranklm_hamlet_ppl"]
bridge = json.load(open(f"{r}/lm-eval-bridge.json"))["lm_eval"]["ranklm_hamlet_ppl"]
onnx = json.load(open(f"{r}/onnx-latency.json"))["onnx"]
rows = ["| metric | lm_eval --model hf (no ranklm) | ranklm evaluate --lm-eval |", "|---|---|---|"]
for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
    rows.append(f"| {k} | {plain[k + ',none']:.6f} | {bridge[k]:.6f} |")
rows += ["", f"ONNX bytes: checkpoint {onnx['onnx_bytes']['compressed']:,}, dense twin {onnx['onnx_bytes']['dense']:,} "
         f"(ratio {onnx['onnx_bytes_ratio']:.3f}); max relative logit error vs torch: checkpoint "
         f"{onnx['onnx_max_rel_err']['compressed']:.1e}, dense {onnx['onnx_max_rel_err']['dense']:.1e}",
         "", "| batch x seq | dense ONNX ms | checkpoint ONNX ms | speed-up |", "|---|---|---|---|"]
for p in onnx["onnx_latency"]["points"]:
    rows.append(f"| {p['batch']}x{p['seq_len']} | {p['dense_ms']:.1f} | {p['compressed_ms']:.1f} | {p['speedup']:.2f}x |")
rows.append(f"\nFLOP-ratio limit of the targets {onnx['onnx_latency']['flop_ratio_limit']:.2f}x; "
            f"{onnx['onnx_latency']['threads']} threads; onnxruntime {onnx['onnxruntime_version']}")
open(f"{r}/table.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
