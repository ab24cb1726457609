"""The issue-29 equal-bytes tables, from the results files of benchmarks/equal_bytes.sh and quant_only.sh.

Usage: python benchmarks/equal_bytes_table.py [RESULTS_DIR]   (default benchmarks/results/equal-bytes)
Prints markdown: perplexity (held-out speeches, Hamlet) and bits per target weight for every row at each
byte budget, then bytes and CPU speed-ups. Every number is read from a `ranklm bench` / `compress` /
`evaluate` JSON output; nothing is computed here but bits from bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WIDTH_OF_BUDGET = {0.5234375: 8, 0.2734375: 4, 0.2109375: 3, 0.1484375: 2}


def label(method: str) -> str:
    if ":" not in method:
        return "low-rank alone (kfac-global, bf16 factors)"
    widths = method.split(":", 1)[1]
    if "/" in widths:
        return f"joint allocator ({widths.replace('/', ', ')})"
    return f"kfac-global + {widths} factors (ranks by the knapsack at {widths})"


def fmt(x, digits=2):
    return "-" if x is None else (f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}")


def main(root: str = "benchmarks/results/equal-bytes") -> None:
    d = Path(root)
    rows = [r for r in json.loads((d / "bench.json").read_text())["rows"]]
    dense = next(r for r in rows if r["method"] == "dense")
    cells: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        cells.setdefault(label(r["method"]), {})[WIDTH_OF_BUDGET.get(round(r["keep"], 7), r["keep"])] = r
    quant = {}
    for n in (8, 4, 3, 2):
        f = d / f"int{n}.json"
        if f.exists():
            c = json.loads(f.read_text())
            h = d / f"int{n}-hamlet.json"
            lat = d / f"int{n}-latency.json"
            c["ppl_hamlet"] = json.loads(h.read_text())["ppl"] if h.exists() else None
            if lat.exists():
                lj = json.loads(lat.read_text())
                c["speedup"], c["decode_speedup"] = lj.get("speedup"), lj.get("decode_speedup")
            quant[n] = c
    widths = (8, 4, 3, 2)
    print(f"Dense bfloat16: speeches {fmt(dense.get('ppl'))}, Hamlet {fmt(dense.get('ppl_hamlet'))}.\n")
    head = "| row | " + " | ".join(f"{n}-bit budget: speeches / Hamlet / bits per weight" for n in widths) + " |"
    print(head)
    print("|---|" + "---|" * len(widths))
    line = ["weight-only quantization alone (`--keep 1 --quantize intN`)"]
    for n in widths:
        q = quant.get(n)
        line.append("-" if q is None else f"{fmt(q.get('ppl_compressed'))} / {fmt(q.get('ppl_hamlet'))} / "
                    f"{fmt(q.get('bits_per_target_weight'), 3)}")
    print("| " + " | ".join(line) + " |")
    for name, by in cells.items():
        line = [name]
        for n in widths:
            r = by.get(n)
            line.append("-" if r is None else (f"{fmt(r.get('ppl'))} / {fmt(r.get('ppl_hamlet'))} / "
                                               f"{fmt(r.get('bits_per_target_weight'), 3)}"
                                               + ("" if r.get("status") == "ok" else f" ({r.get('status')})")))
        print("| " + " | ".join(line) + " |")
    print("\n| row | budget | keep (params) | target bytes | model bytes | prefill speed-up (1x512, 8x128) | decode speed-up |")
    print("|---|---|---|---|---|---|---|")
    for n in widths:
        q = quant.get(n)
        if q:
            print(f"| int{n} alone | {n}-bit | 1.0000 | {q['target_bytes']:,} | {q['model_bytes']:,} | "
                  f"{fmt(q.get('speedup'))}x | {fmt(q.get('decode_speedup'))}x |")
        for name, by in cells.items():
            r = by.get(n)
            if r and r.get("status") == "ok":
                print(f"| {name} | {n}-bit | {r['keep_achieved']:.4f} | {r['target_bytes']:,} | {r['model_bytes']:,} | "
                      f"{fmt(r.get('speedup'))}x | {fmt(r.get('decode_speedup'))}x |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
