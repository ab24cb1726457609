"""``--allocator global``: exact loss-based knapsack over all targets (issue 13)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from ranklm import RanklmError
from ranklm.allocate import get_allocator
from ranklm.allocate.base import AllocationContext
from ranklm.allocate.knapsack import dropped_loss, loss_values
from ranklm.budget import DENSE, budget_params, keep_ratio, max_factored_rank, meets_budget, target_cost
from ranklm.config import CompressConfig
from ranklm.decompose.base import Factorization
from ranklm.layers import LowRankLinear
from ranklm.targets import Target

torch.set_num_threads(1)


def _fac(t: Target, values: list[float], scale: float = 1.0) -> Factorization:
    k = max_factored_rank(t)
    s = torch.tensor(values, dtype=torch.float64).sqrt()
    return Factorization(torch.zeros(t.out_features, k), torch.zeros(k, t.in_features), s, meta={"loss_scale": scale})


def test_exact_beats_greedy_where_greedy_is_suboptimal():
    # P (10x10): steps of 20 params; Q (10x20): steps of 30. After the rank-1 floors (50 params) 40 remain:
    # greedy takes Q's next component (18 per 30 = 0.6/param beats 10 per 20 = 0.5) and then nothing fits;
    # the optimum keeps P's next two (10 + 9 = 19 > 18).
    p, q = Target("p", 10, 10, "linear", 0), Target("q", 10, 20, "linear", 0)
    facs = {"p": _fac(p, [100, 10, 9] + [1e-4] * 7), "q": _fac(q, [100, 18] + [1e-4] * 8)}
    keep = 90 / 300
    ctx = AllocationContext()
    exact = get_allocator("global").allocate([p, q], facs, keep, context=ctx)
    greedy = get_allocator("global", solver="greedy").allocate([p, q], facs, keep)
    assert exact == {"p": 3, "q": 1} and greedy == {"p": 1, "q": 2}
    rec = ctx.artifacts["global"]
    assert rec["chosen"] == "exact" and rec["loss_exact"] < rec["loss_greedy"]
    assert rec["loss_greedy"] - rec["loss_exact"] == pytest.approx(1.0, abs=1e-3)


def _brute_force(targets, values, keep, min_rank=1):
    budget = budget_params(targets, keep)
    choices = [list(range(min(min_rank, max_factored_rank(t)), max_factored_rank(t) + 1)) + [DENSE] for t in targets]
    best = None
    for combo in itertools.product(*choices):
        rm = {t.name: r for t, r in zip(targets, combo)}
        if sum(target_cost(t, r) for t, r in zip(targets, combo)) <= budget:
            loss = dropped_loss(targets, values, rm)
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_equals_brute_force_on_random_problems(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 9), (9, 6), (8, 8), (5, 12)]
    targets = [Target(f"t{i}", m, n, "linear", i) for i, (m, n) in enumerate(shapes)]
    facs = {}
    for t in targets:
        r = min(t.out_features, t.in_features)
        v = torch.sort(torch.rand(r, generator=g, dtype=torch.float64) ** 3 * 10, descending=True).values
        facs[t.name] = _fac(t, v.tolist(), scale=0.5)
    values = loss_values(targets, facs)
    keep = float(torch.empty(1).uniform_(0.3, 0.9, generator=g))
    ctx = AllocationContext()
    rm = get_allocator("global").allocate(targets, facs, keep, context=ctx)
    best = _brute_force(targets, values, keep)
    assert dropped_loss(targets, values, rm) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert ctx.artifacts["global"]["loss_exact"] <= ctx.artifacts["global"]["loss_greedy"] + 1e-12
    assert keep_ratio(targets, rm) <= keep + 1e-12


def test_bases_without_comparable_loss_estimates_are_refused():
    with pytest.raises(RanklmError, match="global allocator needs a base whose spectra estimate loss"):
        CompressConfig(base="svd", allocator="global")
    t = Target("t", 6, 6, "linear", 0)
    fac = Factorization(torch.zeros(6, 2), torch.zeros(2, 6), torch.ones(6))  # no loss_scale stamped
    with pytest.raises(RanklmError, match="global allocator needs"):
        get_allocator("global").allocate([t], {"t": fac}, 0.5)


def _cli(capsys, *args):
    from ranklm.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--calib-windows", "8", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "4"]


@pytest.mark.parametrize("keep", [0.6, 0.8])
def test_cli_whiten_global_meets_budget_and_refit_installs_its_ranks(keep, capsys, tiny_llama_dir, text_file, tmp_path):
    import ranklm

    out_dir = tmp_path / "ckpt"
    code, out, err = _cli(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--keep", keep,
                          "--base", "whiten", "--allocator", "global", *FAST, "--no-eval", "--json", "--output", out_dir)
    assert code == 0, err
    s = json.loads(out)
    assert meets_budget(s["keep_achieved"], keep), s
    meta = json.loads((out_dir / "ranklm.json").read_text())
    rec = meta["artifacts"]["global"]
    assert rec["loss_exact"] <= rec["loss_greedy"] and rec["chosen"] == "exact"
    from ranklm.pipeline import make_plan

    plan = make_plan(CompressConfig(keep=keep, base="whiten", allocator="global"))
    assert plan.sequential and plan.refit and plan.needs_pass1  # pass 1 block by block, then the compressed refit
    model, _ = ranklm.load(out_dir)
    for name, rank in meta["rank_map"].items():
        m = model.get_submodule(name)
        if rank == "dense":
            assert not isinstance(m, LowRankLinear)
        else:
            assert isinstance(m, LowRankLinear) and m.A.weight.shape[1] == rank, name


def test_cli_refuses_svd_global_in_one_line(capsys, tiny_llama_dir, text_file, tmp_path):
    code, out, err = _cli(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file,
                          "--base", "svd", "--allocator", "global", *FAST, "--output", tmp_path / "ckpt")
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "whiten" in lines[0] and not (tmp_path / "ckpt").exists()
