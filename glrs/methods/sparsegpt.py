"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023, arXiv 2301.00774).

Per target linear with input statistics H = X X^T (the paper's 2 X X^T differs
by a factor that the relative dampening cancels):
  1. dead inputs (H_jj = 0) get H_jj = 1 and their weights are zeroed;
  2. H += lambda I with lambda = percdamp * mean(diag H), percdamp = 0.01;
  3. U = upper Cholesky factor of H^-1 (row j of U carries the OBS
     information of column j after columns < j are eliminated);
  4. columns are processed in blocks of `blocksize` (128): at the start of
     each block the mask of the block is chosen by the saliency
     w^2 / U_jj^2 over all rows and the block's columns together (adaptive
     mask selection), then column by column the pruned weights are zeroed and
     the remaining weights of the block updated by the OBS formula; the
     block's accumulated errors update all later columns at once (lazy batch
     update).
  N:M: at every M-th column the N largest saliencies of the next M columns are
  kept in each row (masks chosen as the weights are updated, as in the paper).
Layer-sequential as in the reference code: each decoder layer's targets are
pruned with statistics of the hidden states produced by the already-pruned
layers before it, and the pruned layer's outputs feed the next layer.

Parameters: nm (null | "N:M"), blocksize (128), percdamp (0.01),
true_sequential (false: all seven targets from one pass, as the reference's
default; true: q/k/v, o, gate/up, down in turn, each with statistics after the
previous groups were pruned), dtype ("float32": precision of the weight
updates; H^-1 and its Cholesky factor are computed in float64), batch_size (4).

Departure from the reference code: the reference prunes every saliency <= the
int(numel*sparsity)-th smallest of a block (one entry more than asked, more on
ties); here exactly the right number is pruned per block, the blocks' counts
chosen by cumulative rounding so that each matrix keeps round(density*m*n).
"""
from __future__ import annotations

import torch

from .base import MethodOutput, finish, pruning_setup
from ..errors import GlrsError
from ..layers import TRUE_SEQUENTIAL_GROUPS, LayerStats, sequential_layers, target_modules
from ..masks import exact_count, split_count
from ..modelio import weight_name

DEFAULTS = {"nm": None, "blocksize": 128, "percdamp": 0.01, "true_sequential": False, "dtype": "float32",
            "batch_size": 4}


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U upper Cholesky factor of (H + damp I)^-1 in float64; dead: inputs never active."""
    H = H.to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diagonal(H))
    H.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise GlrsError(f"SparseGPT: the dampened Hessian is not positive definite (percdamp={percdamp}); "
                        "raise percdamp (e.g. 0.1) or use more calibration tokens")
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    return U, dead


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, density: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(W~, keep mask) for one matrix W [m, n] with input statistics H [n, n]."""
    m, n = W.shape
    if nm is not None and blocksize % nm[1]:
        raise GlrsError(f"SparseGPT: blocksize {blocksize} must be a multiple of M={nm[1]} for N:M sparsity")
    U64, dead = inverse_hessian_factor(H.to(W.device), percdamp)
    U = U64.to(dtype)
    Wc = W.detach().to(dtype).clone()
    Wc[:, dead] = 0
    pruned = torch.zeros(m, n, dtype=torch.bool, device=W.device)
    starts = list(range(0, n, blocksize))
    sizes = [min(blocksize, n - s) for s in starts]
    if nm is None:
        prune_counts = split_count(m * n - exact_count(density, m * n), [m * s for s in sizes])
    for b, (i1, count) in enumerate(zip(starts, sizes)):
        i2 = i1 + count
        W1 = Wc[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        mask1 = torch.zeros(m, count, dtype=torch.bool, device=W.device)  # True = pruned
        if nm is None and prune_counts[b] > 0:
            saliency = (W1 ** 2 / d1.unsqueeze(0) ** 2).reshape(-1)
            idx = torch.topk(saliency, prune_counts[b], largest=False, sorted=False).indices
            mask1.view(-1)[idx] = True
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                keep_n, group = nm
                sal = W1[:, i:i + group] ** 2 / d1[i:i + group].unsqueeze(0) ** 2
                low = torch.topk(sal, group - keep_n, dim=1, largest=False).indices
                mask1.scatter_(1, i + low, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Wc[:, i1:i2] = Q1
        Wc[:, i2:] -= Err1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    keep = ~pruned
    return (Wc * keep).to(W.dtype), keep


class SparseGPT:
    name = "sparsegpt"
    defaults = DEFAULTS
    version = 1  # bump when the algorithm changes: compressed outputs get new keys

    def compress(self, model, calib_ids: torch.Tensor, density: float, params: dict, seed: int,
                 device: str) -> MethodOutput:
        """Prunes `model`'s target matrices in place, layer by layer."""
        density, p, nm = pruning_setup(self.name, density, params, DEFAULTS)
        dtype = getattr(torch, p["dtype"])
        kept, per_matrix = {}, {}

        def compress_layer(i, layer, stats: dict[str, LayerStats]):
            mods = target_modules(layer)
            new = {}
            for short, st in stats.items():
                W = mods[short].weight.detach()
                new[short], keep = sparsegpt_prune(W, st.H, density, nm, int(p["blocksize"]), float(p["percdamp"]),
                                                   dtype)
                name = weight_name(i, short)
                kept[name] = int(keep.sum())
                per_matrix[name] = {"nnz": kept[name], "density": kept[name] / W.numel()}
            return new

        groups = TRUE_SEQUENTIAL_GROUPS if p["true_sequential"] else None
        sequential_layers(model, calib_ids, device, compress_layer, groups=groups, batch_size=int(p["batch_size"]))
        return finish(model, self.name, density, kept, {"params": p, "seed": seed, "matrices": per_matrix,
                                                         "calibration_tokens": int(calib_ids.numel())})


SPARSEGPT = SparseGPT()
