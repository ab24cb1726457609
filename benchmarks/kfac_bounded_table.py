"""Markdown table of whole-model vs bounded kfac-global runs (benchmarks/kfac_bounded.sh) from their results files.

For each ``<mode>-<keep>`` in OUT: perplexity (dense, compressed), the rank map compared with the other mode at
the same keep, the largest relative difference of the two checkpoints' factors (when both checkpoints are
still in CK), peak RSS and wall time from ``/usr/bin/time -v``, the compression seconds of the --json summary.
Usage: python benchmarks/kfac_bounded_table.py [OUT] [CK] > OUT/table.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def time_v(log: Path) -> dict[str, float]:
    text = log.read_text(errors="replace")
    out: dict[str, float] = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["peak_rss_gib"] = int(m.group(1)) / 2**20
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        secs = 0.0
        for part in m.group(1).split(":"):
            secs = secs * 60 + float(part)
        out["wall_s"] = secs
    return out


def factor_diff(a: Path, b: Path) -> float | None:
    try:
        from safetensors.torch import load_file
    except ImportError:
        return None
    fa, fb = a / "model.safetensors", b / "model.safetensors"
    if not (fa.is_file() and fb.is_file()):
        return None
    wa, wb = load_file(str(fa)), load_file(str(fb))
    if wa.keys() != wb.keys():
        return float("inf")
    worst = 0.0
    for k in wa:
        if wa[k].shape != wb[k].shape:
            return float("inf")
        ref = float(wa[k].float().norm())
        worst = max(worst, float((wa[k].float() - wb[k].float()).norm()) / max(ref, 1e-30))
    return worst


def main(out: str = "benchmarks/results/kfac-bounded", ck: str = "out/kfac-bounded") -> None:
    out_dir, ck_dir = Path(out), Path(ck)
    rows = []
    for summary in sorted(out_dir.glob("*-0.*.json")):
        if summary.name.endswith("-ranklm.json"):
            continue
        name = summary.stem
        mode, keep = name.rsplit("-", 1)
        meta_file = out_dir / f"{name}-ranklm.json"
        if not meta_file.is_file():
            continue
        s, meta = json.loads(summary.read_text()), json.loads(meta_file.read_text())
        rows.append({"name": name, "mode": mode, "keep": keep, "summary": s, "meta": meta,
                     **time_v(out_dir / f"{name}.log")})
    rows.sort(key=lambda r: (-float(r["keep"]), r["mode"] != "whole"))
    print("| keep | mode | dense ppl | compressed ppl | rank map = other mode | max factor diff (rel.) | peak RSS | wall | compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        other = next((o for o in rows if o["keep"] == r["keep"] and o["mode"] != r["mode"]), None)
        same = "—" if other is None else ("yes" if other["meta"]["rank_map"] == r["meta"]["rank_map"] else "**no**")
        diff = factor_diff(ck_dir / r["name"], ck_dir / other["name"]) if other is not None else None
        s = r["summary"]
        ppl_d, ppl_c = s.get("ppl_dense"), s.get("ppl_compressed")
        print(f"| {r['keep']} | {r['mode']} | {ppl_d:.4f} | {ppl_c:.4f} | {same} | "
              f"{'—' if diff is None else f'{diff:.1e}'} | {r.get('peak_rss_gib', float('nan')):.2f} GiB | "
              f"{r.get('wall_s', float('nan')) / 60:.1f} min | {s.get('compress_seconds')} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
