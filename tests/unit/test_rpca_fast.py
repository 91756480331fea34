"""The fast SVTs of Stage 1: the warm-started subspace SVT agrees with the Gram and full-SVD routes."""
import torch

from glrs import rpca


def synthetic(m, n, rank, frac=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    L0 = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    support = torch.rand(m, n, generator=g) < frac
    S0 = torch.where(support, 10 * (torch.rand(m, n, generator=g, dtype=torch.float64) - 0.5), torch.zeros((), dtype=torch.float64))
    return L0, S0


def weight_like(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    heavy = torch.randn(m, n, generator=g, dtype=torch.float64) / torch.rand(m, n, generator=g, dtype=torch.float64).clamp_min(0.05).sqrt()
    spikes = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64)
    return 0.02 * heavy + 0.05 * spikes


def test_subspace_svt_matches_full_svd_threshold():
    L0, S0 = synthetic(80, 150, rank=6, seed=1)
    for M in (L0 + 0.01 * S0, (L0 + 0.01 * S0).T):  # both orientations
        for tau in (50.0, 5.0, 0.5):
            svt = rpca.SubspaceSVT(tuple(M.shape), M.device)
            U, s, V = svt(M, tau)
            Uf, sf, Vf = rpca._svt_full(M, tau)
            assert s.numel() == sf.numel()
            torch.testing.assert_close(s, sf, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close((U * s) @ V.T, (Uf * sf) @ Vf.T, rtol=0, atol=1e-8)
            assert svt.stats["gram_calls"] == 0  # found by the block iteration, not the fallback


def test_subspace_svt_grows_its_rank_guess():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(120, 200, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(2, -2, 200, dtype=torch.float64))
    svt = rpca.SubspaceSVT(tuple(M.shape), M.device, k0=4, oversample=4, grow=8, max_fraction=1.0, max_steps=200)
    U, s, V = svt(M, 1.0)
    _, sf, _ = rpca._svt_full(M, 1.0)
    assert s.numel() == sf.numel() > 12 and svt.stats["grows"] > 0
    torch.testing.assert_close(s, sf, rtol=1e-8, atol=1e-8)


def test_rpca_subspace_agrees_with_gram_and_full_svd():
    for shape in [(96, 160), (160, 96)]:
        L0, S0 = synthetic(*shape, rank=4, seed=3)
        sub = rpca.rpca(L0 + S0, tol=1e-9, svt_method="subspace")
        gram = rpca.rpca(L0 + S0, tol=1e-9, svt_method="gram")
        full = rpca.rpca(L0 + S0, tol=1e-9, full_svd=True)
        assert sub.stats["svt"] == "subspace" and sub.stats["gram_calls"] == 0
        assert sub.converged and sub.iterations == gram.iterations == full.iterations
        assert sub.sigma.numel() == gram.sigma.numel() == full.sigma.numel() == 4
        torch.testing.assert_close(sub.L, gram.L, rtol=0, atol=1e-8)
        torch.testing.assert_close(sub.S, full.S, rtol=0, atol=1e-8)
        assert torch.linalg.norm(sub.L - L0) / torch.linalg.norm(L0) < 1e-5


def test_rpca_subspace_on_a_high_rank_weight_like_matrix_switches_to_gram():
    W = weight_like(64, 112)
    sub = rpca.rpca(W, tol=1e-8, svt_method="subspace")
    ref = rpca.rpca(W, tol=1e-8, full_svd=True)
    assert sub.stats["switched_to_gram"]
    assert sub.iterations == ref.iterations and sub.sigma.numel() == ref.sigma.numel()
    torch.testing.assert_close(sub.L, ref.L, rtol=0, atol=1e-7)
    torch.testing.assert_close(sub.S, ref.S, rtol=0, atol=1e-7)


def test_float32_iterates_with_float64_svt():
    L0, S0 = synthetic(64, 128, rank=3, seed=4)
    W = (L0 + S0).float()
    sub = rpca.rpca(W, tol=1e-6, dtype=torch.float32, svt_method="subspace")
    ref = rpca.rpca(W, tol=1e-6, dtype=torch.float64, svt_method="gram")
    assert sub.converged and sub.U.dtype == torch.float32 and sub.sigma.numel() == 3
    assert abs(sub.iterations - ref.iterations) <= 1
    torch.testing.assert_close(sub.L.double(), ref.L, rtol=0, atol=1e-4)


def test_auto_picks_subspace_for_large_matrices(monkeypatch):
    L0, S0 = synthetic(40, 60, rank=2, seed=5)
    assert rpca.rpca(L0 + S0, svt_method="auto").stats["svt"] == "gram"
    monkeypatch.setattr(rpca, "SUBSPACE_MIN_DIM", 32)
    assert rpca.rpca(L0 + S0, svt_method="auto").stats["svt"] == "subspace"


def test_subspace_is_deterministic_on_cpu():
    L0, S0 = synthetic(70, 90, rank=3, seed=6)
    a = rpca.rpca(L0 + S0, svt_method="subspace")
    b = rpca.rpca(L0 + S0, svt_method="subspace")
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.sigma, b.sigma)


def test_iterative_spectral_norm():
    W = weight_like(50, 90, seed=7)
    assert abs(rpca._spectral_norm_iterative(W) - float(torch.linalg.matrix_norm(W, ord=2))) < 1e-12 * float(torch.linalg.matrix_norm(W, ord=2))
    assert abs(rpca._spectral_norm_iterative(W.T) - rpca._spectral_norm(W)) < 1e-10


def test_callback_sees_every_iteration_and_can_stop():
    L0, S0 = synthetic(40, 60, rank=2, seed=8)
    seen = []
    res = rpca.rpca(L0 + S0, callback=lambda it, r: seen.append((it, r)) or it == 3)
    assert res.iterations == 3 and [i for i, _ in seen] == [1, 2, 3] and not res.converged
    seen.clear()
    res = rpca.rpca(L0 + S0, callback=lambda it, r: seen.append((it, r)))
    assert res.converged and seen[-1] == (res.iterations, res.residual)
