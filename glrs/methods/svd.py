"""Pure low-rank baselines: plain truncated SVD, ASVD and SVD-LLM.

All three replace each target matrix W (m x n) by a rank-r factorisation
A B (A: m x r, B: r x n), which keeps r*(m+n) parameters. Ranks are uniform in
density: r = density*m*n/(m+n), the paper's "param ratio" rule, rounded as
`glrs.methods.base.allocate_ranks` does (floor for every matrix, then +1 rank
for the subset of matrices that brings the overall count closest to the
budget), so the overall density is within one rank unit of the target; for
real models that is far below 0.01 percentage points. The dense export is the
product A B; the factors are also returned (MethodOutput.factors, sigma
descending, V [n, r] holding the unscaled/unwhitened right factor).

svd      Eckart-Young: the r largest singular triplets of W. No calibration.
asvd     ASVD (Yuan et al. 2023, arXiv 2312.05821): scale the input columns by
         S = diag(mean|x_j|^alpha) (alpha = 0.5, the paper's choice; +1e-6 so
         no column is divided by zero, as the reference code), truncate the
         SVD of W S, then unscale: W~ = U_r Sigma_r V_r^T S^-1.
         Departures: uniform ranks instead of ASVD's sensitivity-based
         per-layer truncation search (a perplexity-driven binary search over
         candidate ratios); exact SVD instead of the reference's randomised
         torch.svd_lowrank.
svdllm   SVD-LLM (Wang et al. 2024, arXiv 2403.07378), truncation-aware data
         whitening: C = Cholesky factor of X X^T (C C^T = X X^T), truncate the
         SVD of W C, W~ = U_r Sigma_r (V_r^T C^-1). Then
         ||(W - W~) X||_F^2 equals the sum of the discarded sigma_i^2 of W C.
         If X X^T is not positive definite (too few tokens, dead inputs) it is
         shifted by (-lambda_min + eps) I with eps = 1e-6 * mean(diag), the
         reference code's fix made scale-free (the reference adds an absolute
         1e-6). C^-1 is applied by a triangular solve, not an explicit inverse.
         Departure: SVD-LLM's optional second stage (LoRA-style parameter
         update of the factors) is not run.

ASVD and SVD-LLM collect their statistics from the dense model (as both
reference implementations do), layer by layer with one layer's activations in
memory (`sequential_layers(..., propagate="dense")`); params
`calibration: sequential` feeds each layer the compressed model's hidden
states instead. All SVDs run in `dtype` (float64 by default: exact truncation
losses; float32 halves the time on a GPU).
"""
from __future__ import annotations

import torch

from .base import MethodOutput, allocate_ranks, check_density, finish, low_rank_factors, resolve_params
from ..errors import GlrsError
from ..layers import LayerStats, decoder_layers, sequential_layers, target_modules, target_shapes
from ..modelio import weight_name


def svd_factors(W: torch.Tensor, rank: int, dtype=torch.float64):
    """(U [m, r], sigma [r], V [n, r]): the `rank` largest singular triplets of W."""
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank].T


def asvd_factors(W: torch.Tensor, abs_mean: torch.Tensor, rank: int, alpha: float = 0.5, dtype=torch.float64):
    """(U, sigma, V) with U diag(sigma) V^T = truncated SVD of W S, times S^-1; S = diag(abs_mean^alpha + 1e-6)."""
    s = abs_mean.to(W.device, dtype).clamp_min(0) ** alpha + 1e-6
    U, S, V = svd_factors(W.to(dtype) * s.unsqueeze(0), rank, dtype)
    return U, S, V / s.unsqueeze(1)


