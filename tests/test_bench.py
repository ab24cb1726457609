"""`ranklm bench` on a tiny random Llama: the grid, its files, failing cells, --auto and the reproducing command."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import pytest

import torch

from ranklm.apps.bench import calibration_split, parse_keeps, parse_method, parse_scoped_options, reproduce_command
from ranklm.calibration import read_text_source, token_windows
from ranklm.cli import main
from ranklm.errors import RanklmError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2",
        "--gen-prompts", "3", "--gen-tokens", "8", "--gen-prompt-len", "8"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is only {len(data)} bytes"
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 200 and im.size[1] > 150


def test_grid_writes_table_plots_and_reproducible_commands(capsys, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "bench"
    code, stdout, err = run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file, "--recipes", "svd,svd-llm",
                            "--keep", "0.8,0.5", "--output", out, *FAST, "--json")
    assert code == 0, err
    for name in ("results.csv", "results.md", "results.json", "ppl_vs_keep.png", "ranks.png"):
        assert (out / name).is_file(), name
    _png_ok(out / "ppl_vs_keep.png")
    _png_ok(out / "ranks.png")

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], float(r["keep"])) for r in rows] == [
        ("dense", 1.0), ("svd", 0.8), ("svd", 0.5), ("svd-llm", 0.8), ("svd-llm", 0.5)]
    dense = rows[0]
    assert dense["status"] == "ok" and float(dense["ppl"]) > 1
    for r in rows[1:]:
        assert r["status"] == "ok", r["error"]
        keep = float(r["keep"])
        assert keep * 0.995 <= float(r["keep_achieved"]) <= keep
        assert float(r["keep_achieved"]) < float(r["keep_model"]) < 1  # embeddings are not compressed
        assert float(r["ppl"]) > 1 and float(r["ppl"]) != float(dense["ppl"])
        assert int(r["eval_windows"]) == 2 and int(r["eval_tokens"]) == 2 * 31 and int(r["seq_len"]) == 32
        assert 0 < float(r["distinct2"]) <= 1 and 0 <= float(r["repeat4"]) <= 1
        assert float(r["flop_limit"]) == pytest.approx(1 / float(r["keep_achieved"]), rel=1e-9)
        assert float(r["compress_s"]) >= float(r["cell_s"]) > 0
        assert float(r["rss_cell_mib"]) >= 0
        assert r["command"].startswith("ranklm compress ") and f"--keep {r['keep']}" in r["command"].replace("'", "")
    # more compression, worse fit of the calibration-free base on its own evaluation text is not guaranteed on random
    # weights, but the two keep ratios must give different models
    assert rows[1]["ppl"] != rows[2]["ppl"]
    md = (out / "results.md").read_text()
    assert "| svd-llm | whiten | uniform | 0.5 |" in md and "distinct-2" in md
    assert md.startswith("`ranklm bench ") and "--recipes svd,svd-llm" in md and "--keep 0.8,0.5" in md
    js = json.loads(stdout)
    assert len(js["rows"]) == 5

    # The command recorded for a cell reproduces its perplexity with `ranklm compress`.
    cell = next(r for r in rows if r["method"] == "svd-llm" and float(r["keep"]) == 0.5)
    argv = shlex.split(cell["command"])[1:]
    argv[argv.index("--output") + 1] = str(tmp_path / "repro")
    code, stdout, err = run(capsys, *argv, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["keep_achieved"] == pytest.approx(float(cell["keep_achieved"]), abs=1e-12)
    assert s["ppl_compressed"] == pytest.approx(float(cell["ppl"]), rel=1e-5)
    assert s["ppl_dense"] == pytest.approx(float(dense["ppl"]), rel=1e-6)


def test_latency_adds_decode_columns(capsys, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "bench"
    code, stdout, err = run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file, "--recipes", "svd",
                            "--keep", "0.5", "--output", out, *FAST, "--gen-prompts", "0", "--latency",
                            "--latency-shapes", "1x8", "--latency-reps", "1", "--decode-tokens", "6x4")
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "results.csv")))
    cell = rows[1]
    assert rows[0]["decode_speedup"] == "" and cell["status"] == "ok", cell["error"]
    assert math.isfinite(float(cell["decode_speedup"])) and float(cell["decode_speedup"]) > 0
    assert 1 < float(cell["decode_limit"]) < float(cell["flop_limit"])
    md = (out / "results.md").read_text()
    assert "decode speed-up (batch 1)" in md and "| svd | 0.5 | 6 | 4 |" in md
    code, stdout, err = run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file, "--output", out,
                            "--overwrite", "--decode-tokens", "6by4")
    assert code == 2 and "bad --decode-tokens" in err


def test_failing_cell_is_recorded_and_others_finish(capsys, tiny_llama_dir, text_file, tmp_path, monkeypatch):
    from ranklm.allocate import ALLOCATORS
    from ranklm.allocate.energy import EnergyAllocator

    class Boom(EnergyAllocator):
        def allocate(self, *a, **k):
            raise RuntimeError("boom in energy")

    monkeypatch.setitem(ALLOCATORS, "energy", Boom)
    out = tmp_path / "bench"
    code, stdout, err = run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file,
                            "--recipes", "svd-energy,svd", "--keep", "0.7,0.5", "--output", out, *FAST,
                            "--gen-prompts", "0")
    # the grid finishes and writes every row, but a run with a failed cell does not exit 0
    assert code == 1, err
    assert "error: 2 of " in err and "bench cells failed" in err and "boom in energy" in err
    rows = list(csv.DictReader(open(out / "results.csv")))
    bad = [r for r in rows if r["method"] == "svd-energy"]
    good = [r for r in rows if r["method"] == "svd"]
    assert len(bad) == 2 and all(r["status"] == "error" and "boom in energy" in r["error"] for r in bad)
    assert len(good) == 2 and all(r["status"] == "ok" and float(r["ppl"]) > 1 for r in good)
    assert "distinct2" not in rows[0]  # generation columns skipped with --gen-prompts 0
    assert "error: RuntimeError: boom in energy" in (out / "results.md").read_text()
    _png_ok(out / "ppl_vs_keep.png")
    _png_ok(out / "ranks.png")


def test_auto_saves_best_by_calibration_perplexity(capsys, tiny_llama_dir, text_file, tmp_path):
    out, best = tmp_path / "bench", tmp_path / "best"
    code, stdout, err = run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file, "--recipes",
                            "svd,svd-llm,whiten+energy", "--keep", "0.5", "--output", out, "--auto", "--save-best", best,
                            "--auto-windows", "3", *FAST, "--gen-prompts", "0", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    rows = [r for r in res["rows"] if r["method"] != "dense"]
    assert all(math.isfinite(r["calib_ppl"]) for r in rows)
    winner = min(rows, key=lambda r: r["calib_ppl"])
    assert res["best"]["method"] == winner["method"]
    meta = json.loads((best / "ranklm.json").read_text())
    assert meta["recipe"]["name"] == winner["method"]
    assert meta["keep_achieved"] == pytest.approx(winner["keep_achieved"])
    assert meta["evaluation"]["compressed"]["ppl"] == pytest.approx(winner["ppl"])
    # the saved checkpoint gives the row's perplexity on the held-out part of --data
    import ranklm
    from ranklm.calibration import split_source
    from ranklm.eval import perplexity

    model, tok = ranklm.load(best)
    windows = token_windows(tok, split_source(read_text_source(text_file))[1], 32, 2, purpose="evaluation")
    assert perplexity(model, windows, 2, progress=False).ppl == pytest.approx(winner["ppl"], rel=1e-5)


def test_calibration_split_matches_compress_windows(tiny_tokenizer, text_file):
    src = read_text_source(text_file)
    calib, held = calibration_split(tiny_tokenizer, src, 32, 5, 4, seed=3)
    assert torch.equal(calib, token_windows(tiny_tokenizer, src, 32, 5, seed=3))
    assert len(held) == 4
    assert not any(torch.equal(h, c) for h in held for c in calib) or len({tuple(c.tolist()) for c in calib}) < 5


@pytest.mark.parametrize(
    "args, match",
    [
        (["--recipes", "svd,nope"], "unknown recipe 'nope'"),
        (["--recipes", "whiten+nope"], "unknown allocator 'nope'"),
        (["--keep", "0.8,1.5"], "bad ratio --keep 1.5"),
        (["--keep", "0.8,0.6", "--auto"], "one --keep ratio"),
        (["--save-best", "x"], "--save-best needs --auto"),
        (["--latency-shapes", "8by512"], "bad latency shape"),
    ],
)
def test_bad_bench_arguments(capsys, tiny_llama_dir, text_file, tmp_path, args, match):
    out = tmp_path / "bench"
    code, stdout, err = run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file, "--output", out, *args)
    assert code == 2, err
    assert match in err and "Traceback" not in err
    assert not out.exists()


def test_parsers():
    m = parse_method("whiten+loss")
    assert (m.base, m.allocator, m.recipe) == ("whiten", "loss", "svd-llm-v2")
    m = parse_method("svd+sensitivity")
    assert m.recipe is None
    assert parse_keeps("0.6, 0.8,0.6") == [0.8, 0.6]
    assert parse_scoped_options(["tfwsvd:adam_steps=40", "side=in"], "--base-opt") == {
        "tfwsvd": {"adam_steps": 40}, "*": {"side": "in"}}
    from ranklm.apps.bench import BenchOptions

    opts = BenchOptions(run={"calib_windows": 7, "seq_len": 64, "sequential": False, "round_to": 8, "max_flop_ratio": 0.6},
                        eval_windows=3, base_options={"asvd": {"alpha": 0.25}})
    cmd = reproduce_command(parse_method("asvd+energy"), 0.6, opts, {"model": "m", "data": "d.txt"}, "out")
    assert cmd == ("ranklm compress --model m --data d.txt --base asvd --allocator energy --keep 0.6 --eval-seq-len 512 "
                   "--eval-windows 3 --calib-windows 7 --seq-len 64 --batch-size 4 --seed 0 --round-to 8 --max-flop-ratio 0.6 "
                   "--whole-model --base-opt alpha=0.25 --output out/asvd_energy-keep0.6")
    # a gradient base carries --fisher-windows; a trainer and its scoped options reach the command
    opts = BenchOptions(run={"trainer": "finetune", "fisher_windows": 4}, trainer_options={"finetune": {"steps": 3}})
    cmd = reproduce_command(parse_method("kfac-global"), 0.8, opts, {}, "out")
    assert "--fisher-windows 4" in cmd and "--trainer finetune --train-opt steps=3" in cmd and "--calib-windows 128" in cmd
    with pytest.raises(RanklmError, match="round-to must be a positive integer"):
        BenchOptions(run={"round_to": 0})


def test_save_dir_keeps_every_cell_as_a_checkpoint(capsys, tiny_llama_dir, text_file, tmp_path):
    out, cells = tmp_path / "bench", tmp_path / "cells"
    code, stdout, err = run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file, "--recipes", "svd,svd-llm",
                            "--keep", "0.5", "--output", out, "--save-dir", cells, *FAST, "--gen-prompts", "0", "--json")
    assert code == 0, err
    rows = [r for r in json.loads(stdout)["rows"] if r["method"] != "dense"]
    import ranklm

    for r in rows:
        meta = json.loads((Path(r["checkpoint"]) / "ranklm.json").read_text())
        assert Path(r["checkpoint"]).parent == cells and meta["keep_achieved"] == pytest.approx(r["keep_achieved"])
        model, _ = ranklm.load(r["checkpoint"])
        assert model.ranklm.rank_map == meta["rank_map"]


def test_whole_model_bench_collects_each_base_statistics(capsys, tiny_llama_dir, text_file, tmp_path):
    # whiten (gram) then asvd (abs_mean) on shared whole-model statistics: the second statistic is collected too
    out = tmp_path / "bench"
    code, stdout, err = run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file, "--recipes", "svd-llm,asvd",
                            "--keep", "0.7", "--whole-model", "--output", out, *FAST, "--gen-prompts", "0",
                            "--alloc-opt", "sensitivity:windows=1")
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows if r["status"] == "ok"} >= {"svd-llm", "asvd"}, rows
