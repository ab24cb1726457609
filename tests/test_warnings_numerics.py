"""Every first run works (issue): departures from the plan that only ranklm.json recorded now warn once.

- the global allocator's exact knapsack fell back to greedy or to a time-limited incumbent;
- whiten's output side dropped directions that the allocated ranks use (or clamped negatives past round-off);
- the sensitivity table held non-finite perplexities.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import scipy.optimize
import torch

import ranklm
from ranklm.allocate import get_allocator
from ranklm.allocate.base import AllocationContext
from ranklm.budget import max_factored_rank
from ranklm.config import CompressConfig
from ranklm.decompose import get_base
from ranklm.decompose.base import Factorization
from ranklm.pipeline import knapsack_warning, output_side_warning, run_warnings, sensitivity_warning
from ranklm.targets import Target

from conftest import make_model, random_ids

torch.set_num_threads(1)
FAST = ["--calib-windows", "8", "--seq-len", "32", "--batch-size", "4", "--no-eval", "--json"]


def _state(artifacts, rank_map=None):
    return SimpleNamespace(artifacts=artifacts, rank_map=rank_map or {})


def _cli(capsys, *args):
    from ranklm.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


# --------------------------------------------------------------------------- 1. global allocator


def _knapsack_problem():
    p, q = Target("p", 10, 10, "linear", 0), Target("q", 10, 20, "linear", 0)

    def fac(t, values):
        k = max_factored_rank(t)
        s = torch.tensor(values, dtype=torch.float64).sqrt()
        return Factorization(torch.zeros(t.out_features, k), torch.zeros(k, t.in_features), s, meta={"loss_scale": 1.0})

    # greedy is suboptimal here (test_global_allocator.py): greedy {p: 1, q: 2}, optimum {p: 3, q: 1}
    return [p, q], {"p": fac(p, [100, 10, 9] + [1e-4] * 7), "q": fac(q, [100, 18] + [1e-4] * 8)}, 90 / 300


def test_optimal_milp_is_recorded_proven_and_not_warned():
    targets, facs, keep = _knapsack_problem()
    ctx = AllocationContext()
    get_allocator("global").allocate(targets, facs, keep, context=ctx)
    rec = ctx.artifacts["global"]
    assert rec["exact_proven"] is True and "fallback" not in rec
    assert rec["loss_lower_bound"] <= rec["loss_exact"] + 1e-9
    assert knapsack_warning(_state(ctx.artifacts)) is None
    # the user asked for greedy: nothing departed from the plan
    ctx = AllocationContext()
    get_allocator("global", solver="greedy").allocate(targets, facs, keep, context=ctx)
    assert knapsack_warning(_state(ctx.artifacts)) is None


def test_failed_milp_falls_back_to_greedy_and_warns(monkeypatch):
    targets, facs, keep = _knapsack_problem()
    monkeypatch.setattr(scipy.optimize, "milp", lambda *a, **k: scipy.optimize.OptimizeResult(
        x=None, status=1, message="Time limit reached. (HiGHS Status 13)", mip_gap=float("nan")))
    ctx = AllocationContext()
    rank_map = get_allocator("global", time_limit=0.1).allocate(targets, facs, keep, context=ctx)
    rec = ctx.artifacts["global"]
    assert rank_map == {"p": 1, "q": 2} and rec["chosen"] == "greedy" and rec["exact_proven"] is False
    line = knapsack_warning(_state(ctx.artifacts))
    assert line.startswith("warning: global allocator:") and "\n" not in line
    assert "greedy" in line and "time_limit" in line and f"{rec['loss_greedy']:.4g}" in line


def test_time_limited_incumbent_is_used_but_warned(monkeypatch):
    targets, facs, keep = _knapsack_problem()
    real = scipy.optimize.milp

    def stopped(*a, **k):  # the optimum found, but HiGHS stopped at its time limit before proving it
        res = real(*a, **k)
        res.status, res.message = 1, "Time limit reached. (HiGHS Status 13)"
        return res

    monkeypatch.setattr(scipy.optimize, "milp", stopped)
    ctx = AllocationContext()
    rank_map = get_allocator("global").allocate(targets, facs, keep, context=ctx)
    rec = ctx.artifacts["global"]
    assert rank_map == {"p": 3, "q": 1} and rec["chosen"] == "exact" and rec["exact_proven"] is False
    line = knapsack_warning(_state(ctx.artifacts))
    assert "incumbent" in line and "time_limit" in line


def test_cli_prints_one_warning_when_the_knapsack_falls_back(monkeypatch, capsys, tiny_llama_dir, text_file, tmp_path):
    monkeypatch.setattr(scipy.optimize, "milp", lambda *a, **k: scipy.optimize.OptimizeResult(
        x=None, status=4, message="HiGHS failed", mip_gap=float("nan")))
    code, _out, err = _cli(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--keep", "0.6", *FAST,
                          "--output", tmp_path / "ckpt")  # the default recipe: kfac-global
    assert code == 0, err
    warnings = _warnings(err)
    assert len(warnings) == 1 and "global allocator" in warnings[0] and "greedy" in warnings[0], err
    meta = json.loads((tmp_path / "ckpt" / "ranklm.json").read_text())
    assert meta["artifacts"]["global"]["chosen"] == "greedy" and meta["artifacts"]["global"]["exact_proven"] is False


# --------------------------------------------------------------------------- 2. whiten's output side


def _low_rank_cov(n=8, rank=3, negative=0.0):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.zeros(n, dtype=torch.float64)
    lam[:rank] = torch.tensor([4.0, 2.0, 1.0][:rank], dtype=torch.float64)
    lam[-1] = -negative * 4.0
    return (q * lam) @ q.T


def test_output_side_records_dropped_directions_and_clamped_negatives():
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = get_base("whiten")
    f = base._decompose_from_output(w, _low_rank_cov(negative=1e-14), max_rank=6)
    r = f.meta["numerics"]
    assert r["method"] == "output-eigh" and r["live_rank"] == 3 and r["dropped"] == 5
    assert r["clamped"] >= 1 and 0 < r["clamped_rel"] < 1e-10  # round-off sized: recorded
    assert torch.all(f.B[3:] == 0) and torch.any(f.B[:3] != 0)  # dropped directions get B = 0
    arts = {"numerics": {"t": r}}
    assert output_side_warning(_state(arts, {"t": 3})) is None  # the allocated rank uses live directions only
    assert output_side_warning(_state(arts, {"t": "dense"})) is None
    line = output_side_warning(_state(arts, {"t": 5}))
    assert line.startswith("warning: whiten (output side):") and "2 of 5 ranks" in line and "\n" not in line
    # a negative eigenvalue far past round-off: the statistic is suspect, warned even at a live rank
    big = base._decompose_from_output(w, _low_rank_cov(negative=1e-2), max_rank=6).meta["numerics"]
    assert big["clamped_rel"] == pytest.approx(1e-2, rel=1e-6)
    line = output_side_warning(_state({"numerics": {"t": big}}, {"t": 2}))
    assert "negative eigenvalues beyond round-off" in line and "1.0e-02" in line


def test_compress_warns_when_allocated_ranks_reach_dead_output_directions():
    """v_proj of block 0 keeps 2 of its 32 output rows: its output covariance has rank 2, the uniform keep 0.6
    gives it rank 12; o_proj reads those values (rank <= 4). The default whiten output side drops the rest."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[2:].zero_()
    cfg = CompressConfig(keep=0.6, recipe="svd-llm", calib_windows=8, seq_len=32)
    ranklm.compress(model, None, cfg, data=random_ids(8, 32), progress=False)
    rec = model.ranklm.artifacts["numerics"]
    v = rec["model.layers.0.self_attn.v_proj"]
    assert v["method"] == "output-eigh" and v["live_rank"] <= 2 < model.ranklm.rank_map["model.layers.0.self_attn.v_proj"]
    assert rec["model.layers.1.self_attn.v_proj"]["live_rank"] == 32  # healthy block: every direction carries energy
    lines = run_warnings(model.ranklm)
    assert len(lines) == 1 and "whiten (output side)" in lines[0] and "model.layers.0.self_attn" in lines[0]


