"""Per-block cost of kfac-global in bounded memory, measured, and an ESTIMATE for larger Llama shapes from it.

Reads the ``ranklm.json`` of a bounded run (``artifacts.memory.bounded``: per block the statistics seconds, the
factorization seconds, the spilled MiB and the resident MiB after it; written by ``ranklm compress``) and prints:

1. the measured per-block costs (median over blocks) and the run's totals;
2. an estimate for Llama-3-8B and Llama-3-70B shapes, scaling the measured per-block seconds by a cost model
   (statistics: forward FLOPs of a block per token x tokens; factorization: the dense linear algebra of every
   target, Cholesky of each Gram ~ n^3/3, the product L_G^T W L_A ~ m n (m + n), a thin SVD ~ 4 m n k + 8 k^3
   with k = min(m, n)) fitted on the measured shape, and the memory of the bounded mode from the same
   estimate the preflight uses (pipeline/memory.py).

The estimate assumes the same machine and thread count as the measurement, float64 factorizations on the CPU,
and the same windows; it is labelled ESTIMATE wherever it is printed. Usage:
python benchmarks/extrapolate_blocks.py RANKLM_JSON MODEL_DIR [--windows N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from ranklm.pipeline import memory
from ranklm.targets import find_targets

SHAPES = {  # Llama-3 shapes (vocabulary 128,256)
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}


def meta_model(cfg, dtype=torch.bfloat16):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def block_costs(model, dense_max: int) -> tuple[float, float]:
    """(forward FLOPs per token of one block, factorization FLOPs of one block's targets)."""
    targets = [t for t in find_targets(model) if t.block == 0]
    fwd = sum(2 * t.out_features * t.in_features for t in targets)
    fac = 0.0
    for t in targets:
        m, n = t.out_features, t.in_features
        k = min(m, n)
        fac += n**3 / 3 + (m**3 / 3 if m <= dense_max else 0) + m * n * (m + n) + 4 * m * n * k + 8 * k**3
    return float(fwd), fac


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ranklm_json")
    ap.add_argument("model_dir")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    meta = json.loads(Path(a.ranklm_json).read_text())
    mem = meta["artifacts"]["memory"]
    blocks = [b for b in mem["bounded"]["per_block"] if b["block"] >= 0]
    med = {k: statistics.median(b[k] for b in blocks) for k in ("statistics_s", "factorize_s", "spill_mib", "rss_mib")}
    from ranklm.calibration.gradients import DENSE_OUT_MAX

    measured_cfg = AutoConfig.from_pretrained(a.model_dir)
    base = meta_model(measured_cfg, getattr(torch, str(measured_cfg.dtype).replace("torch.", "")) if measured_cfg.dtype else torch.float32)
    fwd0, fac0 = block_costs(base, DENSE_OUT_MAX)
    out = {"measured": {"model": a.model_dir, "blocks": len(blocks), "median_per_block": med,
                        "gradient_s": mem["bounded"].get("gradient_s"), "timings": meta.get("timings"),
                        "estimate_preflight": mem.get("estimate")}, "ESTIMATE": {}}
    print(f"measured ({a.model_dir}, {len(blocks)} blocks, {a.windows} x {a.seq_len} windows): per block (median) "
          f"statistics {med['statistics_s']:.1f} s, factorization {med['factorize_s']:.1f} s, "
          f"factors spilled {med['spill_mib']:.0f} MiB; gradient pass {mem['bounded'].get('gradient_s', 0):.0f} s")
    for name, shape in SHAPES.items():
        cfg = LlamaConfig(**shape, tie_word_embeddings=False)
        model = meta_model(cfg)
        fwd, fac = block_costs(model, DENSE_OUT_MAX)
        layers = shape["num_hidden_layers"]
        stats_s = med["statistics_s"] * fwd / fwd0
        fac_s = med["factorize_s"] * fac / fac0
        targets = find_targets(model)
        est = memory.estimate("bounded", model, targets, {"gram", "out_gram"}, a.windows, a.seq_len, 4, a.windows)
        whole = memory.estimate("whole", model, targets, {"gram", "out_gram"}, a.windows, a.seq_len, 4, a.windows)
        grad_s = (mem["bounded"].get("gradient_s") or 0) * (fwd * layers) / (fwd0 * measured_cfg.num_hidden_layers)
        row = {"per_block_statistics_s": round(stats_s, 1), "per_block_factorize_s": round(fac_s, 1),
               "gradient_pass_s": round(grad_s), "total_hours": round((layers * (stats_s + fac_s) + grad_s) / 3600, 2),
               "model_gib": round(memory.model_bytes(model) / 2**30, 1),
               "bounded_extra_gib": round(est.extra / 2**30, 1), "whole_extra_gib": round(whole.extra / 2**30, 1),
               "spill_gib": round(est.spill / 2**30, 1)}
        out["ESTIMATE"][name] = row
        print(f"ESTIMATE {name}: per block statistics {stats_s:.0f} s + factorization {fac_s:.0f} s; gradient pass "
              f"{grad_s:.0f} s; total {row['total_hours']} h on this CPU; model {row['model_gib']} GiB (bf16) + bounded "
              f"{row['bounded_extra_gib']} GiB (whole-model {row['whole_extra_gib']} GiB); spill {row['spill_gib']} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
