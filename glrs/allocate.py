"""Stage 2: deciding which singular components of every L and which entries of every S to keep.

All allocators share one budget: kept parameters of the target matrices =
target_density * their dense count. A singular component of an m x n matrix
costs m + n (sigma folded into a factor, as the CAP paper counts it; docs/design.md
section 7 -- an earlier count of m + n + 1 added a scalar that is a storage detail,
not a parameter of the factored form), a sparse entry costs 1 (its index is
reported separately).

Allocators (config `allocators`):
  uniform         the same density in every matrix, split by `rank_fraction`
  owl             layer-wise densities from the layer's share of outlier weights (OWL, Yin et al. 2024,
                  arXiv 2310.05175), each matrix split by `rank_fraction`: the non-uniform heuristic
  rpca-threshold  global thresholds on sigma and |S| (RPCA alone, no learning)
  cap             the paper's global probabilistic allocation (glrs.cap)
  lowrank-only    cap restricted to the singular components
  sparse-only     cap restricted to the sparse entries
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import cas
from .errors import GlrsError
from .stage1 import MatrixPool, Stage1

ALLOC_VERSION = 1
ALLOCATORS = ("cap", "uniform", "owl", "rpca-threshold", "lowrank-only", "sparse-only")
NEEDS_CALIBRATION = ("cap", "lowrank-only", "sparse-only")
NEEDS_STATS = ("owl",)


def needs_stats(allocator: str, params: dict) -> bool:
    """Whether an allocation job reads the activations job's files: OWL, CAP's budget policy, and CAP's
    reconstruction loss (`params`: CAP's resolved parameters)."""
    return allocator in NEEDS_STATS or (allocator in NEEDS_CALIBRATION and (
        params.get("policy") == "budget" or params.get("loss") == "reconstruction"))


@dataclass
class Allocation:
    rank_keep: dict[str, torch.Tensor]  # name -> bool [R]
    sparse_keep: dict[str, torch.Tensor]  # name -> bool [K]

    @classmethod
    def of_prefixes(cls, matrices: dict) -> "Allocation":
        """The keep-masks of an allocation that kept prefixes, from its .json's per-matrix counts."""
        return cls({n: _prefix_mask(m["rank_available"], m["rank"]) for n, m in matrices.items()},
                   {n: _prefix_mask(m["nnz_available"], m["nnz"]) for n, m in matrices.items()})

    def is_prefix(self) -> bool:
        return all(bool(m[: int(m.sum())].all()) for m in (*self.rank_keep.values(), *self.sparse_keep.values()))

    def params_kept(self, pools: list[MatrixPool]) -> int:
        return sum(int(self.rank_keep[p.name].sum()) * p.rank_cost + int(self.sparse_keep[p.name].sum()) for p in pools)


def layer_file_key(short: str, part: str) -> str:
    return f"{short}.{part}"


def load_pools(rpca_files: list[str | Path]) -> list[MatrixPool]:
    """The pools of these decompose files (glrs.stage1.Stage1.pools reads either source)."""
    return Stage1.from_files(rpca_files).pools()


def budget_for(pools: list[MatrixPool], density: float) -> int:
    dense = sum(p.dense for p in pools)
    budget = int(round(density * dense))
    capacity = sum(p.capacity for p in pools)
    if budget > capacity:
        raise GlrsError(
            f"target density {density} cannot be met: Stage 1 left candidates worth at most {capacity / dense:.4f} of the dense "
            "parameters; lower target_density or rerun RPCA with a larger rpca.lambda_scale (a larger lambda leaves a higher-rank L, "
            "and every singular component of L is a candidate)"
        )
    return budget


def _prefix_mask(n: int, k: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:k] = True
    return mask


def _split_matrix_budget(pool: MatrixPool, budget: int, rank_fraction: float) -> tuple[int, int]:
    """(rank, nnz) for one matrix: rank_fraction of the budget to components, the rest to entries,
    and whatever one side cannot use goes to the other."""
    R, K, c = pool.sigma.numel(), pool.s_abs.numel(), pool.rank_cost
    r = min(R, int(rank_fraction * budget) // c)
    k = min(K, budget - r * c)
    if k == K:
        r = min(R, r + (budget - r * c - K) // c)
        k = min(K, budget - r * c)
    return r, k


def uniform(pools: list[MatrixPool], density: float, rank_fraction: float = 0.5, **_) -> Allocation:
    """Same density in every matrix; each matrix keeps its top components and largest entries."""
    budget_for(pools, density)
    return matrix_prefixes(pools, lambda p: int(density * p.dense), rank_fraction)


def matrix_prefixes(pools: list[MatrixPool], budget_of, rank_fraction: float) -> Allocation:
    """Each matrix keeps its top components and largest entries worth budget_of(pool) parameters."""
    rank_keep, sparse_keep = {}, {}
    for p in pools:
        r, k = _split_matrix_budget(p, budget_of(p), rank_fraction)
        rank_keep[p.name] = _prefix_mask(p.sigma.numel(), r)
        sparse_keep[p.name] = _prefix_mask(p.s_abs.numel(), k)
    return Allocation(rank_keep, sparse_keep)


def owl_layer_densities(outlier_shares: list[float], density: float, max_shift: float) -> list[float]:
    """OWL's rule: densities spread linearly in the layers' outlier shares over [density - max_shift,
    density + max_shift], then shifted so that their mean is `density` (every Llama layer has the
    same size, so the budget is unchanged)."""
    d = torch.tensor(outlier_shares, dtype=torch.float64)
    spread = d.max() - d.min()
    d = (d - d.min()) / spread * 2 * max_shift if spread > 0 else torch.zeros_like(d)
    out = (d - d.mean() + density).clamp(0.0, 1.0)
    return out.tolist()


def owl(pools: list[MatrixPool], density: float, model_dir: str, stats_files: list[str], rank_fraction: float = 0.5,
        outlier_ratio: float = 5.0, max_shift: float = 0.08, **_) -> Allocation:
    """OWL (arXiv 2310.05175): a layer keeps more where more of its weights are outliers, i.e. have a
    Wanda score |W_ij| ||X_j|| above `outlier_ratio` times the layer's mean score (the paper's M = 5,
    lambda = 0.08). Each matrix of a layer then gets the layer's density, split by `rank_fraction`."""
    from . import modelio, stats

    budget_for(pools, density)
    layers = sorted({p.layer for p in pools})
    if len(stats_files) != len(layers):
        raise GlrsError(f"owl: {len(stats_files)} activation-statistics files for {len(layers)} layers")
    shares = []
    for layer, path in zip(layers, stats_files):
        H = stats.read_layer(path)
        W = modelio.read_layer(model_dir, layer)
        scores = torch.cat([(W[s].double().abs() * torch.diagonal(H[s]).clamp_min(0).sqrt()).reshape(-1) for s in W])
        shares.append(float((scores > outlier_ratio * scores.mean()).double().mean()))
    per_layer = dict(zip(layers, owl_layer_densities(shares, density, max_shift)))
    return matrix_prefixes(pools, lambda p: int(per_layer[p.layer] * p.dense), rank_fraction)


def _global_top(values: list[torch.Tensor], costs: list[int], budget: int) -> list[int]:
    """How many of each (descending) list to keep when all are ranked by value together
    and taken in order while the running cost stays within budget."""
    flat = torch.cat(values)
    cost = torch.cat([torch.full((v.numel(),), c, dtype=torch.int64) for v, c in zip(values, costs)])
    owner = torch.cat([torch.full((v.numel(),), i, dtype=torch.int64) for i, v in enumerate(values)])
    order = torch.sort(flat, descending=True, stable=True).indices
    within = torch.cumsum(cost[order], 0) <= budget
    return torch.bincount(owner[order][within], minlength=len(values)).tolist()


def rpca_threshold(pools: list[MatrixPool], density: float, rank_fraction: float = 0.5, **_) -> Allocation:
    """One global threshold on sigma and one on |S| across all layers: Stage 1 alone, no learning."""
    budget = budget_for(pools, density)
    ranks = _global_top([p.sigma for p in pools], [p.rank_cost for p in pools], int(rank_fraction * budget))
    spent = sum(r * p.rank_cost for r, p in zip(ranks, pools))
    nnzs = _global_top([p.s_abs for p in pools], [1] * len(pools), budget - spent)
    return Allocation(
        {p.name: _prefix_mask(p.sigma.numel(), r) for p, r in zip(pools, ranks)},
        {p.name: _prefix_mask(p.s_abs.numel(), k) for p, k in zip(pools, nnzs)},
    )


def summarise(pools: list[MatrixPool], alloc: Allocation, density: float) -> dict:
    dense = sum(p.dense for p in pools)
    kept = alloc.params_kept(pools)
    per_matrix = {
        p.name: {
            "layer": p.layer,
            "matrix": p.short,
            "shape": list(p.shape),
            "rank": int(alloc.rank_keep[p.name].sum()),
            "rank_available": p.sigma.numel(),
            "nnz": int(alloc.sparse_keep[p.name].sum()),
            "nnz_available": p.s_abs.numel(),
        }
        for p in pools
    }
    return {
        "target_density": density,
        "achieved_density": kept / dense,
        "params_kept": kept,
        "params_dense": dense,
        "sparse_index_entries": sum(m["nnz"] for m in per_matrix.values()),
        "kept": "prefixes" if alloc.is_prefix() else "masks",  # prefixes: the counts below say which candidates
        "matrices": per_matrix,
    }


def save(alloc: Allocation, info: dict, json_path: str | Path, masks_path: str | Path | None) -> None:
    """The allocation's JSON (per-matrix budgets) always; its keep-masks only if asked, one bit a candidate
    (uint8, bit j of byte b = candidate 8b + j; glrs.compressed.pack_bitmask's order): a bool a weight
    would be 7 GB at 8B."""
    if masks_path is not None:
        from .compressed import pack_bitmask

        masks = {f"{n}.rank_keep": m for n, m in alloc.rank_keep.items()}
        masks |= {f"{n}.sparse_keep": m for n, m in alloc.sparse_keep.items()}
        tensors = {k: pack_bitmask(m.reshape(1, -1)).reshape(-1) for k, m in masks.items()}
        numel = {k: int(m.numel()) for k, m in masks.items()}
        with cas.atomic_path(masks_path) as tmp:
            save_file(tensors, str(tmp), metadata={"bits": cas.canonical_json(numel)})
    cas.write_json_atomic(json_path, info)


def load_masks(masks_path: str | Path) -> Allocation:
    """The keep-masks of `save` (or of a file written before they were packed: one bool a candidate)."""
    from .compressed import unpack_bitmask

    rank_keep, sparse_keep = {}, {}
    with safe_open(str(masks_path), framework="pt") as f:
        meta = f.metadata() or {}
        numel = json.loads(meta["bits"]) if "bits" in meta else {}
        for key in f.keys():
            name, kind = key.rsplit(".", 1)
            t = f.get_tensor(key)
            if key in numel:
                t = unpack_bitmask(t.reshape(1, -1), numel[key]).reshape(-1)
            (rank_keep if kind == "rank_keep" else sparse_keep)[name] = t
    return Allocation(rank_keep, sparse_keep)
