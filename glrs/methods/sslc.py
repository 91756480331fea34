"""SSLC: synergistic sparse + low-rank compression, solved by alternating minimisation.

Paper: Zeliang Zong, Kai Zhang, Zheyang Li, Wenming Tan, Ye Ren, Yiyan Zhai,
Jilin Hu, "1+1>2: A Synergistic Sparse and Low-Rank Compression Method for
Large Language Models" (arXiv 2510.26446; EMNLP 2025 Findings). No public
reference code was found. The stored copies of the paper readable here give
its abstract and summaries: the unified data-aware objective

    min_{L,S} || (W - L - S) X ||_F   s.t.  rank(L) = r,  sparsity(S) = k%

solved by an iterative algorithm alternating a sparsification step and a
low-rank step (randomised SVD), keeping the top 1% most important weights,
with the importance (salience) of a weight measured with its activations as
|W_ij| * ||X_j||_2; an optional fine-tuning of the low-rank factors afterwards
(not done here: the paper's main results are without training). Everything
not in that list below is our choice and says so.

Algorithm (per target matrix W, m x n, input statistics from the calibration
data; layers are compressed one after the other, each fed the outputs of the
already-compressed layers before it, as in the Wanda/SparseGPT code bases)
  D   = diag(||X_j||_2)            activation scaling of the input columns (ours: X X^T is represented by
                                    its diagonal, the metric of the paper's salience |W_ij| ||X_j||)
  Ws  = W D                        the objective becomes ||Ws - Ls - Ss||_F^2, Ls = L D, Ss = S D
  P   = the protect_frac * m n entries of largest |Ws| (the paper's top 1%): always in the support of S
  S_0 = Ws on the k entries of largest |Ws| (Wanda pruning), 0 elsewhere
  for t = 1..iters:
      L-step: Ls = best rank-r approximation of (Ws - Ss)   (randomised SVD, or exact)
      S-step: Ss = (Ws - Ls) on P and on the k - |P| other entries of largest |Ws - Ls|, 0 elsewhere
  W~  = (Ls + Ss) D^-1
Both steps minimise the objective exactly over their block (the S-step is the
exact projection onto "support of size k containing P"), so the objective
never increases. A randomised SVD is not an exact minimiser; an L-step that
would increase the objective is rejected (the previous L is kept), so the
trace stays monotone whatever the SVD.

Budget. Every target matrix keeps round(density * m * n) parameters (the
same density in every matrix, as the paper compresses each layer at the
stated ratio): rank r = floor(rank_ratio * budget / (m + n)) (at most
min(m, n)), costing r (m + n), and k = budget - r (m + n) sparse entries. The
per-matrix error is below one parameter, so the overall density is exact to
rounding.

Settings (params; defaults)
  rank_ratio     float  0.25        share of each matrix's budget spent on the low-rank factors (ours: the
                                    paper sets r and k per experiment; 0.25 is OATS' range for LLaMA-class
                                    models). 0 = sparse only, 1 = low rank only (+ the < m+n remainder sparse)
  iters          int    20          alternating iterations (ours: the paper's count was not readable)
  protect_frac   float  0.01        fraction of weights, by salience, that always stay in S (paper: top 1%)
  svd            str    "randomized" "randomized" (the paper's rSVD; Halko et al. range finder with a seeded
                                    generator) or "exact"
  oversample     int    8           extra columns of the randomised range finder
  power_iters    int    2           power iterations of the randomised range finder
  sequential     str    "compressed" statistics of layer i+1 from the compressed layer i ("compressed") or from
                                    the dense model ("dense")
  batch_size     int    4           calibration sequences per forward pass

Departures: the diagonal activation scaling (the paper writes X, its
algorithm's treatment of the off-diagonal of X X^T could not be read); the
rank/sparsity split and iteration count above are defaults of ours; no
fine-tuning; unstructured sparsity only (no N:M variant).
"""
from __future__ import annotations

import math
import time

import torch

from ..errors import GlrsError
from ..layers import sequential_layers, target_modules, target_shapes
from ..masks import exact_count
from ..modelio import weight_name
from .base import MethodOutput, assert_density, check_density, low_rank_factors

DEFAULTS = {
    "rank_ratio": 0.25,
    "iters": 20,
    "protect_frac": 0.01,
    "svd": "randomized",
    "oversample": 8,
    "power_iters": 2,
    "sequential": "compressed",
    "batch_size": 4,
}


