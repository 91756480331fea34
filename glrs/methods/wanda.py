"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, arXiv 2306.11695).

Score S_ij = |W_ij| * ||X_j||_2, where X_j is the j-th input feature over all
calibration tokens; within each output row (the paper's per-output comparison
group) the lowest scores are pruned. No weight update. Layer-sequential as in
the reference code (locuslab/wanda, `prune_wanda`): each decoder layer's seven
targets are pruned with statistics from one pass over the current hidden
states, then the pruned layer's outputs feed the next layer.

Parameters:
  nm: null | "N:M"   N:M semi-structured: within every group of M consecutive
                     inputs of each row keep the N highest scores; the target
                     density must be N/M (2:4 -> 0.5).

Departures:
  * Exact budget: the paper prunes int(n*sparsity) entries per row. When density*n is not an integer (only for tiny
    matrices or odd densities) that misses the target; here each row keeps
    floor(k/m) or floor(k/m)+1 entries with k = round(density*m*n) per matrix,
    and the rows that keep one more are those whose next-best score is
    highest. When density*n is an integer this is exactly the paper's mask.
  * The Wanda "variant" (per-row threshold search, use_variant) is not offered.
"""
from __future__ import annotations

import torch

from .base import MethodOutput, finish, pruning_setup
from ..layers import LayerStats, sequential_layers, target_modules
from ..masks import exact_count, nm_mask, row_topk_mask
from ..modelio import weight_name

DEFAULTS = {"nm": None, "batch_size": 4}


def wanda_scores(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 in float64."""
    return W.abs().double() * stats.col_norm.to(W.device).unsqueeze(0)


def wanda_mask(W: torch.Tensor, stats: LayerStats, density: float, nm: tuple[int, int] | None) -> torch.Tensor:
    scores = wanda_scores(W, stats)
    if nm is not None:
        return nm_mask(scores, nm)
    return row_topk_mask(scores, exact_count(density, W.numel()))


class Wanda:
    name = "wanda"
    defaults = DEFAULTS
    version = 1  # bump when the algorithm changes: compressed outputs get new keys

    def compress(self, model, calib_ids: torch.Tensor, density: float, params: dict, seed: int,
                 device: str) -> MethodOutput:
        """Prunes `model`'s target matrices in place, layer by layer."""
        density, p, nm = pruning_setup(self.name, density, params, DEFAULTS)
        kept, per_matrix = {}, {}

        def compress_layer(i, layer, stats):
            mods = target_modules(layer)
            new = {}
            for short, st in stats.items():
                W = mods[short].weight.detach()
                mask = wanda_mask(W, st, density, nm)
                new[short] = W * mask
                name = weight_name(i, short)
                kept[name] = int(mask.sum())
                per_matrix[name] = {"nnz": kept[name], "density": kept[name] / W.numel()}
            return new

        sequential_layers(model, calib_ids, device, compress_layer, batch_size=int(p["batch_size"]), moments="diag")
        return finish(model, self.name, density, kept, {"params": p, "seed": seed, "matrices": per_matrix,
                                                         "calibration_tokens": int(calib_ids.numel())})


WANDA = Wanda()
