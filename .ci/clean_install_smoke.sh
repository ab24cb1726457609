#!/usr/bin/env bash
# Clean-install smoke test: a new virtual environment (no system site packages) with exactly the install
# steps of the README's main-job command, then `ranklm compress` with the default recipe on the packaged
# model with a tiny calibration; fails unless a checkpoint is written. The machine image (and the dev/eval
# extras) carry packages a user's clean venv lacks; this is what catches an undeclared import.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The README's first fenced command: "<install steps> && ranklm compress ..."; keep the install steps only.
main_cmd=$(awk '/^```bash/{f=1; next} /^```/{if (f) exit} f' README.md | head -1)
install=${main_cmd%%&& ranklm compress*}
[ "$install" != "$main_cmd" ] || { echo "clean-install smoke: README's first command has no '&& ranklm compress'" >&2; exit 1; }
python -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
echo "clean-install smoke: $install" >&2
eval "$install" >"$work/install.log" 2>&1 || { tail -30 "$work/install.log" >&2; exit 1; }
python -c "import sys; assert sys.prefix != sys.base_prefix, 'not in the venv'"
export RANKLM_CACHE="$work/cache"  # convert the packaged model afresh, as on a new machine
cd "$work"
ranklm --version
start=$SECONDS
# The first four of the 30 blocks (28 targets) keep CI short; every stage of the default recipe still runs
# (statistics, output gradients, kfac factorizations, the scipy knapsack, install, save, evaluation).
ranklm compress --calib-windows 4 --seq-len 128 --fisher-windows 4 --eval-windows 2 --eval-seq-len 128 \
  --include 're:^model\.layers\.[0-3]\.' --output "$work/ckpt" --json > "$work/summary.json"
echo "clean-install smoke: compress took $((SECONDS - start)) s" >&2
test -f "$work/ckpt/ranklm.json" && test -f "$work/ckpt/model.safetensors"
python - "$work/summary.json" <<'PY'
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert s["method"] == "kfac-global", s
meta = json.load(open(sys.argv[1].replace("summary.json", "ckpt/ranklm.json")))
assert "loss_exact" in meta["artifacts"]["global"], meta["artifacts"]["global"]  # the exact knapsack ran (scipy)
assert abs(s["keep_achieved"] - 0.8) <= 0.8 * 0.005 + 1e-9 and s["keep_achieved"] <= 0.8, s
print(f"clean-install smoke: ok ({s['method']}, keep {s['keep_achieved']:.4f}, "
      f"perplexity {s['ppl_dense']:.2f} -> {s['ppl_compressed']:.2f} on 2 x 128 tokens)")
PY
cd "$root"
