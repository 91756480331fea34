"""Stage 1: Robust PCA, W = L + S, by the inexact augmented Lagrange multiplier method.

Solves  min ||L||_* + lam ||S||_1  s.t.  W = L + S  (Lin, Chen & Ma 2010, Alg. 5),
with lam = 1/sqrt(max(m, n)), mu_0 = 1.25/||W||_2, rho = 1.5 and the stopping
rule ||W - L - S||_F / ||W||_F < tol (docs/design.md section 5).

The cost of every iteration is a singular value threshold (SVT). A full SVD is
wasteful there; two faster SVTs, both computed in float64 whatever `dtype` the
iterates are kept in:

- `svt` ("gram"): diagonalise the small Gram matrix A A^T (A the orientation of
  the iterate with fewer rows) and recover the right vectors by one matrix
  product: two GEMMs and one eigh of the short side.
- `SubspaceSVT` ("subspace"): only the singular triplets above the threshold are
  needed, and they are usually few. Block subspace iteration on A A^T with a
  Rayleigh-Ritz step, warm-started from the previous ALM iteration's singular
  vectors (consecutive iterates differ little), with a rank guess that grows when
  too few computed values fall below the threshold (Lin et al.'s predicted rank).
  Each step costs two tall-skinny GEMMs, a thin QR and a k x k eigh. It returns
  only when every kept triplet's residual ||A v - s u|| is below 1e-11 ||A||_2
  (or float64's floor through A A^T, ~eps ||A||_2^2 / s, where that is larger)
  and a margin of computed values lies below the threshold, so it is as exact
  as the Gram route; if that does not happen within `max_steps`, that iteration
  falls back to the Gram route (and, the second time, all later ones). On a
  GPU this turns each iteration from a factorisation of the whole matrix into
  a few GEMMs.

Thread count: a BLAS product or a torch reduction sums its partial results in an
order that depends on how many threads share it, so the same solve with 1, 2 or 4
threads differs in the last bits (relative 1e-12 on a 576 x 1536 matrix, enough to
change the stored float32 factors' bytes). `rpca` therefore runs its CPU math under a fixed thread count
(`threads=glrs.conditions.SOLVER_THREADS`, 1) whatever torch was set to, and
restores the caller's setting afterwards: the bytes depend on the inputs, the
parameters and the platform (glrs.conditions), not on the job's share of the
machine. Per-layer jobs run in parallel instead. `threads=None` leaves torch's
setting alone (benchmarks).

`rpca(..., svt_method="auto")` uses the subspace SVT for matrices whose short side
is at least `SUBSPACE_MIN_DIM` and switches to the Gram route for good once the
rank guess exceeds `SUBSPACE_MAX_FRACTION` of the short side (then one eigh is
cheaper than the block steps). `rpca(..., full_svd=True)` is the textbook
version with a full SVD per iteration, in `dtype`; tests and benchmarks compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .conditions import SOLVER_THREADS, pinned_threads

RPCA_VERSION = 3  # 2: subspace SVT for large matrices, spectral norm by block iteration;
# 3: the solver runs under a fixed CPU thread count and each file records its conditions (glrs.conditions)

# The Stage-1 settings a config's `rpca` section overrides (config/schema.yaml names the same keys;
# tests/unit/test_config.py holds them equal); they apply under `stage1: rpca` only.
DEFAULTS = {"lambda_scale": 1.0, "tol": 1e-7, "max_iter": 500, "rho": 1.5, "mu_factor": 1.25,
            "dtype": "float64"}
SUBSPACE_MIN_DIM = 1024  # "auto" uses the subspace SVT when min(m, n) >= this
SUBSPACE_MAX_FRACTION = 0.3  # ... and gives up on it once the block exceeds this share of min(m, n)
SVT_METHODS = ("auto", "gram", "subspace")


@dataclass
class RPCAResult:
    U: torch.Tensor  # [m, r]
    sigma: torch.Tensor  # [r], descending
    V: torch.Tensor  # [n, r]; L = U diag(sigma) V^T
    S: torch.Tensor  # [m, n] sparse part, dense storage
    iterations: int
    residual: float  # ||W - L - S||_F / ||W||_F
    converged: bool
    stats: dict = field(default_factory=dict)  # how the SVTs were computed (not part of the result proper)

    @property
    def L(self) -> torch.Tensor:
        return (self.U * self.sigma) @ self.V.T


def no_split(W: torch.Tensor) -> RPCAResult:
    """The trivial split L = 0, S = W (`stage1: weights`): Stage 2 then allocates over the weights
    themselves, and CAP's realisation (glrs.realise) builds the low-rank + sparse form afterwards.
    The pipeline stores no file of it: its consumers make it in memory from the weights (glrs.stage1)."""
    m, n = W.shape
    return RPCAResult(W.new_zeros(m, 0), W.new_zeros(0), W.new_zeros(n, 0), W.clone(), 0, 0.0, True)


def default_lambda(shape: tuple[int, int]) -> float:
    return 1.0 / math.sqrt(max(shape))


def svt(M: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular value threshold through the Gram matrix of the short side.

    Returns (U, sigma - tau, V) for the singular values above tau only."""
    U, s, V, _ = _svt_gram(M, tau)
    return U, s, V


