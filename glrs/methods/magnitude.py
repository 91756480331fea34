"""Magnitude pruning: keep the largest |W_ij| of each target matrix.

The classic baseline (as run in the Wanda paper, Sun et al. 2023, arXiv
2306.11695, Table 2 "Magnitude": layer-wise, i.e. each matrix compared
within itself). No calibration data, no weight update.

Parameters:
  nm: null | "N:M"   keep the N largest of every M consecutive inputs of each row
                     (target density must then be N/M).

Departure from the reference code: the reference thresholds at the
int(numel*sparsity)-th smallest value and prunes everything <= it (one entry
more than asked, more on ties); here exactly round(density*m*n) entries are
kept per matrix (ties broken by index).
"""
from __future__ import annotations

import torch

from .base import MethodOutput, finish, pruning_setup
from ..layers import decoder_layers, target_modules
from ..masks import exact_count, nm_mask, topk_mask
from ..modelio import weight_name

DEFAULTS = {"nm": None}


class Magnitude:
    name = "magnitude"
    defaults = DEFAULTS
    version = 1  # bump when the algorithm changes: compressed outputs get new keys

    def compress(self, model, calib_ids: torch.Tensor | None, density: float, params: dict, seed: int,
                 device: str) -> MethodOutput:
        """Prunes `model`'s target matrices in place; `calib_ids` is unused."""
        density, p, nm = pruning_setup(self.name, density, params, DEFAULTS)
        kept, per_matrix = {}, {}
        for i, layer in enumerate(decoder_layers(model)):
            for short, mod in target_modules(layer).items():
                W = mod.weight.detach().to(device)
                score = W.abs().float()
                if nm is not None:
                    mask = nm_mask(score, nm)
                else:
                    mask = topk_mask(score, exact_count(density, W.numel()))
                with torch.no_grad():
                    mod.weight.copy_((W * mask).to(mod.weight.device))
                name = weight_name(i, short)
                kept[name] = int(mask.sum())
                per_matrix[name] = {"nnz": kept[name], "density": kept[name] / W.numel()}
        return finish(model, self.name, density, kept, {"params": p, "seed": seed, "matrices": per_matrix})


MAGNITUDE = Magnitude()
