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
