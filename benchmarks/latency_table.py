"""Format the JSON of `ranklm evaluate CKPT --latency --json` runs as one markdown table (no numbers of its own).

Usage: python benchmarks/latency_table.py RESULTS_DIR   (reads latency-*.json, in the order of commands.txt)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    root = Path(folder)
    order = [line.split()[2].rsplit("/", 1)[-1] for line in (root / "commands.txt").read_text().splitlines()
             if line.startswith("ranklm evaluate")]
    print("| checkpoint | keep | ppl (4 x 512) | prefill 1x128 | 1x512 | 8x128 | 8x512 | FLOP limit targets / all linear "
          "| 8x512 / all-linear limit | worst shape / all-linear limit | decode tok/s dense -> ckpt | decode speed-up / limit | of limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in order:
        path = root / f"latency-{name}.json"
        if not path.exists() or not path.stat().st_size:
            continue
        d = json.loads(path.read_text())
        lat = d["latency"]
        pts = {(p["batch"], p["seq_len"]): p["speedup"] for p in lat["points"]}
        lin = lat["flop_ratio_linear_layers"]
        dec = lat.get("decode") or {}
        cells = [f"{pts.get(s, float('nan')):.2f}x" for s in ((1, 128), (1, 512), (8, 128), (8, 512))]
        decode = (f"{dec['dense_tok_s']:.1f} -> {dec['compressed_tok_s']:.1f} | {dec['speedup']:.2f}x / {dec['limit']:.2f}x "
                  f"| {dec['speedup'] / dec['limit']:.0%}") if dec else "- | - | -"
        print(f"| {name} | {d['keep_achieved']:.4f} | {d['ppl']:.2f} | " + " | ".join(cells)
              + f" | {lat['flop_ratio_limit']:.2f}x / {lin:.2f}x | {pts.get((8, 512), float('nan')) / lin:.0%} "
              + f"| {min(pts.values()) / lin:.0%} | {decode} |")
    threads = {json.loads(p.read_text())["latency"].get("threads") for p in root.glob("latency-*.json") if p.stat().st_size}
    print(f"\ntorch threads: {', '.join(str(t) for t in sorted(threads))}")


if __name__ == "__main__":
    main(sys.argv[1])