def _params(params: dict | None) -> dict:
    p = dict(DEFAULTS)
    unknown = set(params or {}) - set(DEFAULTS)
    if unknown:
        raise GlrsError(f"sslc: unknown parameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p.update({k: v for k, v in (params or {}).items() if v is not None})
    if not 0.0 <= float(p["rank_ratio"]) <= 1.0:
        raise GlrsError("sslc: rank_ratio must be in [0, 1]")
    if int(p["iters"]) < 1:
        raise GlrsError("sslc: iters must be >= 1")
    if not 0.0 <= float(p["protect_frac"]) < 1.0:
        raise GlrsError("sslc: protect_frac must be in [0, 1)")
    if p["svd"] not in ("randomized", "exact"):
        raise GlrsError(f"sslc: svd must be 'randomized' or 'exact', not {p['svd']!r}")
    if p["sequential"] not in ("compressed", "dense"):
        raise GlrsError(f"sslc: sequential must be 'compressed' or 'dense', not {p['sequential']!r}")
    if int(p["oversample"]) < 0 or int(p["power_iters"]) < 0 or int(p["batch_size"]) < 1:
        raise GlrsError("sslc: oversample, power_iters >= 0 and batch_size >= 1 required")
    return p


def split_budget(m: int, n: int, density: float, rank_ratio: float) -> tuple[int, int]:
    """(rank, nnz) with r (m + n) + nnz = round(density m n)."""
    budget = exact_count(density, m * n)
    r = min(min(m, n), int(math.floor(rank_ratio * budget / (m + n))))
    return r, budget - r * (m + n)


def _rank_r(A: torch.Tensor, r: int, method: str, gen: torch.Generator | None, oversample: int,
            power_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [m, r], s [r], V [n, r] of a rank-r approximation of A."""
    m, n = A.shape
    q = r + oversample
    if method == "exact" or q >= min(m, n):
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :r], s[:r], Vh[:r].T
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32).to(A.device, A.dtype)
    Y = A @ omega
    Qm, _ = torch.linalg.qr(Y)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(A.T @ Qm)
        Qm, _ = torch.linalg.qr(A @ Z)
    B = Qm.T @ A
    Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Qm @ Ub)[:, :r], s[:r], Vh[:r].T


def _sparse_step(R: torch.Tensor, k: int, protect: torch.Tensor | None) -> torch.Tensor:
    """Boolean support: protected entries plus the k - |P| other entries of largest |R|."""
    score = R.abs()
    if protect is not None:
        score.masked_fill_(protect, float("inf"))
    flat = score.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=R.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(R.shape)


def _sq(x: torch.Tensor) -> float:
    return float((x * x).sum(dtype=torch.float64))


def decompose(W: torch.Tensor, col_norm: torch.Tensor, rank: int, nnz: int, *, iters: int = 20,
              protect_frac: float = 0.01, svd: str = "randomized", oversample: int = 8, power_iters: int = 2,
              generator: torch.Generator | None = None) -> dict:
    """SSLC alternating minimisation of ||(W - L - S) D||_F^2 for one matrix.

    Computes in float64 when W is float64, else in float32 (sums in float64).
    Returns U [m, r], s [r], V [n, r] (L = U diag(s) V^T in the original, unscaled
    coordinates), the sparse support mask and values of S, and `trace`: the
    objective after the initial sparse step and after every iteration.
    """
    m, n = W.shape
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(dtype)
    d = col_norm.to(W.device, dtype)
    floor = d.max().clamp_min(1e-30) * 1e-8
    d = torch.where(d > floor, d, floor)  # dead input columns: tiny weight, invertible scaling
    Ws = W * d
    rank = max(0, min(int(rank), m, n))
    nnz = max(0, min(int(nnz), m * n))
    p = min(nnz, int(round(protect_frac * m * n)))
    protect = _sparse_step(Ws, p, None) if p > 0 else None
    mask = _sparse_step(Ws, nnz, protect)
    Ss = Ws * mask
    Ls = torch.zeros_like(Ws)
    U = torch.zeros(m, 0, dtype=dtype, device=W.device)
    s = torch.zeros(0, dtype=dtype, device=W.device)
    V = torch.zeros(n, 0, dtype=dtype, device=W.device)
    cur = _sq(Ws.masked_fill(mask, 0))
    trace = [cur]
    rejected = 0
    if rank > 0:
        for _ in range(max(1, iters)):
            # L-step: best rank-r fit of Ws - Ss (kept only if it does not increase the objective)
            R = Ws - Ss
            Un, sn, Vn = _rank_r(R, rank, svd, generator, oversample, power_iters)
            Ln = (Un * sn) @ Vn.T
            if _sq(R - Ln) <= cur:
                Ls, U, s, V = Ln, Un, sn, Vn
            else:
                rejected += 1
            # S-step: exact projection of Ws - Ls onto supports of size k that contain P
            R = Ws - Ls
            mask = _sparse_step(R, nnz, protect)
            Ss = R * mask
            cur = _sq(R.masked_fill_(mask, 0))
            trace.append(cur)
    # back to the original coordinates: L = Ls D^-1, S = Ss D^-1
    V = V / d[:, None]
    S_vals = (Ss / d)[mask]
    return {"U": U, "s": s, "V": V, "mask": mask, "S_values": S_vals, "trace": trace,
            "objective_scale": _sq(Ws), "rejected_lsteps": rejected}


def compose(parts: dict, shape) -> torch.Tensor:
    W = (parts["U"] * parts["s"]) @ parts["V"].T
    W = W.clone()
    W[parts["mask"]] += parts["S_values"]
    return W


def activation_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - W_hat) X||_F^2 = tr(E H E^T), with H = X X^T."""
    E = (W.to(torch.float64) - W_hat.to(torch.float64)).to(H.device)
    return float(((E @ H.to(torch.float64)) * E).sum())


class SSLCMethod:
    name = "sslc"

    def compress(self, model, calib_ids: torch.Tensor, density: float, params: dict, seed: int,
                 device: str) -> MethodOutput:
        t0 = time.time()
        density = check_density(density)
        p = _params(params)
        shapes = target_shapes(model)
        gen = torch.Generator().manual_seed(int(seed))
        weights, params_kept, per_matrix, factors = {}, {}, {}, {}

        def compress_layer(i, layer, stats):
            mods = target_modules(layer)
            new = {}
            for short, st in stats.items():
                name = weight_name(i, short)
                W = mods[short].weight.detach()
                m, n = W.shape
                r, k = split_budget(m, n, density, float(p["rank_ratio"]))
                parts = decompose(W, st.col_norm, r, k, iters=int(p["iters"]), protect_frac=float(p["protect_frac"]),
                                  svd=p["svd"], oversample=int(p["oversample"]), power_iters=int(p["power_iters"]),
                                  generator=gen)
                W_hat = compose(parts, (m, n))
                base = activation_loss(W, torch.zeros_like(W), st.H)
                loss = activation_loss(W, W_hat, st.H)
                new[short] = W_hat.to(W.dtype)
                weights[name] = new[short].to("cpu")
                # boolean indexing reads the mask row-major, so S_values are already in ascending flat-index order
                factors[name] = low_rank_factors(parts["U"], parts["s"], parts["V"], W.dtype,
                                                 parts["mask"].reshape(-1).nonzero().squeeze(1), parts["S_values"])
                params_kept[name] = r * (m + n) + int(parts["mask"].sum())
                tr = parts["trace"]
                per_matrix[name] = {
                    "rank": r, "nnz": int(parts["mask"].sum()),
                    "objective_first": tr[0] / max(parts["objective_scale"], 1e-300),
                    "objective_last": tr[-1] / max(parts["objective_scale"], 1e-300),
                    "iterations": len(tr) - 1,
                    "rejected_lsteps": parts["rejected_lsteps"],
                    "activation_loss_rel": loss / base if base > 0 else 0.0,
                }
            return new

        sequential_layers(model, calib_ids, device, compress_layer, propagate=p["sequential"],
                          batch_size=int(p["batch_size"]))
        missing = set(shapes) - set(weights)
        if missing:
            raise GlrsError(f"sslc: no compressed weight for {sorted(missing)[:3]}...")
        weights = {name: weights[name] for name in shapes}
        params_kept = {name: params_kept[name] for name in shapes}
        achieved = assert_density(params_kept, shapes, density, self.name)
        details = {
            "method": "sslc",
            "paper": "arXiv 2510.26446",
            "params": p,
            "seed": int(seed),
            "per_matrix": per_matrix,
            "mean_activation_loss_rel": sum(v["activation_loss_rel"] for v in per_matrix.values()) / len(per_matrix),
            "target_density": density,
            "achieved_density": achieved,
            "seconds": time.time() - t0,
        }
        return MethodOutput(weights=weights, params_kept=params_kept, details=details,
                            factors={name: factors[name] for name in shapes})


SSLC = SSLCMethod()  # registry attribute: glrs.methods registers ("sslc", "SSLC")
