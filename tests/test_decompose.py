import pytest
import torch

from ranklm import RanklmError
from ranklm.decompose import get_base, whitening_factor


def _rand(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_svd_factors_are_the_truncated_svd(shape):
    w = _rand(*shape)
    f = get_base("svd").decompose(w, {}, max_rank=7)
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    for k in (1, 3, 7):
        expected = u[:, :k] @ torch.diag(s[:k]) @ vt[:k]
        torch.testing.assert_close(f.approx(k).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.s.double(), s, atol=1e-5, rtol=1e-5)
    assert f.A.shape == (shape[0], 7) and f.B.shape == (7, shape[1])


def _correlated_inputs(n, tokens, seed=1):
    """Inputs with very unequal channel scales, so whitening matters."""
    x = _rand(n, tokens, seed)
    mix = _rand(n, n, seed + 1) * torch.logspace(-2, 1, n, dtype=torch.float64)
    return mix @ x


def test_whiten_is_the_output_error_optimum():
    """W_k minimises ||(W - W_k) X||_F: equal to Eckart-Young on WX, and to the projection U_k U_k^T W."""
    m, n, tokens = 14, 10, 200
    w, x = _rand(m, n), _correlated_inputs(n, tokens)
    f = get_base("whiten").decompose(w, {"gram": x @ x.T}, max_rank=6)
    y = w @ x
    uy, sy, _ = torch.linalg.svd(y, full_matrices=False)
    for k in (1, 3, 6):
        wk = f.approx(k).double()
        err = torch.linalg.norm((w - wk) @ x) ** 2
        bound = (sy[k:] ** 2).sum()
        assert float(err) == pytest.approx(float(bound), rel=1e-4)
        # Least-squares optimum: project the outputs onto the top-k output directions of WX.
        proj = uy[:, :k] @ uy[:, :k].T @ w
        torch.testing.assert_close(wk, proj, atol=1e-4, rtol=1e-4)
        # and it beats plain SVD on this objective
        plain = get_base("svd").decompose(w, {}, max_rank=6).approx(k).double()
        assert float(err) < float(torch.linalg.norm((w - plain) @ x) ** 2)


@pytest.mark.parametrize("dead", [0, 3])
def test_whiten_from_the_output_covariance_is_the_same_factorization(dead):
    """A wide target factored from C = W G W^T (out x out) gives the whitened SVD's spectrum and W_k,
    also when inputs are rank-deficient (where the Gram route needs jitter and this one is exact)."""
    m, n, tokens = 8, 14, 200
    w, x = _rand(m, n, 5), _correlated_inputs(n, tokens, 6)
    if dead:
        x[-dead:] = 0
    gram = x @ x.T
    base = get_base("whiten")
    via_gram = base.decompose(w, {"gram": gram}, max_rank=m)
    via_out = base.decompose(w, {"out_cov": w @ gram @ w.T}, max_rank=m)
    assert via_out.meta["numerics"]["method"] == "output-eigh"
    torch.testing.assert_close(via_out.s.double(), via_gram.s.double(), atol=1e-4 * float(via_gram.s[0]), rtol=1e-4)
    y = w @ x
    uy, sy, _ = torch.linalg.svd(y, full_matrices=False)
    for k in (1, 4, m):
        wk = via_out.approx(k).double()
        torch.testing.assert_close(wk, uy[:, :k] @ uy[:, :k].T @ w, atol=1e-5, rtol=1e-5)
        assert float(torch.linalg.norm((w - wk) @ x) ** 2) == pytest.approx(float((sy[k:] ** 2).sum()), rel=1e-4, abs=1e-8 * float((sy**2).sum()))
        a, b = via_out.factors(k)
        ag, bg = via_gram.factors(k)  # balanced the same way: |A| and |B| as in the whitened SVD
        assert float(a.norm()) == pytest.approx(float(ag.norm()), rel=1e-3)
        assert float(b.norm()) == pytest.approx(float(bg.norm()), rel=1e-3)


def test_whiten_output_side_with_more_rank_than_output_energy_stays_bounded():
    """Rank-3 inputs, rank 8 asked: the 5 directions without output energy get B = 0 (no division by ~0),
    A stays U sqrt(s) (what SoftLMs divides back out), and the output error is still the optimum (~0)."""
    w, x = _rand(8, 14, 7), _rand(3, 200, 8)
    x = torch.cat([x, torch.zeros(11, 200, dtype=torch.float64)])
    f = get_base("whiten").decompose(w, {"out_cov": w @ x @ x.T @ w.T}, max_rank=8)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    assert (f.B[3:] == 0).all() and (f.B[:3].norm(dim=1) > 0).all()
    assert float(f.A.double().norm(dim=0)[3:].max()) <= 1e-2 * float(f.A.double().norm(dim=0)[0])
    assert float(torch.linalg.norm((w - f.approx(8).double()) @ x)) <= 1e-5 * float(torch.linalg.norm(w @ x))


def test_whiten_factors_from_output_only_where_out_le_in_and_not_with_shrink():
    from ranklm.targets import Target

    wide, square, tall = Target("down", 8, 20, "linear", 0), Target("o", 8, 8, "linear", 0), Target("up", 20, 8, "linear", 0)
    assert get_base("whiten").factors_from_output(wide) and get_base("whiten").factors_from_output(square)
    assert not get_base("whiten").factors_from_output(tall)
    assert not get_base("whiten", shrink=0.1).factors_from_output(wide)
    assert not get_base("whiten", output_side=False).factors_from_output(wide)


def test_whiten_least_squares_given_B():
    """With B_k fixed, the best A by least squares is (close to) the returned A_k."""
    m, n, tokens = 9, 8, 100
    w, x = _rand(m, n, 3), _correlated_inputs(n, tokens, 4)
    f = get_base("whiten").decompose(w, {"gram": x @ x.T}, max_rank=4)
    a, b = (t.double() for t in f.factors(3))
    # min_A ||W X - A (B X)||  ->  A = (W X)(B X)^+
    a_ls = (w @ x) @ torch.linalg.pinv(b @ x)
    torch.testing.assert_close(a_ls @ b, a @ b, atol=1e-4, rtol=1e-4)


def test_whiten_singular_gram_uses_jitter():
    n = 10
    x = _rand(4, 50) # rank-4 inputs in a 10-dim space
    x = torch.cat([x, torch.zeros(n - 4, 50, dtype=torch.float64)])  # dead channels
    L, how = whitening_factor(x @ x.T)
    assert how == "cholesky" and torch.isfinite(L).all()
    f = get_base("whiten").decompose(_rand(6, n), {"gram": x @ x.T}, max_rank=2)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()


def test_whitening_falls_back_to_eigh():
    g = torch.diag(torch.tensor([1.0, 2.0, -5.0], dtype=torch.float64))  # indefinite beyond any jitter
    L, how = whitening_factor(g)
    assert how == "eigh"
    lam = torch.linalg.eigvalsh(L @ L.T)
    assert float(lam.min()) > 0


def test_non_finite_statistics_are_named():
    g = torch.eye(3, dtype=torch.float64)
    g[0, 0] = float("nan")
    with pytest.raises(RanklmError, match="non-finite.*layer.0.q"):
        whitening_factor(g, "layer.0.q")


def test_thin_svd_matches_torch_on_wide_and_tall():
    from ranklm.decompose.base import thin_svd

    g = torch.Generator().manual_seed(0)
    for shape in [(7, 19), (19, 7), (8, 8)]:
        m = torch.randn(*shape, generator=g, dtype=torch.float64)
        u, s, vt = thin_svd(m)
        k = min(shape)
        assert u.shape == (shape[0], k) and vt.shape == (k, shape[1])
        torch.testing.assert_close(s, torch.linalg.svdvals(m))
        torch.testing.assert_close(u @ torch.diag(s) @ vt, m)
        torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=m.dtype))