# --------------------------------------------------------------------------- 3. sensitivity


def _sensitivity_run(tmp_path, ppl_row_a):
    targets = [Target("a", 8, 8, "linear", 0), Target("b", 8, 8, "linear", 0)]
    facs = {t.name: Factorization(torch.eye(8), torch.eye(8), torch.linspace(2, 1, 8)) for t in targets}
    table = {"grid": [0.25, 0.5], "dense_ppl": 10.0, "windows": 1, "seq_len": 8,
             "ppl": {"a": ppl_row_a, "b": [30.0, 12.0]}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    ctx = AllocationContext(model=torch.nn.Linear(1, 1), windows=torch.zeros(1, 8, dtype=torch.long))
    get_allocator("sensitivity", table=str(path), cache=False).allocate(targets, facs, 0.5, context=ctx)
    return ctx.artifacts


def test_non_finite_sensitivity_is_recorded_and_warned(tmp_path):
    arts = _sensitivity_run(tmp_path, [float("nan"), 11.0])
    rec = arts["sensitivity"]
    assert rec["non_finite"] == [{"target": "a", "ratio": 0.25, "ppl": "nan"}] and rec["non_finite_logppl"] == 700.0
    line = sensitivity_warning(_state(arts))
    assert line.startswith("warning: sensitivity:") and "a at ratio 0.25" in line and "\n" not in line
    clean = _sensitivity_run(tmp_path, [20.0, 11.0])
    assert clean["sensitivity"]["non_finite"] == [] and sensitivity_warning(_state(clean)) is None
