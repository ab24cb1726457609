"""results.csv, results.md, results.json and the plots, written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .grid import BenchResult
from .runner import _fmt

CSV_COLUMNS = [
    "method", "base", "allocator", "keep", "keep_achieved", "keep_model", "ppl", "keep_learned", "prefix_fraction",
    "bits_per_target_weight", "target_bytes", "model_bytes",
    "eval_windows", "eval_tokens",
    "seq_len", "distinct2", "repeat4", "calib_ppl", "speedup", "flop_limit", "decode_speedup", "decode_limit", "compress_s", "cell_s",
    "rss_shared_mib", "rss_cell_mib", "status", "error", "command",
]


def _columns(result: BenchResult) -> list[str]:
    extra = [f"ppl_{label}" for label in result.meta["eval_labels"][1:]]
    if any("ppl_untrained" in r for r in result.rows):  # a bench with a trainer: each cell before it too
        extra += ["ppl_untrained"] + [f"ppl_{label}_untrained" for label in result.meta["eval_labels"][1:]]
    cols = CSV_COLUMNS[:7] + extra + CSV_COLUMNS[7:]
    if not any("calib_ppl" in r for r in result.rows):
        cols.remove("calib_ppl")
    for c in ("speedup", "decode_speedup", "decode_limit"):
        if not any(c in r for r in result.rows):
            cols.remove(c)
    if not any("distinct2" in r for r in result.rows):
        cols.remove("distinct2")
        cols.remove("repeat4")
    for c in ("keep_learned", "prefix_fraction", "bits_per_target_weight", "target_bytes", "model_bytes"):
        if not any(c in r for r in result.rows):
            cols.remove(c)
    return cols


def results_csv(result: BenchResult) -> str:
    buf = io.StringIO()
    cols = _columns(result)
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c, "")) for c in cols})
    return buf.getvalue()


def results_markdown(result: BenchResult, command: str | None = None) -> str:
    m = result.meta
    labels = m["eval_labels"]
    lines = []
    if command:
        lines += [f"`{command}`", ""]
    lines += [
        f"- model: {m['model']} ({m['model_params']:,} parameters, {m['model_mib']:.1f} MiB; {m['targets']} target matrices, "
        f"{m['targets_params']:,} parameters)",
        f"- calibration: {m['calibration']}",
    ]
    for label in labels:
        lines.append(f"- evaluation `{label}`: {m['evaluation'][label]}")
    if m.get("generation"):
        lines.append(f"- generation quality: {m['generation']}; distinct-2 = unique/total bigrams (higher is better), "
                     "rep-4 = fraction of 4-grams already seen earlier in the continuation (lower is better)")
    if m.get("auto"):
        lines.append(f"- `--auto` selection: calibration perplexity on {m['auto']}")
    if m.get("columns", "").startswith("byte"):
        lines.append("- byte budget = the targets' bytes as stored, as a fraction of their dense bytes in the model's "
                     "dtype (--budget-bytes); method:intN = --quantize intN, method:int2/int4 = the joint allocator "
                     "over those widths; bits / target weight = 8 x target bytes / target parameters")
    lines.append(
        "- keep = parameters of the target matrices kept (requested / achieved); whole model = all parameters, "
        "embeddings included. compress s = shared statistics + decomposition of its base + the cell; "
        "RSS = resident-memory growth (MiB) of the shared part / of the cell, against a model of "
        f"{m['model_mib']:.1f} MiB. torch threads: {m['torch_threads']}"
    )
    lines.append("")
    cols = _columns(result)
    in_bytes = m.get("columns", "").startswith("byte")
    head = ["method", "base", "allocator", "byte budget" if in_bytes else "keep", "keep achieved (targets)",
            "keep (whole model)"]
    head += [f"ppl {labels[0]}"] + [f"ppl {lab}" for lab in labels[1:]]
    untrained = "ppl_untrained" in cols
    if untrained:
        head += [f"ppl {lab} before training" for lab in labels]
    if "bits_per_target_weight" in cols:
        head += ["bits / target weight", "target bytes", "model bytes"]
    if "keep_learned" in cols:
        head += ["keep learned (before fit)"]
    if "prefix_fraction" in cols:
        head += ["prefix masks"]
    if "distinct2" in cols:
        head += ["distinct-2", "rep-4"]
    if "calib_ppl" in cols:
        head += ["calib ppl"]
    if "speedup" in cols:
        hl = next((r["latency"]["headline"] for r in result.rows if r.get("latency")), None)
        head += [f"speed-up (batch {hl[0]}, seq {hl[1]})" if hl else "speed-up"]
    head += ["FLOP limit"]
    if "decode_speedup" in cols:
        head += ["decode speed-up (batch 1)", "decode limit (weight bytes)"]
    head += ["compress s", "RSS MiB shared / cell", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [r["method"], r.get("base", "-"), r.get("allocator", "-"), f"{r['keep']:g}",
                 _fmt(r.get("keep_achieved"), 4), _fmt(r.get("keep_model"), 4), _fmt(r.get("ppl"))]
        cells += [_fmt(r.get(f"ppl_{lab}")) for lab in labels[1:]]
        if untrained:
            cells += [_fmt(r.get("ppl_untrained"))] + [_fmt(r.get(f"ppl_{lab}_untrained")) for lab in labels[1:]]
        if "bits_per_target_weight" in cols:
            cells += [_fmt(r.get("bits_per_target_weight"), 3),
                      f"{r['target_bytes']:,}" if r.get("target_bytes") is not None else "-",
                      f"{r['model_bytes']:,}" if r.get("model_bytes") is not None else "-"]
        if "keep_learned" in cols:
            cells += [_fmt(r.get("keep_learned"), 4)]
        if "prefix_fraction" in cols:
            cells += [_fmt(r.get("prefix_fraction"), 3)]
        if "distinct2" in cols:
            cells += [_fmt(r.get("distinct2"), 3), _fmt(r.get("repeat4"), 3)]
        if "calib_ppl" in cols:
            cells += [_fmt(r.get("calib_ppl"))]
        if "speedup" in cols:
            cells += [_fmt(r.get("speedup")) + ("x" if r.get("speedup") is not None else "")]
        cells += [_fmt(r.get("flop_limit"))]
        if "decode_speedup" in cols:
            cells += [_fmt(r.get("decode_speedup")) + ("x" if r.get("decode_speedup") is not None else ""),
                      _fmt(r.get("decode_limit"))]
        cells += [_fmt(r.get("compress_s"), 1),
                  f"{_fmt(r.get('rss_shared_mib'), 0)} / {_fmt(r.get('rss_cell_mib'), 0)}" if r["method"] != "dense" else "-",
                  r["status"] + (f": {r['error']}" if r.get("error") else "")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if result.best:
        b = result.best
        lines += ["", f"**--auto choice at keep {b['keep']:g}: {b['method']}** (calibration perplexity {_fmt(b['calib_ppl'])}, "
                  f"evaluation perplexity {_fmt(b['ppl'])})" + (f", saved to `{b['saved']}`" if b.get("saved") else "")]
    lat = [r for r in result.rows if r.get("latency")]
    if lat:
        lines += ["", "Latency (median forward ms, dense vs compressed, interleaved runs):", "",
                  "| method | keep | batch | seq | dense ms | compressed ms | speed-up | FLOP limit |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in lat:
            for p in r["latency"]["points"]:
                lines.append(f"| {r['method']} | {r['keep']:g} | {p['batch']} | {p['seq_len']} | {p['dense_ms']:.1f} | "
                             f"{p['compressed_ms']:.1f} | {p['speedup']:.2f}x | {r['latency']['flop_ratio_limit']:.2f}x |")
    dec = [r for r in lat if r["latency"].get("decode")]
    if dec:
        lines += ["", "Decode (batch 1, KV cache, greedy, fixed length; median tokens/s of the cached one-token steps, "
                  "interleaved runs; limit = weight bytes read per token, dense / compressed):", "",
                  "| method | keep | prompt | new tokens | dense tok/s | compressed tok/s | speed-up | limit |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in dec:
            d = r["latency"]["decode"]
            lines.append(f"| {r['method']} | {r['keep']:g} | {d['prompt_len']} | {d['new_tokens']} | {d['dense_tok_s']:.1f} | "
                         f"{d['compressed_tok_s']:.1f} | {d['speedup']:.2f}x | {d['limit']:.2f}x |")
    lines += ["", "Reproduce a cell:", ""]
    for r in result.rows:
        lines.append(f"- {r['method']} @ {r['keep']:g}: `{r['command']}`")
    return "\n".join(lines) + "\n"


def write_outputs(result: BenchResult, out: str | os.PathLike, command: str | None = None, overwrite: bool = False) -> Path:
    """results.csv, results.md, results.json, ppl_vs_keep.png, ranks.png, written atomically to ``out``."""
    from ...io import atomic_dir
    from ...report.bench import plot_perplexity_vs_keep, plot_rank_heatmap

    with atomic_dir(out, overwrite) as tmp:
        (tmp / "results.csv").write_text(results_csv(result))
        (tmp / "results.md").write_text(results_markdown(result, command))
        (tmp / "results.json").write_text(json.dumps(
            {"command": command, "meta": result.meta, "rows": result.rows, "best": result.best,
             "rank_maps": result.rank_maps}, indent=1, default=str))
        plot_perplexity_vs_keep(result, tmp / "ppl_vs_keep.png")
        plot_rank_heatmap(result, tmp / "ranks.png")
    return Path(out)