def whitening_factor(H: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(C, shift): lower Cholesky factor of H (+ shift I when H is not positive definite), float64."""
    H = H.to(torch.float64)
    C, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        return C, 0.0
    lam_min = torch.linalg.eigvalsh(H)[0].item()
    shift = -lam_min + 1e-6 * max(torch.diagonal(H).mean().item(), 1e-30)
    Hs = H.clone()
    Hs.diagonal().add_(shift)
    C, info = torch.linalg.cholesky_ex(Hs)
    if info.item() != 0:
        raise GlrsError("SVD-LLM: X X^T stays indefinite after the eigenvalue shift; the calibration statistics are "
                        "not finite — check the model and calibration data")
    return C, shift


def svdllm_factors(W: torch.Tensor, H: torch.Tensor, rank: int, dtype=torch.float64):
    """((U, sigma, V), info): U diag(sigma) V^T = U_r Sigma_r V_r^T C^-1 and
    info = {truncation_loss: sum of the discarded sigma^2 of W C, shift}."""
    C, shift = whitening_factor(H.to(W.device))
    C = C.to(dtype)
    U, S, Vh = torch.linalg.svd(W.to(dtype) @ C, full_matrices=False)
    # (V_r^T C^-1)^T = C^-T V_r: solve C^T Y = V_r with C^T upper triangular
    Y = torch.linalg.solve_triangular(C.T, Vh[:rank].T, upper=True)
    loss = float((S[rank:].double() ** 2).sum())
    return (U[:, :rank], S[:rank], Y), {"truncation_loss": loss, "shift": shift}


def compose_low_rank(U, sigma, V, dtype) -> torch.Tensor:
    return ((U * sigma) @ V.T).to(dtype)


def svd_approx(W: torch.Tensor, rank: int, dtype=torch.float64) -> torch.Tensor:
    return compose_low_rank(*svd_factors(W, rank, dtype), W.dtype)


def asvd_approx(W: torch.Tensor, abs_mean: torch.Tensor, rank: int, alpha: float = 0.5,
                dtype=torch.float64) -> torch.Tensor:
    return compose_low_rank(*asvd_factors(W, abs_mean, rank, alpha, dtype), W.dtype)


def svdllm_approx(W: torch.Tensor, H: torch.Tensor, rank: int, dtype=torch.float64) -> tuple[torch.Tensor, dict]:
    """W~ = U_r Sigma_r V_r^T C^-1 and {truncation_loss, shift}."""
    factors, info = svdllm_factors(W, H, rank, dtype)
    return compose_low_rank(*factors, W.dtype), info


class _LowRank:
    name = ""
    needs_calibration = False
    defaults: dict = {}
    version = 1  # bump when the algorithm changes: compressed outputs get new keys

    def compress(self, model, calib_ids: torch.Tensor | None, density: float, params: dict, seed: int,
                 device: str) -> MethodOutput:
        """Replaces `model`'s target matrices in place by their rank-r approximations; the output also
        carries the factors (U, sigma, V)."""
        density = check_density(density)
        p = resolve_params(self.name, params, self.defaults)
        dtype = getattr(torch, p["dtype"])
        shapes = target_shapes(model)
        ranks = allocate_ranks(shapes, density)
        kept = {name: ranks[name] * (m + n) for name, (m, n) in shapes.items()}
        per_matrix = {name: {"rank": ranks[name], "rank_ratio": ranks[name] / min(shapes[name]),
                             "density": kept[name] / (shapes[name][0] * shapes[name][1])} for name in shapes}
        factors: dict[str, dict[str, torch.Tensor]] = {}

        def approx(name, W, stats):
            U, sigma, V = self.factors(W, stats, ranks[name], p, dtype, per_matrix[name])
            factors[name] = low_rank_factors(U, sigma, V, W.dtype)
            return compose_low_rank(U, sigma, V, W.dtype)

        if not self.needs_calibration:
            for i, layer in enumerate(decoder_layers(model)):
                for short, mod in target_modules(layer).items():
                    name = weight_name(i, short)
                    new = approx(name, mod.weight.detach().to(device), None)
                    with torch.no_grad():
                        mod.weight.copy_(new.to(mod.weight.device))
        else:
            if p["calibration"] not in ("dense", "sequential"):
                raise GlrsError(f"{self.name}: calibration must be 'dense' or 'sequential', not {p['calibration']!r}")

            def compress_layer(i, layer, stats: dict[str, LayerStats]):
                mods = target_modules(layer)
                return {short: approx(weight_name(i, short), mods[short].weight.detach(), st)
                        for short, st in stats.items()}

            propagate = "dense" if p["calibration"] == "dense" else "compressed"
            sequential_layers(model, calib_ids, device, compress_layer, propagate=propagate,
                              batch_size=int(p["batch_size"]))
        details = {"params": p, "seed": seed, "matrices": per_matrix}
        if self.needs_calibration:
            details["calibration_tokens"] = int(calib_ids.numel())
        return finish(model, self.name, density, kept, details, factors)

    def factors(self, W, stats, rank, p, dtype, info):
        raise NotImplementedError


class PlainSVD(_LowRank):
    name = "svd"
    defaults = {"dtype": "float64"}

    def factors(self, W, stats, rank, p, dtype, info):
        return svd_factors(W, rank, dtype)


class ActivationAwareSVD(_LowRank):
    name = "asvd"
    needs_calibration = True
    defaults = {"alpha": 0.5, "calibration": "dense", "dtype": "float64", "batch_size": 4}

    def factors(self, W, stats, rank, p, dtype, info):
        return asvd_factors(W, stats.abs_mean, rank, float(p["alpha"]), dtype)


class WhitenedSVD(_LowRank):
    name = "svdllm"
    needs_calibration = True
    defaults = {"calibration": "dense", "dtype": "float64", "batch_size": 4}

    def factors(self, W, stats, rank, p, dtype, info):
        factors, extra = svdllm_factors(W, stats.H, rank, dtype)
        info.update(extra)
        return factors


SVD = PlainSVD()
ASVD = ActivationAwareSVD()
SVDLLM = WhitenedSVD()
