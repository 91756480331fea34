"""OATS: outlier-aware pruning through sparse and low-rank decomposition (Zhang & Papyan 2025, arXiv 2409.13652).

Per target matrix W (m x n) with input statistics X:
  D = diag(||X_j||_2)  (the square root of the inputs' second moment; any
      common factor such as 1/#tokens cancels);
  S = 0; repeat `iterations` (80) times:
      L <- best rank-r approximation of (W D - S)       (truncated SVD, computed
           as the projection on the top-r eigenvectors of the smaller Gram
           matrix in float64: the same matrix, several times faster)
      S <- hard threshold of (W D - L): keep the k largest |entries| in each
           output row (row-wise, as the reference code and Wanda)
  W~ = (L + S) D^-1, also returned factored (MethodOutput.factors: U, sigma,
  V of L D^-1 and the nonzeros of S D^-1).
The iteration is glrs.godec's loop with its exact rank step (best_rank_r), the
loop CAP's realisation runs with a subspace-iteration step.
Budget split by the rank ratio kappa (0.25, one of the paper's two settings
for Llama-3/Phi-3, the other 0.3): r = floor(kappa * density * m*n/(m+n)),
k = round(density*m*n) - r*(m+n) nonzeros, so each matrix keeps exactly
round(density*m*n) parameters. Layer-sequential as the reference code: each
decoder layer's targets are decomposed with statistics of the hidden states
produced by the already-compressed layers, from one pass per layer.

Parameters: rank_ratio (0.25), iterations (80), dtype ("float32": the
reference's precision; "float64" for exactness), batch_size (4), nm (null |
"N:M", e.g. "2:4").

N:M (`nm: "2:4"`): the S-step keeps the N largest |entries| of every M
consecutive inputs of each row of the scaled residual W D - L (the reference's
prune_n / prune_m branch of altern_ls, stephenqz/OATS OATS/prune_oats.py), so
S D^-1 is N:M sparse (D is diagonal over the inputs, so it keeps the pattern).
The sparse part takes exactly k = m*n*N/M entries and the rank the rest of the
density budget: r = floor((round(density*m*n) - k) / (m + n)); the leftover
(< m + n per matrix) is unspent and recorded (`leftover`), so the achieved
density is below the target by at most sum(m + n) / sum(m*n). density < N/M is
an error; rank_ratio is ignored. [departure] The reference fixes the rank
ratio kappa and derives the density: dense_alloc = (N/M) / (1 - kappa),
r = int(kappa * dense_alloc * m*n / (m + n)). Here the density is the setting
(to compare at the same kept parameters) and the rank follows from it; the
reference's split is the one at kappa = 1 - (N/M)/density, up to the rounding
of r.

Departures from the reference code:
  * exact budget: the reference prunes int(n * (1 - (1-kappa)*density))
    entries per row, so the floor of r is lost and rows round down; here the
    sparse part gets the whole remainder k = budget - r(m+n), spread over the
    rows as floor(k/m) or one more (the rows whose next-best |entry| is
    largest get one more; exactly per-row when k is a multiple of m);
  * inputs that are never active (||X_j|| = 0) would make D singular (the
    reference divides by zero); their scale is set to 1e-8 * mean(D), which
    drives those weights out of the low-rank and sparse parts (they do not
    affect the calibration outputs);
  * N:M: parametrised by the density instead of the rank ratio (above).
"""
from __future__ import annotations

import math

import torch

from .base import MethodOutput, check_density, finish, low_rank_factors, resolve_params
from ..errors import GlrsError
from ..godec import column_scale, exact_step, godec, unscaled_low_rank
from ..layers import LayerStats, sequential_layers, target_modules
from ..masks import exact_count, parse_nm
from ..modelio import weight_name

DEFAULTS = {"rank_ratio": 0.25, "iterations": 80, "dtype": "float32", "batch_size": 4}
# Added later: accepted, but left out of the effective (hashed, recorded) parameters while null, so the keys and
# records of unstructured OATS runs are those made before it existed (glrs.methods.effective_params).
OPTIONAL = {"nm": None}


def oats_budget(shape: tuple[int, int], density: float, rank_ratio: float) -> tuple[int, int]:
    """(rank r, nonzeros k) of one matrix at the given density and rank ratio."""
    m, n = shape
    total = exact_count(density, m * n)
    r = min(min(m, n), int(math.floor(rank_ratio * density * m * n / (m + n))))
    while r > 0 and r * (m + n) > total:
        r -= 1
    return r, total - r * (m + n)


