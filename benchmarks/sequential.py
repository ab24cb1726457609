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

Command (results in benchmarks/results/sequential-<part>.json and .md):
    python benchmarks/sequential.py --part smollm2 --calib-windows 32 --eval-windows 40
    python benchmarks/sequential.py --part 1b --calib-windows 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
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
        out["keep_achieved"] = model.ranklm.keep_achieved
        if evalw is not None:
            res = perplexity(model, evalw, progress=False)
            out.update(ppl=res.ppl, eval_windows=res.windows, eval_tokens=res.tokens)
    print("RESULT " + json.dumps(out), flush=True)


def parent(args: argparse.Namespace) -> None:
    modes = ["model", "sequential", "whole"] if args.part == "1b" else ["whole", "seq-dense", "sequential"]
    rows = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--part", args.part, "--keep", str(args.keep),
               "--calib-windows", str(args.calib_windows), "--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"mode": mode, "error": f"exit status {status}"}
        row.update(peak_rss_gib=round(usage.ru_maxrss / 2**20, 2), wall_s=round(wall, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = "python benchmarks/sequential.py " + " ".join(sys.argv[1:])
    out = Path(f"benchmarks/results/sequential-{args.part}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    lines = [f"`{command}`", "", "| mode | params | peak RSS GiB | wall s | compress s | keep achieved | perplexity |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        lines.append(f"| {r['mode']} | {r.get('params', '-'):,} | {r['peak_rss_gib']} | {r['wall_s']} | {r.get('compress_s', '-')} | "
                     f"{r.get('keep_achieved', '-')} | {ppl} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["smollm2", "1b"], default="smollm2")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="whole")
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    args = ap.parse_args()
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
