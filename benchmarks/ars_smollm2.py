"""ARS vs uniform on the packaged SmolLM2-135M and the default corpus (zero fine-tuning).

Command (run from the repository root; ~1 CPU thread so it does not starve other work):

    nohup python benchmarks/ars_smollm2.py --steps 100 --out benchmarks/results/ars > benchmarks/results/ars.log 2>&1 &

Calibration: 32 windows x 256 tokens from the calibration part of the default corpus (seed 0), used both
for the whitening Gram matrices and as ARS's training text. Evaluation: the first 16 windows x 512 tokens
of the held-out speeches. Statistics and factorizations are computed once per base and shared by all runs;
each run allocates, installs on a copy of the dense model and measures perplexity. Writes
OUT/results.jsonl (one row per run, with allocate wall time) and OUT/ranks-<base>-<alloc>-<keep>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from ranklm.allocate import AllocationContext, get_allocator  # noqa: E402
from ranklm.api import decompose_targets, install_rank_map  # noqa: E402
from ranklm.budget import keep_ratio  # noqa: E402
from ranklm.calibration import collect_stats, default_corpus, token_windows  # noqa: E402
from ranklm.decompose import get_base  # noqa: E402
from ranklm.eval import perplexity  # noqa: E402
from ranklm.models import load_model  # noqa: E402
from ranklm.report import plot_rank_map  # noqa: E402
from ranklm.targets import find_targets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=16.0)
    ap.add_argument("--gamma", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--keeps", default="0.6,0.8")
    ap.add_argument("--runs", default="whiten+uniform,whiten+ars,svd+ars")
    ap.add_argument("--out", default="benchmarks/results/ars")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = out / "results.jsonl"

    model, tok, info = load_model(None)
    calib_src, eval_src = default_corpus()
    calib = token_windows(tok, calib_src, args.calib_len, args.calib, seed=0)
    evalw = token_windows(tok, eval_src, 512, args.eval, purpose="evaluation")
    t0 = time.perf_counter()
    dense = perplexity(model, evalw, 4, progress=False)
    print(f"dense {dense} ({time.perf_counter() - t0:.0f}s)", flush=True)
    targets = find_targets(model)
    runs = [r.split("+") for r in args.runs.split(",")]
    facts = {}
    for base in sorted({b for b, _ in runs}):
        t0 = time.perf_counter()
        b = get_base(base)
        stats = collect_stats(model, targets, calib, b.needs, 4, progress=False) if b.needs else {}
        facts[base] = decompose_targets(model, targets, b, stats, progress=False)
        print(f"factorized {base} in {time.perf_counter() - t0:.0f}s", flush=True)
    opts = dict(steps=args.steps, lr=args.lr, lam=args.lam, gamma=args.gamma, batch_size=args.batch)
    for keep in [float(k) for k in args.keeps.split(",")]:
        for base, alloc in runs:
            t0 = time.perf_counter()
            ctx = AllocationContext(model=model, windows=calib, batch_size=args.batch, seed=0, progress=True)
            rank_map = get_allocator(alloc, **(opts if alloc == "ars" else {})).allocate(targets, facts[base], keep, 1, ctx)
            alloc_s = time.perf_counter() - t0
            m = copy.deepcopy(model)
            install_rank_map(m, targets, facts[base], rank_map)
            res = perplexity(m, evalw, 4, progress=False)
            del m
            ars = ctx.artifacts.get("ars", {})
            row = {
                "base": base, "allocator": alloc, "keep": keep, "keep_achieved": keep_ratio(targets, rank_map),
                "ppl": res.ppl, "dense_ppl": dense.ppl, "eval_windows": res.windows, "eval_seq_len": res.seq_len,
                "eval_tokens": res.tokens, "calib": f"{args.calib}x{args.calib_len}", "allocate_s": round(alloc_s, 1),
                "ars_options": opts if alloc == "ars" else None,
                "keep_learned": ars.get("keep_learned"),
                "keep_history_every10": ars.get("history", {}).get("keep", [])[::10],
                "lm_loss_first_last": [ars["history"]["lm_loss"][0], ars["history"]["lm_loss"][-1]] if ars else None,
                "prefix_final": ars.get("prefix_fraction_final"),
                "rank_map": rank_map,
            }
            with open(rows, "a") as f:
                f.write(json.dumps(row) + "\n")
            meta = {
                "rank_map": rank_map,
                "modules": {t.name: {"out": t.out_features, "in": t.in_features, "block": t.block} for t in targets},
                "recipe": {"name": f"{base}+{alloc}", "base": base, "allocator": alloc},
                "keep_requested": keep, "keep_achieved": row["keep_achieved"],
            }
            plot_rank_map(meta, out / f"ranks-{base}-{alloc}-{keep}.png")
            print(f"{base}+{alloc} keep {keep}: ppl {res.ppl:.3f} (dense {dense.ppl:.3f}), allocate {alloc_s:.0f}s, "
                  f"learned keep {row['keep_learned']}", flush=True)


if __name__ == "__main__":
    main()
