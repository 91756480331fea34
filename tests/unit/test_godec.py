"""GoDec's one loop (glrs.godec): its two rank steps agree, and the loop is GoDec as written in a few lines here."""
from __future__ import annotations

import pytest
import torch

from glrs.godec import SubspaceStep, best_rank_r, exact_step, godec

pytestmark = pytest.mark.usefixtures("one_thread")


def _gapped(m, n, r, seed, per_row=3):
    """A random rank-r matrix with a spectral gap, plus dense noise and `per_row` large outliers in every row."""
    g = torch.Generator().manual_seed(seed)
    low = (torch.randn(m, r, generator=g, dtype=torch.float64) * torch.linspace(4, 2, r, dtype=torch.float64)
           @ torch.randn(r, n, generator=g, dtype=torch.float64))
    cols = torch.rand(m, n, generator=g).argsort(dim=1)[:, :per_row]
    where = torch.zeros(m, n, dtype=torch.bool).scatter_(1, cols, True)
    outliers = (20 + 10 * torch.rand(m, n, generator=g, dtype=torch.float64)) * where
    return low + outliers + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)


def _reference_godec(Wd, rank, keep_per_row, iterations, nm=None):
    """GoDec straight from its definition: full SVD for L, a full sort for S (per row, or per group of M)."""
    S = torch.zeros_like(Wd)
    for _ in range(iterations):
        U, s, Vh = torch.linalg.svd(Wd - S, full_matrices=False)
        L = (U[:, :rank] * s[:rank]) @ Vh[:rank]
        R = Wd - L
        if nm is None:
            order = R.abs().argsort(dim=1, descending=True)[:, :keep_per_row]
            mask = torch.zeros_like(R, dtype=torch.bool).scatter_(1, order, True)
        else:
            N, M = nm
            groups = R.abs().reshape(R.shape[0], -1, M)
            order = groups.argsort(dim=-1, descending=True)[..., :N]
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(R.shape)
        S = R * mask
    return L, mask


@pytest.mark.parametrize("shape", [(72, 56), (56, 72)])
def test_subspace_step_reaches_the_exact_step(shape):
    """The warm-started subspace step, called again on the same matrix, converges to best_rank_r's L; and the whole
    loop with either step ends at the same support and L (the realisation's step is OATS's, up to convergence)."""
    m, n = shape
    r = 4
    A = _gapped(m, n, r, seed=1)
    Pe, Be = best_rank_r(A, r)
    step = SubspaceStep(r)
    for _ in range(10):
        P, B = step(A)
    tol = 1e-8 * float(A.abs().max())
    torch.testing.assert_close(P @ B, Pe @ Be, rtol=0, atol=tol)

    nnz = 3 * m
    Pe, Be, mask_e = godec(A, r, nnz, 40, step=exact_step)
    Ps, Bs, mask_s = godec(A, r, nnz, 40, step=SubspaceStep)
    assert torch.equal(mask_s, mask_e)
    torch.testing.assert_close(Ps @ Bs, Pe @ Be, rtol=0, atol=tol)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_exact_loop_is_godec_as_written(nm):
    """The loop with the exact step reproduces the reference above: the same support, the same L to rounding."""
    m, n, r, per_row = 40, 32, 3, 5
    Wd = _gapped(m, n, r, seed=2)
    L_ref, mask_ref = _reference_godec(Wd, r, per_row, 6, nm)
    P, B, mask = godec(Wd, r, per_row * m, 6, step=exact_step, nm=nm)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(P @ B, L_ref, rtol=0, atol=1e-10 * float(Wd.abs().max()))
    seen = []
    godec(Wd, r, per_row * m, 6, step=exact_step, nm=nm, on_iteration=lambda L, mk: seen.append(mk.clone()))
    assert len(seen) == 6 and torch.equal(seen[-1], mask)
