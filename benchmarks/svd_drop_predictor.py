"""Does the SVD-drop predictor predict where plain SVD hurts? (TFWSVD paper; DESIGN §4)

For a sample of targets of the packaged SmolLM2 and several keep ratios, truncate ONE target at a time
with plain SVD and with FWSVD at the same rank, measure perplexity on held-out text, and correlate the
gap log(ppl_svd / ppl_fwsvd) with the two predictor scores computed beforehand from Fisher:
cv_rows (spread of row-summed Fisher) and fisher_error_ratio (Fisher-weighted error of SVD over FWSVD).
Reports Spearman rank correlations over all (target, keep) pairs and per keep ratio.

Command (results in benchmarks/results/svd_drop_predictor.{json,md}):
    python benchmarks/svd_drop_predictor.py --every 3 --keeps 0.3 0.6 --fisher-windows 8 --eval-windows 2 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ranklm.calibration import default_corpus, token_windows
from ranklm.calibration.fisher import collect_fisher
from ranklm.decompose import get_base
from ranklm.diagnose import matrix_scores
from ranklm.eval import perplexity
from ranklm.models import load_model
from ranklm.targets import Conv1D, find_targets, weight_matrix


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    rx, ry = torch.tensor(ranks(x)), torch.tensor(ranks(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=3, help="use the targets of every N-th block")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.3, 0.6])
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/svd_drop_predictor")
    args = ap.parse_args()
    command = "python benchmarks/svd_drop_predictor.py " + " ".join(sys.argv[1:])

    model, tok, _ = load_model(None)
    calib_src, eval_src = default_corpus()
    calib = token_windows(tok, calib_src, args.seq_len, args.fisher_windows, seed=0)
    evalw = token_windows(tok, eval_src, args.seq_len, args.eval_windows)
    targets = [t for t in find_targets(model) if t.block % args.every == 0]
    with torch.enable_grad():
        fisher = collect_fisher(model, targets, calib)
    dense = perplexity(model, evalw, progress=False).ppl
    rows = []
    for t in tqdm(targets, desc="targets"):
        module = model.get_submodule(t.name)
        original = module.weight.detach().clone()
        w = weight_matrix(module).detach()
        svd_f = get_base("svd").decompose(w, {}, min(t.out_features, t.in_features))
        fw_f = get_base("fwsvd").decompose(w, {"fisher": fisher[t.name]}, min(t.out_features, t.in_features))
        for keep in args.keeps:
            scores = matrix_scores(w, fisher[t.name], keep)
            k = scores["rank"]
            ppl = {}
            for name, fac in (("svd", svd_f), ("fwsvd", fw_f)):
                approx = fac.approx(k).to(original.dtype)
                module.weight.copy_(approx.T if Conv1D and isinstance(module, Conv1D) else approx)
                ppl[name] = perplexity(model, evalw, progress=False).ppl
            module.weight.copy_(original)
            rows.append({"target": t.name, "keep": keep, "rank": k, **{k_: v for k_, v in scores.items() if k_ != "rank"},
                         "ppl_svd": ppl["svd"], "ppl_fwsvd": ppl["fwsvd"], "gap": math.log(ppl["svd"] / ppl["fwsvd"])})
    summary = {}
    for subset, name in [(rows, "all")] + [([r for r in rows if r["keep"] == k], f"keep {k}") for k in args.keeps]:
        gaps = [r["gap"] for r in subset]
        summary[name] = {
            "n": len(subset),
            "spearman_cv_rows": spearman([r["cv_rows"] for r in subset], gaps),
            "spearman_cv_cols": spearman([r["cv_cols"] for r in subset], gaps),
            "spearman_fisher_error_ratio": spearman([r["fisher_error_ratio"] for r in subset], gaps),
            "mean_gap": sum(gaps) / len(gaps),
            "frac_svd_worse": sum(g > 0 for g in gaps) / len(gaps),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "dense_ppl": dense, "summary": summary, "rows": rows}, indent=2))
    lines = [f"`{command}`", "", f"dense perplexity {dense:.2f} ({len(evalw)} x {args.seq_len} held-out tokens); "
             f"{len(targets)} targets (every {args.every}th block), one target truncated at a time.", "",
             "| subset | n | Spearman(cv_rows, gap) | Spearman(cv_cols, gap) | Spearman(fisher_error_ratio, gap) | mean log(ppl_svd/ppl_fwsvd) | SVD worse in |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['n']} | {s['spearman_cv_rows']:.2f} | {s['spearman_cv_cols']:.2f} | "
                     f"{s['spearman_fisher_error_ratio']:.2f} | {s['mean_gap']:.3f} | {s['frac_svd_worse']:.0%} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