def _svt_gram(M: torch.Tensor, tau: float, extra: int = 0):
    """Gram-route SVT; also returns the short-side eigenvectors of the top kept+extra values (a warm start)."""
    m, n = M.shape
    wide = m <= n
    A = M if wide else M.T  # a x b with a <= b
    A64 = A.to(torch.float64)
    evals, evecs = torch.linalg.eigh(A64 @ A64.T)  # ascending
    s = evals.clamp_min(0).sqrt()
    keep = s > tau
    r = int(keep.sum())
    s_k = s[keep].flip(0)
    left = evecs[:, keep].flip(1)
    right = (A64.T @ left) / s_k  # b x r; orthonormal to float64 rounding
    shrunk = (s_k - tau).to(M.dtype)
    basis = evecs[:, evecs.shape[1] - min(r + extra, evecs.shape[1]):].flip(1) if extra else None
    left, right = left.to(M.dtype), right.to(M.dtype)
    return ((left, shrunk, right) if wide else (right, shrunk, left)) + (basis,)


def _svt_full(M: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = s > tau
    return U[:, keep], s[keep] - tau, Vh[keep].T


def _randn(rows: int, cols: int, seed: int, device) -> torch.Tensor:
    """Gaussian columns drawn on the CPU from a fixed seed: the same start on every device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64).to(device)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


class SubspaceSVT:
    """SVT from a warm-started block subspace iteration (see the module docstring).

    One instance follows one ALM solve: it keeps the basis of the last call as
    the start of the next. `stats` counts steps, growths and Gram fallbacks."""

    def __init__(self, shape: tuple[int, int], device, k0: int = 16, oversample: int | None = None,
                 grow: int | None = None, rel_tol: float = 1e-11, max_steps: int = 25,
                 max_fraction: float = SUBSPACE_MAX_FRACTION, seed: int = 0):
        self.a = min(shape)
        self.device = device
        self.p = oversample if oversample is not None else max(8, math.ceil(0.02 * self.a))
        self.grow = grow if grow is not None else max(self.p, math.ceil(0.05 * self.a))
        self.k0 = min(self.a, max(k0, self.p + 1))
        self.rel_tol = rel_tol
        self.floor = 8 * torch.finfo(torch.float64).eps
        self.max_steps = max_steps
        self.max_k = max(self.k0, int(max_fraction * self.a))
        self.seed = seed
        self.Q: torch.Tensor | None = None
        self.use_gram = False
        self.stats = {"calls": 0, "steps": 0, "grows": 0, "fallbacks": 0, "gram_calls": 0, "max_k": 0}

    def _extend(self, Q: torch.Tensor, k_new: int) -> torch.Tensor:
        self.seed += 1
        extra = _randn(self.a, k_new - Q.shape[1], self.seed, self.device)
        return _orth(torch.cat([Q, extra], dim=1))

    def __call__(self, M: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.stats["calls"] += 1
        if self.use_gram:
            return self._gram(M, tau)
        m, n = M.shape
        wide = m <= n
        A = (M if wide else M.T).to(torch.float64)  # a x b, a <= b
        Q = self.Q if self.Q is not None else _orth(_randn(self.a, self.k0, self.seed, self.device))
        top = None
        for _ in range(self.max_steps):
            self.stats["steps"] += 1
            k = Q.shape[1]
            self.stats["max_k"] = max(self.stats["max_k"], k)
            Bt = A.T @ Q  # b x k
            lam, W = torch.linalg.eigh(Bt.T @ Bt)  # Ritz values of A A^T on span(Q), ascending
            lam, W = lam.flip(0).clamp_min(0), W.flip(1)
            s = lam.sqrt()
            BW = Bt @ W  # = A^T U for the Ritz vectors U = Q W
            Y = A @ BW  # = A A^T U: the residual check and the next power step at once
            U = Q @ W
            top = max(float(s[0]), top or 0.0)
            kept = int((s > tau).sum())
            check = max(kept, 1)  # the kept triplets (the top one when none is kept)
            # ||A A^T u - s^2 u|| / s = ||A v - s u|| for v = A^T u / s
            sc = s[:check].clamp_min(1e-300 + top * 1e-150)
            res = torch.linalg.vector_norm(Y[:, :check] - U[:, :check] * lam[:check], dim=0) / sc
            # Through A A^T a residual cannot get below ~eps * s_1^2 / s_i (the Gram route's own error):
            # ask for rel_tol * s_1 or that floor, whichever is larger.
            floor = self.floor * math.sqrt(A.shape[1]) * top * top / sc
            converged = bool((res <= self.rel_tol * top + floor).all())
            room = kept <= k - self.p or k == self.a
            if converged and room:
                self.Q = U
                V = BW[:, :kept] / s[:kept]
                left, right = U[:, :kept].to(M.dtype), V.to(M.dtype)
                shrunk = (s[:kept] - tau).to(M.dtype)
                return (left, shrunk, right) if wide else (right, shrunk, left)
            if not room:
                k_new = min(self.a, kept + self.grow)
                if k_new > self.max_k:
                    self.use_gram = True
                    return self._gram(M, tau)
                self.stats["grows"] += 1
                Q = self._extend(_orth(Y), k_new)
            else:
                Q = _orth(Y)
        # Not converged within max_steps: this iteration exactly, and after a second time
        # for good (the spectrum has no gap to exploit, so the steps are wasted).
        self.stats["fallbacks"] += 1
        self.use_gram = self.stats["fallbacks"] >= 2
        return self._gram(M, tau)

    def _gram(self, M: torch.Tensor, tau: float):
        self.stats["gram_calls"] += 1
        U, s, V, basis = _svt_gram(M, tau, extra=self.p)
        if not self.use_gram:
            kept = s.numel()
            k = min(self.a, max(basis.shape[1], kept + self.p))
            self.Q = basis if basis.shape[1] >= k else self._extend(basis, k)
        return U, s, V


def _shrink(X: torch.Tensor, thr: float) -> torch.Tensor:
    return torch.sign(X) * (X.abs() - thr).clamp_min(0)


def _spectral_norm(W: torch.Tensor) -> float:
    A = W.to(torch.float64)
    A = A if A.shape[0] <= A.shape[1] else A.T
    return float(torch.linalg.eigvalsh(A @ A.T)[-1].clamp_min(0).sqrt())


def _spectral_norm_iterative(W: torch.Tensor, rel_tol: float = 1e-13, block: int = 8, max_steps: int = 300) -> float:
    """||W||_2 by block subspace iteration with Rayleigh-Ritz, in float64; exact eigvalsh if it stalls."""
    A = W.to(torch.float64)
    A = A if A.shape[0] <= A.shape[1] else A.T
    block = min(block, A.shape[0])
    Q = _orth(_randn(A.shape[0], block, 12345, A.device))
    for _ in range(max_steps):
        Bt = A.T @ Q
        lam, Wr = torch.linalg.eigh(Bt.T @ Bt)
        u, l1 = Q @ Wr[:, -1], lam[-1].clamp_min(0)
        y = A @ (Bt @ Wr[:, -1])  # A A^T u
        s1 = float(l1.sqrt())
        if s1 == 0:
            return 0.0
        if float(torch.linalg.vector_norm(y - l1 * u)) / s1 <= rel_tol * s1:
            return s1
        Q = _orth(A @ (Bt @ Wr))
    return _spectral_norm(W)


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
    svt_method: str = "auto",
    callback: Callable[[int, float], bool | None] | None = None,
    threads: int | None = SOLVER_THREADS,
) -> RPCAResult:
    """Inexact ALM RPCA of one matrix; `full_svd=True` gives the textbook reference.

    `svt_method` ("auto", "gram", "subspace") picks the fast SVT (module
    docstring). `callback(iteration, residual)`, if given, is called after every
    iteration; returning True stops the solve there (benchmarks use it for a time
    budget). `threads`: CPU threads of the solve (module docstring); the
    caller's torch setting is restored afterwards. None: torch's current setting."""
    with pinned_threads(threads) as used:
        res = _rpca(W, lam, tol, max_iter, rho, mu_factor, dtype, device, full_svd, svt_method, callback)
    res.stats["threads"] = used
    return res


def _rpca(W, lam, tol, max_iter, rho, mu_factor, dtype, device, full_svd, svt_method, callback) -> RPCAResult:
    if svt_method not in SVT_METHODS:
        raise ValueError(f"svt_method must be one of {SVT_METHODS}, not {svt_method!r}")
    D = W.to(device=device, dtype=dtype)
    lam = default_lambda(D.shape) if lam is None else lam
    stats: dict = {"svt": "full" if full_svd else svt_method}
    if full_svd:
        threshold = _svt_full
    elif svt_method == "subspace" or (svt_method == "auto" and min(D.shape) >= SUBSPACE_MIN_DIM):
        threshold = SubspaceSVT(tuple(D.shape), D.device)
        stats["svt"] = "subspace"
    else:
        threshold = svt
        stats["svt"] = "gram"
    norm_fro = torch.linalg.norm(D).item()
    if norm_fro == 0:
        raise ValueError("cannot decompose an all-zero matrix")
    if full_svd:
        norm_two = float(torch.linalg.matrix_norm(D, ord=2))  # the textbook's norm(D, 2): one more SVD
    elif stats["svt"] == "subspace":
        norm_two = _spectral_norm_iterative(D)
    else:
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
        stop = callback is not None and callback(it, residual)
        if residual < tol or stop:
            break
    if isinstance(threshold, SubspaceSVT):
        stats |= threshold.stats | {"switched_to_gram": threshold.use_gram}
    return RPCAResult(U, sigma, V, S, it, residual, residual < tol, stats)


def sort_sparse(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonzeros of S ordered by |value| descending (ties by index), as (values, flat indices).

    Stage 2 keeps any prefix of this order, or any subset of it."""
    flat = S.reshape(-1)
    idx = torch.nonzero(flat, as_tuple=True)[0]
    vals = flat[idx]
    order = torch.sort(vals.abs(), descending=True, stable=True).indices
    return vals[order], idx[order].to(torch.int64)
