"""The pieces the learning allocators share: the gated low-rank layer, its export, the cubic schedule, the fit tail."""

from __future__ import annotations

import pytest
import torch

from ranklm.allocate.learned import priority_by, start_ranks
from ranklm.allocate.rankdyna import DynaFactorized
from ranklm.budget import max_factored_rank
from ranklm.layers import LowRankLinear
from ranklm.targets import find_targets
from ranklm.train.budget_control import cubic_schedule
from ranklm.train.gated import GatedFactorized, split_factors
from ranklm.train.masks import MaskedFactorized
from ranklm.train.soft_threshold import SoftThresholdFactorized

from conftest import make_model

torch.set_num_threads(1)


def _svd(out_f: int = 12, in_f: int = 16):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f)
    u, s, vt = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    return lin, u, s, vt


@pytest.mark.parametrize("kind", ["masked", "soft", "dyna"])
def test_every_gated_layer_exports_the_components_it_forwards(kind):
    lin, u, s, vt = _svd()
    keep = torch.tensor([0, 1, 3, 4])
    gate = torch.zeros(len(s))
    gate[keep] = 1.0
    if kind == "masked":
        mod: GatedFactorized = MaskedFactorized(u * s, vt, lin.bias, 16, 12)
        mod.mask = gate
    elif kind == "soft":
        mod = SoftThresholdFactorized(lin, u, s, vt, alpha=0.5, in_features=16, out_features=12)
        keep = torch.nonzero((s / s.max()) > 0.5).flatten()
    else:
        mod = DynaFactorized(u, s, vt, lin.bias, 16, 12)
        mod.gate = gate
    assert isinstance(mod, GatedFactorized) and mod.rank == len(s)
    x = torch.randn(5, 16)
    low = mod.to_low_rank(lin, keep)
    assert type(low) is LowRankLinear and low.rank == len(keep)
    with torch.no_grad():
        assert torch.allclose(low(x), mod(x), atol=1e-5)
        w = (u[:, keep] * s[keep]) @ vt[keep]
        assert torch.allclose(mod(x), x @ w.t() + lin.bias, atol=1e-5)


def test_split_rules_give_the_same_product():
    _, u, s, vt = _svd()
    s = s * torch.tensor([1.0, -1.0] * (len(s) // 2))  # signs stay on A
    idx = torch.tensor([2, 0, 5])
    a1, b1 = split_factors(u, s, vt, idx, "left")
    a2, b2 = split_factors(u, s, vt, idx, "sqrt")
    assert torch.allclose(a1 @ b1, a2 @ b2, atol=1e-6)
    assert torch.allclose(a2.norm(dim=0), b2.norm(dim=1), atol=1e-6)  # sqrt|s| on both sides
    a3, b3 = split_factors(u, None, vt, idx)
    assert torch.equal(a3, u[:, idx]) and torch.equal(b3, vt[idx])
    with pytest.raises(ValueError):
        split_factors(u, s, vt, idx, "right")


def test_dyna_layer_shares_the_original_bias_and_masked_layer_freezes_its_factors():
    lin, u, s, vt = _svd()
    dyna = DynaFactorized(u, s, vt, lin.bias, 16, 12)
    assert dyna.bias is lin.bias and [n for n, _ in dyna.named_parameters()] == ["U", "s", "V", "bias"]
    masked = MaskedFactorized(u * s, vt, lin.bias, 16, 12)
    assert list(masked.parameters()) == [] and masked.A is masked.U and masked.B is masked.V
    assert masked.state_dict() == {}  # factors and bias are rebuilt from the base, never saved


def test_cubic_schedule_holds_falls_and_holds():
    b = [cubic_schedule(t, 100.0, 40.0, 5, 15) for t in range(1, 21)]
    assert b[:5] == [100.0] * 5 and b[14:] == [40.0] * 6
    assert all(x > y for x, y in zip(b[4:15], b[5:15]))
    assert cubic_schedule(10, 100.0, 40.0, 5, 15) == pytest.approx(40.0 + 60.0 * 0.5 ** 3)
    assert cubic_schedule(3, 1.0, 0.5, 0, 0.0) == 0.5  # no span: the end value at once
    assert cubic_schedule(3, 1.0, 0.5, 3, 3) == 1.0  # t_begin wins at t_begin == t_end


def test_fit_tail_clamps_learned_ranks_and_never_prefers_past_them():
    targets = find_targets(make_model("llama"))
    t = targets[0]
    learned = {x.name: 0 for x in targets}
    learned[t.name] = 10_000
    start = start_ranks(targets, learned, min_rank=2)
    assert start[t.name] == max_factored_rank(t) and start[targets[1].name] == 2
    prio = priority_by({x.name: [3.0, 2.0] for x in targets})
    cost = t.out_features + t.in_features
    assert prio(t, 0) == 3.0 * cost and prio(t, 1) == 2.0 * cost and prio(t, 2) == -1e30 * cost
    assert priority_by({t.name: [1.0] * 10_000}, never=lambda _: -1e300)(t, max_factored_rank(t)) == -1e300