def oats_budget_nm(shape: tuple[int, int], density: float, nm: tuple[int, int]) -> tuple[int, int, int]:
    """(rank r, nonzeros k, leftover) under N:M sparsity: k = m*n*N/M, r = floor((round(density*m*n) - k) / (m + n)),
    leftover = round(density*m*n) - k - r (m + n) < m + n (unspent)."""
    m, n = shape
    n_keep, group = nm
    if n % group:
        raise GlrsError(f"oats: N:M sparsity {n_keep}:{group} needs the input dimension to be a multiple of {group}; "
                        f"got a {m} x {n} matrix")
    if density < n_keep / group - 1e-12:
        raise GlrsError(f"oats: nm {n_keep}:{group} keeps {n_keep}/{group} = {n_keep / group:g} of every matrix in its "
                        f"sparse part alone, but the target density is {density:g}; {n_keep}:{group} needs density "
                        f">= {n_keep / group:g}")
    k = m * n * n_keep // group
    total = max(exact_count(density, m * n), k)
    r = min(min(m, n), (total - k) // (m + n))
    return r, k, total - k - r * (m + n)


def oats_decompose(W: torch.Tensor, col_norm: torch.Tensor, rank: int, nnz: int, iterations: int,
                   dtype=torch.float32, track: bool = False, nm: tuple[int, int] | None = None):
    """(W~, keep mask of the sparse part, history, factors): GoDec (glrs.godec, the exact rank step) on W D.

    nm: (N, M): the S-step keeps the N:M mask of |W D - L| (nm_mask) instead of the row top-k (`nnz` ignored).

    history: ||W D - L - S||_F / ||W D||_F after each iteration (only when `track`); factors: the
    unscaled decomposition W~ = U diag(sigma) V^T + S in MethodOutput.factors layout (float64).
    """
    if iterations < 1:
        raise GlrsError(f"OATS: iterations must be >= 1, got {iterations}")
    m, n = W.shape
    d = column_scale(col_norm.to(W.device, torch.float64)).to(dtype)
    Wd = W.detach().to(dtype) * d.unsqueeze(0)
    history = []
    norm = torch.linalg.norm(Wd)

    def record(L, mask):
        R = Wd - L
        history.append(float(torch.linalg.norm(R - R * mask) / norm))

    P, B, mask = godec(Wd, rank, nnz, iterations, step=exact_step, nm=nm, on_iteration=record if track else None)
    L = (P @ B).to(dtype)
    S = (Wd - L) * mask
    f = unscaled_low_rank(P, B, d.to(torch.float64))
    index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    values = (S / d.unsqueeze(0)).reshape(-1)[index].to(torch.float64)
    factors = f | {"S_index": index, "S_values": values}
    out = (L + S) / d.unsqueeze(0)
    return out.to(W.dtype), mask, history, factors


class OATSMethod:
    name = "oats"
    defaults = DEFAULTS
    optional = OPTIONAL
    version = 2  # bump when the algorithm changes: compressed outputs get new keys
    # 2: GoDec from glrs.godec, whose next rank-step input is where(mask, L, W D) instead of W D - (W D - L) * mask:
    # the same masks, float32 weights differing by rounding (<= 1.5e-8 on tests' tiny Llama), so new bytes

    def compress(self, model, calib_ids: torch.Tensor, density: float, params: dict, seed: int,
                 device: str) -> MethodOutput:
        """Replaces `model`'s target matrices in place by L + S, layer by layer."""
        density = check_density(density)
        p = resolve_params(self.name, params, DEFAULTS | OPTIONAL)
        nm = parse_nm(p["nm"])
        if nm is None:
            del p["nm"]  # recorded as before the setting existed
        kappa = float(p["rank_ratio"])
        if not 0.0 <= kappa <= 1.0:
            raise GlrsError(f"oats: rank_ratio must be in [0, 1], got {kappa}")
        dtype = getattr(torch, p["dtype"])
        if nm is not None and density < nm[0] / nm[1] - 1e-12:
            raise GlrsError(f"oats: nm {p['nm']} keeps {nm[0]}/{nm[1]} of every matrix in its sparse part alone; "
                            f"target density {density:g} is below it: {p['nm']} needs density >= {nm[0] / nm[1]:g}")
        kept, per_matrix, factors, unspent = {}, {}, {}, {}

        def compress_layer(i, layer, stats: dict[str, LayerStats]):
            mods = target_modules(layer)
            new = {}
            for short, st in stats.items():
                W = mods[short].weight.detach()
                name = weight_name(i, short)
                if nm is None:
                    r, k = oats_budget(tuple(W.shape), density, kappa)
                else:
                    r, k, unspent[name] = oats_budget_nm(tuple(W.shape), density, nm)
                new[short], mask, _, f = oats_decompose(W, st.col_norm, r, k, int(p["iterations"]), dtype, nm=nm)
                m, n = W.shape
                factors[name] = low_rank_factors(f["U"], f["sigma"], f["V"], W.dtype, f["S_index"], f["S_values"])
                kept[name] = r * (m + n) + int(mask.sum())
                per_matrix[name] = {"rank": r, "nnz": int(mask.sum()), "rank_ratio": r / min(m, n),
                                    "density": kept[name] / (m * n)}
                if nm is not None:
                    per_matrix[name]["leftover"] = unspent[name]
            return new

        sequential_layers(model, calib_ids, device, compress_layer, batch_size=int(p["batch_size"]), moments="diag")
        details = {"params": p, "seed": seed, "matrices": per_matrix, "calibration_tokens": int(calib_ids.numel())}
        if nm is not None:
            details["unspent"] = int(sum(unspent.values()))
        return finish(model, self.name, density, kept, details, factors, unspent=sum(unspent.values()))


OATS = OATSMethod()
