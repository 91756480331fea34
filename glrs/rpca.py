"""Stage 1: Robust PCA, W = L + S, by the inexact augmented Lagrange multiplier method.

Solves  min ||L||_* + lam ||S||_1  s.t.  W = L + S  (Lin, Chen & Ma 2010, Alg. 5),
with lam = 1/sqrt(max(m, n)), mu_0 = 1.25/||W||_2, rho = 1.5 and the stopping
rule ||W - L - S||_F / ||W||_F < tol (DESIGN.md section 5).

The cost of every iteration is a singular value threshold (SVT). A full SVD
is wasteful there: `svt` diagonalises the small Gram matrix A A^T (A the
orientation of the iterate with fewer rows) in float64 and recovers the right
vectors by one matrix product, so it costs two GEMMs and one eigh of the
smaller side instead of a full SVD. `rpca_reference` is the textbook version
with a full SVD per iteration; tests and benchmarks compare the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RPCA_VERSION = 1


@dataclass
class RPCAResult:
    U: torch.Tensor  # [m, r]
    sigma: torch.Tensor  # [r], descending
    V: torch.Tensor  # [n, r]; L = U diag(sigma) V^T
    S: torch.Tensor  # [m, n] sparse part, dense storage
    iterations: int
    residual: float  # ||W - L - S||_F / ||W||_F
    converged: bool

    @property
    def L(self) -> torch.Tensor:
        return (self.U * self.sigma) @ self.V.T


def default_lambda(shape: tuple[int, int]) -> float:
    return 1.0 / math.sqrt(max(shape))


def svt(M: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular value threshold through the Gram matrix of the short side.

    Returns (U, sigma - tau, V) for the singular values above tau only."""
    m, n = M.shape
    wide = m <= n
    A = M if wide else M.T  # a x b with a <= b
    A64 = A.to(torch.float64)
    evals, evecs = torch.linalg.eigh(A64 @ A64.T)  # ascending
    s = evals.clamp_min(0).sqrt()
    keep = s > tau
    s_k = s[keep].flip(0)
    left = evecs[:, keep].flip(1)
    right = (A64.T @ left) / s_k  # b x r; orthonormal to float64 rounding
    shrunk = (s_k - tau).to(M.dtype)
    left, right = left.to(M.dtype), right.to(M.dtype)
    return (left, shrunk, right) if wide else (right, shrunk, left)


def _svt_full(M: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = s > tau
    return U[:, keep], s[keep] - tau, Vh[keep].T


def _shrink(X: torch.Tensor, thr: float) -> torch.Tensor:
    return torch.sign(X) * (X.abs() - thr).clamp_min(0)


def _spectral_norm(W: torch.Tensor) -> float:
    A = W.to(torch.float64)
    A = A if A.shape[0] <= A.shape[1] else A.T
    return float(torch.linalg.eigvalsh(A @ A.T)[-1].clamp_min(0).sqrt())


def rpca(
    W: torch.Tensor,
    lam: float | None = None,
    tol: float = 1e-7,
    max_iter: int = 500,
    rho: float = 1.5,
    mu_factor: float = 1.25,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    full_svd: bool = False,
) -> RPCAResult:
    """Inexact ALM RPCA of one matrix; `full_svd=True` gives the textbook reference."""
    D = W.to(device=device, dtype=dtype)
    lam = default_lambda(D.shape) if lam is None else lam
    threshold = _svt_full if full_svd else svt
    norm_fro = torch.linalg.norm(D).item()
    if norm_fro == 0:
        raise ValueError("cannot decompose an all-zero matrix")
    norm_two = _spectral_norm(D)
    Y = D / max(norm_two, D.abs().max().item() / lam)
    mu = mu_factor / norm_two
    mu_bar = mu * 1e7
    S = torch.zeros_like(D)
    U = sigma = V = None
    residual = float("inf")
    it = 0
    for it in range(1, max_iter + 1):
        U, sigma, V = threshold(D - S + Y / mu, 1.0 / mu)
        L = (U * sigma) @ V.T
        S = _shrink(D - L + Y / mu, lam / mu)
        Z = D - L - S
        Y = Y + mu * Z
        mu = min(mu * rho, mu_bar)
        residual = torch.linalg.norm(Z).item() / norm_fro
        if residual < tol:
            break
    return RPCAResult(U, sigma, V, S, it, residual, residual < tol)


def sort_sparse(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonzeros of S ordered by |value| descending (ties by index), as (values, flat indices).

    Stage 2 keeps any prefix of this order, or any subset of it."""
    flat = S.reshape(-1)
    idx = torch.nonzero(flat, as_tuple=True)[0]
    vals = flat[idx]
    order = torch.sort(vals.abs(), descending=True, stable=True).indices
    return vals[order], idx[order].to(torch.int64)
