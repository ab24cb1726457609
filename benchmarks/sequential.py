"""Whole-model vs sequential (layer-by-layer) calibration: peak RSS, wall time and perplexity.

Each cell runs `ranklm.compress` (whiten + uniform, i.e. svd-llm) in its own child process, and the
parent reads that child's peak RSS from os.wait4, so every number is the true peak of one run.

Parts:
  smollm2  the packaged SmolLM2-135M on the default corpus: whole-model, sequential with dense
           propagation, sequential with compressed propagation (SVD-LLM's update); perplexity on
           held-out speeches.
  1b       a random Llama config of ~1.1 B parameters (TinyLlama shape: 22 layers, hidden 2048,
           MLP 5632, 32 heads / 4 KV heads, vocab 32000), built in the child (nothing downloaded),
           random token ids as calibration; "model" = building it and running one forward, the
           baseline the goal (sequential <= model + 1.5 GiB) refers to.

Command (results in benchmarks/results/sequential-<part>.json and .md; ``--part all`` runs both
parts in one invocation, each with its own calibration size):
    python benchmarks/sequential.py --part smollm2 --calib-windows 32 --eval-windows 40
    python benchmarks/sequential.py --part 1b --calib-windows 8 --seq-len 256
    python benchmarks/sequential.py --part all --calib-windows 32 --eval-windows 16 --calib-windows-1b 8 --seq-len-1b 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    import torch

    import ranklm
    from ranklm.calibration import default_corpus, token_windows
    from ranklm.eval import perplexity

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.part == "1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg).eval()
        tok = None
        calib = torch.randint(0, 32000, (args.calib_windows, args.seq_len), generator=torch.Generator().manual_seed(0))
        evalw = None
    else:
        from ranklm.models import load_model

        model, tok, _ = load_model(None)
        calib_src, eval_src = default_corpus()
        calib = token_windows(tok, calib_src, args.seq_len, args.calib_windows, seed=0)
        evalw = token_windows(tok, eval_src, args.seq_len, args.eval_windows)
    params = sum(p.numel() for p in model.parameters())
    load_s = time.perf_counter() - t0
    out = {"mode": args.mode, "params": params, "load_s": round(load_s, 1)}
    if args.mode == "model":
        with torch.no_grad():
            model(input_ids=calib[:1])
    else:
        cfg = ranklm.CompressConfig(keep=args.keep, recipe="svd-llm", seq_len=args.seq_len, calib_windows=args.calib_windows,
                                    sequential=args.mode != "whole", propagate="dense" if args.mode == "seq-dense" else "compressed")
        t1 = time.perf_counter()
        ranklm.compress(model, tok, cfg, data=calib, progress=False)
        out["compress_s"] = round(time.perf_counter() - t1, 1)
        # ru_maxrss is monotonic: read now, it is the peak up to the end of compression (before evaluation)
        out["peak_rss_compress_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out["keep_achieved"] = model.ranklm.keep_achieved
        if evalw is not None:
            res = perplexity(model, evalw, progress=False)
            out.update(ppl=res.ppl, eval_windows=res.windows, eval_tokens=res.tokens)
    print("RESULT " + json.dumps(out), flush=True)


def parent(args: argparse.Namespace) -> None:
    parts = ["smollm2", "1b"] if args.part == "all" else [args.part]
    rows = []
    for part in parts:
        modes = ["model", "sequential", "whole"] if part == "1b" else ["model", "whole", "seq-dense", "sequential"]
        calib_windows = args.calib_windows_1b if part == "1b" and args.part == "all" else args.calib_windows
        seq_len = args.seq_len_1b if part == "1b" and args.part == "all" else args.seq_len
        for mode in modes:
            rows.append(run_child(part, mode, args.keep, calib_windows, seq_len, args.eval_windows))
    command = "python benchmarks/sequential.py " + " ".join(sys.argv[1:])
    out = Path(f"benchmarks/results/sequential-{args.part}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    lines = [f"`{command}`", "",
             "Peak RSS of the compression (model load + calibration + factorization, before evaluation), its excess over "
             "the 'model' row (load + one forward), and the process's overall peak (incl. perplexity evaluation).", "",
             "| model | mode | params | calibration | peak RSS compress GiB | over model GiB | peak RSS process GiB | wall s | compress s | keep achieved | perplexity |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["part"]: r["peak_rss_gib"] for r in rows if r["mode"] == "model"}
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        peak = r.get("peak_rss_compress_gib", r["peak_rss_gib"])
        over = f"{peak - base[r['part']]:+.2f}" if r["part"] in base and r["mode"] != "model" else "-"
        lines.append(f"| {r['part']} | {r['mode']} | {r.get('params', '-'):,} | {r['calibration']} | {peak} | {over} | {r['peak_rss_gib']} | {r['wall_s']} | "
                     f"{r.get('compress_s', '-')} | {r.get('keep_achieved', '-')} | {ppl} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_child(part: str, mode: str, keep: float, calib_windows: int, seq_len: int, eval_windows: int) -> dict:
    """One cell in a fresh process; its peak RSS comes from the kernel (wait4), not from sampling."""
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--part", part, "--keep", str(keep),
           "--calib-windows", str(calib_windows), "--seq-len", str(seq_len), "--eval-windows", str(eval_windows)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    row = json.loads(line[7:]) if line else {"mode": mode, "error": f"exit status {status}"}
    row.update(part=part, calibration=f"{calib_windows}x{seq_len}", peak_rss_gib=round(usage.ru_maxrss / 2**20, 2), wall_s=round(wall, 1))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["smollm2", "1b", "all"], default="smollm2")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="whole")
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--calib-windows-1b", type=int, default=8, help="with --part all: calibration windows of the 1b part")
    ap.add_argument("--seq-len-1b", type=int, default=256, help="with --part all: window length of the 1b part")
    args = ap.parse_args()
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
