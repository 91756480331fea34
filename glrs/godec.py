"""GoDec: the alternating projections behind CAP's realisation (glrs.realise) and OATS (glrs.methods.oats).

    repeat `iterations` times:
        L <- best rank-r approximation of Wd - S          (the rank step, pluggable)
        S <- Wd - L on the sparse mask of |Wd - L|, 0 elsewhere   (row top-k or N:M)

Both users run this same iteration and differ only in how the rank-r step is computed, so the loop lives
here once and the step is an argument:
  * `exact_step`: the Eckart-Young optimum per iteration (`best_rank_r`, an eigendecomposition of the
    smaller Gram matrix in float64); OATS, whose reference code takes a truncated SVD every iteration;
  * `SubspaceStep`: a warm-started subspace iteration in Wd's dtype, one power step per iteration from the
    previous right basis; the realisation, where a layer's 40 iterations would otherwise cost a full
    eigendecomposition each (glrs.realise, step 2).
Both decompose W D, D = diag(column_scale(input column norms)), and take L D^-1 back with
`unscaled_low_rank`.
SSLC's alternating minimisation (glrs.methods.sslc.decompose) is a different algorithm (its paper's protected
entries, the sparse step first, a global top-k, L-steps accepted only when they lower the objective) and does
not use this loop.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import GlrsError
from .masks import nm_mask, row_topk_mask

# A rank step for one decomposition: A [m, n] -> (P [m, r], B [r, n]) with P B ~ the best rank-r of A.
RankStep = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def best_rank_r(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r approximation of A (Eckart-Young) as (P [m, r], B [r, n]) in float64, A_r = P B.

    P = top-r eigenvectors of A A^T and B = P^T A (or, for tall A, P = A V and B = V^T with the top-r
    eigenvectors V of A^T A): the Gram matrix of the smaller side is formed and diagonalised in
    float64. The same matrix as a truncated SVD, several times faster than a full SVD of A, which
    is what the iterations per matrix cost.
    """
    A64 = A.to(torch.float64)
    m, n = A.shape
    if m <= n:
        _, Q = torch.linalg.eigh(A64 @ A64.T)
        Q = Q[:, m - rank:]
        return Q, Q.T @ A64
    _, V = torch.linalg.eigh(A64.T @ A64)
    V = V[:, n - rank:]
    return A64 @ V, V.T


def exact_step(rank: int) -> RankStep:
    """The exact rank step: `best_rank_r` of each iteration's Wd - S (float64 factors)."""
    return lambda A: best_rank_r(A, rank)


def _orth(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(A).Q


class SubspaceStep:
    """The rank step by a warm-started subspace iteration, in A's dtype.

    Wd - S changes little from one GoDec iteration to the next, so the right basis V [n, l]
    (l = r + oversample) is kept between calls: each call does one power step (Q = orth(A V)), a
    Rayleigh-Ritz step (the SVD of the l x n matrix Q^T A) and keeps its top r. The first call starts
    from a seeded Gaussian V and does `warmup` extra power steps. Deterministic for a fixed thread count
    (seeded generator, no data-dependent branching). One instance per decomposition.
    """

    def __init__(self, rank: int, oversample: int = 8, warmup: int = 6, seed: int = 0):
        self.rank, self.oversample, self.warmup, self.seed = rank, oversample, warmup, seed
        self.V = None

    def __call__(self, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.rank
        V = self.V
        if V is None:
            m, n = A.shape
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            l = min(m, n, r + self.oversample)
            V = _orth(torch.randn(n, l, generator=g, dtype=torch.float64).to(A.device, A.dtype))
            for _ in range(self.warmup):
                V = _orth(A.T @ _orth(A @ V))
        Q = _orth(A @ V)
        Ub, sig, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
        self.V = Vh.T
        return Q @ Ub[:, :r], sig[:r, None] * Vh[:r]


def sparse_mask(scores: torch.Tensor, nnz: int, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """GoDec's sparse support: the row top-k of `scores` with `nnz` in all (row_topk_mask), or under N:M
    the N largest of every M consecutive columns of each row (nm_mask; `nnz` ignored)."""
    return row_topk_mask(scores, nnz) if nm is None else nm_mask(scores, nm)


def column_scale(col_norm: torch.Tensor) -> torch.Tensor:
    """D's diagonal: the inputs' column norms (OATS's ||X_j||, the realisation's sqrt(H_jj)), with dead inputs
    floored at 1e-8 of the mean so that D stays invertible. Both decompose W D, not W."""
    d = col_norm.clamp_min(0)
    floor = 1e-8 * (d.mean() if d.numel() else 1.0)
    if not floor > 0:
        floor = torch.tensor(1.0, dtype=d.dtype, device=d.device)
    return torch.where(d > 0, d, floor)


def unscaled_low_rank(P: torch.Tensor, B: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    """L D^-1 of GoDec's L = P B in float64 as {"U" [m, r], "sigma" [r], "V" [n, r]}: with the r x n SVD
    B D^-1 = Ub diag(sigma) Vh, L D^-1 = (P Ub) diag(sigma) Vh (d: D's diagonal in float64)."""
    m, n = P.shape[0], B.shape[1]
    if P.shape[1] == 0:
        return {"U": d.new_zeros(m, 0), "sigma": d.new_zeros(0), "V": d.new_zeros(n, 0)}
    Ub, sigma, Vh = torch.linalg.svd(B.to(torch.float64) / d.unsqueeze(0), full_matrices=False)
    return {"U": P.to(torch.float64) @ Ub, "sigma": sigma, "V": Vh.T}


def godec(Wd: torch.Tensor, rank: int, nnz: int, iterations: int, step: Callable[[int], RankStep] = exact_step,
          nm: tuple[int, int] | None = None,
          on_iteration: Callable[[torch.Tensor, torch.Tensor], None] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P [m, r], B [r, n], mask) after `iterations` GoDec iterations on Wd; L = P B, S = (Wd - L) on mask.

    step: makes the rank step of this decomposition from the rank (`exact_step`, `SubspaceStep`, or a
    functools.partial of it); rank 0 skips it (L = 0, P and B empty in Wd's dtype). L is cast to Wd's
    dtype, the S-step and the residual are in Wd's dtype. on_iteration(L, mask): called after every
    iteration (OATS's `track` history).

    The next rank step's input Wd - S is formed as torch.where(mask, L, Wd): on the mask S = Wd - L, so
    Wd - S = L there and Wd elsewhere, without the rounding of computing Wd - (Wd - L).
    """
    if iterations < 1:
        raise GlrsError(f"GoDec: iterations must be >= 1, got {iterations}")
    m, n = Wd.shape
    P, B = Wd.new_zeros(m, 0), Wd.new_zeros(0, n)
    L = torch.zeros_like(Wd)
    rank_step = step(rank) if rank > 0 else None
    A = Wd  # Wd - S
    for it in range(iterations):
        if rank_step is not None:
            P, B = rank_step(A)
            L = (P @ B).to(Wd.dtype)
        if rank_step is not None or it == 0:  # rank 0: L = 0 throughout, so the mask does not change
            mask = sparse_mask((Wd - L).abs_(), nnz, nm)
            A = torch.where(mask, L, Wd)
        if on_iteration is not None:
            on_iteration(L, mask)
    return P, B, mask
