"""Zero-training methods side by side on the packaged SmolLM2-135M (issue: importance-aware bases).

Perplexity on the default evaluation text (held-out convention speeches) for dense, svd, fwsvd,
tfwsvd, asvd, svd-llm and svd-llm-v2 at keep 0.8 and 0.6, in one process, on the same
calibration windows, with compression wall time and peak RSS growth per cell. Statistics
(Gram, |x| means, Fisher) are collected once and shared; each base decomposes once and every
keep ratio reuses it (its wall time is charged to every cell that uses it).

Command (writes benchmarks/results/importance.{json,md}):

    python benchmarks/importance.py --calib-windows 64 --eval-windows 40 --fisher-windows 32 \
        --tfwsvd-adam 40 --tfwsvd-sgd 20 --sens-windows 1 --sens-seq-len 256
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from ranklm.allocate import AllocationContext, get_allocator
from ranklm.bench import PeakRSS
from ranklm.api import decompose_targets, install_rank_map, refine_factors
from ranklm.budget import keep_ratio, model_keep_ratio, model_params
from ranklm.calibration import collect_stats, default_corpus, token_windows
from ranklm.config import RECIPES
from ranklm.decompose import get_base
from ranklm.eval import perplexity
from ranklm.models import load_model
from ranklm.targets import find_targets

METHODS = ["svd", "fwsvd", "tfwsvd", "asvd", "svd-llm", "svd-llm-v2"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--fisher-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tfwsvd-adam", type=int, default=40)
    ap.add_argument("--tfwsvd-sgd", type=int, default=20)
    ap.add_argument("--sens-windows", type=int, default=1)
    ap.add_argument("--sens-seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/importance")
    args = ap.parse_args()
    command = "python benchmarks/importance.py " + " ".join(sys.argv[1:])

    model, tok, info = load_model(None)
    calib_src, eval_src = default_corpus()
    calib = token_windows(tok, calib_src, args.seq_len, args.calib_windows, seed=0)
    evalw = token_windows(tok, eval_src, args.seq_len, args.eval_windows)
    targets = find_targets(model)
    dense_params = model_params(model)
    rows = []
    dense = perplexity(model, evalw, desc="dense")
    rows.append({"method": "dense", "keep": 1.0, "keep_achieved": 1.0, "keep_model": 1.0, "ppl": dense.ppl,
                 "compress_s": 0.0, "peak_rss_gib": 0.0})
    print(json.dumps(rows[-1]), flush=True)

    bases = {RECIPES[m][0] for m in args.methods}
    needs = set().union(*(get_base(b).needs for b in bases))
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        stats = collect_stats(model, targets, calib, needs, 4, True, fisher_windows=args.fisher_windows)
    stats_time, stats_mem = time.perf_counter() - t0, (mem.growth_mib / 1024)
    base_opts = {"tfwsvd": {"adam_steps": args.tfwsvd_adam, "sgd_steps": args.tfwsvd_sgd}}
    alloc_opts = {"sensitivity": {"windows": args.sens_windows, "seq_len": args.sens_seq_len}}
    facs, base_objs, base_time = {}, {}, {}
    for b in sorted(bases):
        t = time.perf_counter()
        base_objs[b] = get_base(b, **base_opts.get(b, {}))
        sub = {n: dict(s) for n, s in stats.items()}
        facs[b] = decompose_targets(model, targets, base_objs[b], sub, True)
        base_time[b] = time.perf_counter() - t
    for keep in args.keeps:
        for method in args.methods:
            b, a = RECIPES[method]
            t = time.perf_counter()
            with PeakRSS() as mem:
                ctx = AllocationContext(model=model, windows=calib, batch_size=4, seed=0)
                rank_map = get_allocator(a, **alloc_opts.get(a, {})).allocate(targets, facs[b], keep, 1, ctx)
                f = facs[b]
                if hasattr(base_objs[b], "refine"):
                    f = refine_factors(model, targets, base_objs[b], dict(f), stats, rank_map, True)
                compressed = copy.deepcopy(model)
                install_rank_map(compressed, targets, f, rank_map)
            elapsed = time.perf_counter() - t + base_time[b] + stats_time * bool(get_base(b).needs)
            res = perplexity(compressed, evalw, desc=f"{method}@{keep}")
            rows.append({
                "method": method, "base": b, "allocator": a, "keep": keep,
                "keep_achieved": keep_ratio(targets, rank_map),
                "keep_model": model_keep_ratio(dense_params, targets, rank_map),
                "ppl": res.ppl, "compress_s": round(elapsed, 1),
                "peak_rss_gib": round(max((mem.growth_mib / 1024), stats_mem if get_base(b).needs else 0.0), 2),
            })
            print(json.dumps(rows[-1]), flush=True)
            del compressed
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "model": info["name_or_path"], "eval": f"{dense.windows} x {dense.seq_len} tokens "
            f"({dense.tokens} predicted) of {eval_src.description}", "calibration": f"{len(calib)} x {args.seq_len} tokens",
            "torch_threads": torch.get_num_threads()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"`{command}`", "", f"model {meta['model']}; eval {meta['eval']}; calibration {meta['calibration']}", "",
             "| method | base | allocator | keep (targets) | keep (whole model) | perplexity | compress s | peak RSS growth GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] < 1e5 else f"{r['ppl']:.3g}"
        lines.append(f"| {r['method']} | {r.get('base', '-')} | {r.get('allocator', '-')} | {r['keep_achieved']:.4f} | "
                     f"{r['keep_model']:.4f} | {ppl} | {r['compress_s']} | {r['peak_rss_gib']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
