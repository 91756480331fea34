"""CAP's realisation: turn the allocation's per-matrix budgets into low-rank + sparse weights that fit the data.

[departure] The paper materialises the kept candidates of Stage 1 as they are (`realise.mode: select`,
the ablation). Measured on SmolLM2-135M (CPU, layer 12, density 0.5, activation-weighted relative
output error tr(E H E^T) / tr(W H W^T)): keeping the best candidates of RPCA of W D at the budget
gives 0.120 (mean of q, v, o, down) against 0.0145 for the realisation below on the same four; over
all seven matrices SparseGPT gives 0.0164, OATS 0.0286 and the realisation 0.0137. So CAP keeps the allocation (how many parameters each matrix of each
layer gets: Stage 2's decision) and re-derives the weights that spend them:

1. Split. A matrix's budget b (parameters) goes to rank r = floor(rank_ratio * b / (m + n)) and
   k = b - r (m + n) sparse entries (rank_ratio 0.1: on the same layer 0.0, 0.05, 0.1, 0.2 were
   screened; see docs/departures.md, CAP's realisation).
2. Decompose in the activation-scaled space, D = diag(sqrt(H_jj)): alternating projections
   L <- best rank-r of (W D - S), S <- the k largest |entries| of (W D - L) row by row
   (GoDec, glrs.godec: the same loop OATS uses), `iterations` times; unscale by D^-1. Since version 2 in
   float32, with the best rank-r step by a warm-started subspace iteration (glrs.godec.SubspaceStep)
   instead of a full eigendecomposition per step (OATS's exact step), and row top-k by partial
   selection: on SmolLM2-135M layers 0, 12, 29 at density 0.5 (CPU, one thread) a layer takes ~12 s
   instead of ~45-60 s and the errors after the refit differ by < 0.5 % of their value
   (benchmarks/realise_speed.py).
3. Refit. With L and the support of S fixed, the kept sparse values are the least-squares solution
   of min ||(W - L - S) X||^2 on the calibration inputs, one ridge-damped system per output row:
   S_i,Omega = (H_OO + delta I)^-1 ((W - L)_i (H + delta I))_Omega, delta = damp * mean(diag H).
   This is the compensation SparseGPT approximates column by column. Version 2 solved every row exactly
   (float32 Cholesky factors, refined); version 3 runs `refit_iterations` (30) conjugate-gradient steps
   over all rows at once from the unrefitted values (`refit_sparse`): on SmolLM2-135M layers 0, 12, 29
   at density 0.5 (one thread) a layer takes 7.6 s instead of 11.6 s and the mean output error changes by
   +0.01 to +0.04 % (benchmarks/realise_speed.py, results/benchmarks/realise_speed.json).

Semi-structured (`sparsity: "2:4"`). The sparse part follows NVIDIA's 2:4 pattern (in every group of 4
consecutive input columns of each row exactly 2 entries kept), so that the product runs on sparse tensor
cores, plus the low-rank part. A matrix with budget b spends exactly m*n/2 on its 2:4 support and the rest on
rank r = floor((b - m*n/2) / (m + n)); the leftover b - m*n/2 - r (m + n) < m + n parameters go unspent
(recorded per matrix as `leftover`). `rank_ratio` is ignored (and left out of the settings, so of the key).
GoDec's S-step keeps the 2:4 mask of |W D - L| (scaled space) instead of the row top-k; the refit is the same
(it works on any fixed support). A matrix whose budget reaches m*n stays dense and is stored exactly (rank 0,
every entry kept, S = W; `dense: true`). The allocation's budgets are first moved under a floor of m*n/2 and
a cap of m*n with the same total (`matrix_budgets_nm`), so a target density below 0.5 is an error. Under
the default `sparsity: unstructured` nothing of the above applies and the setting is left out of the
resolved settings, so it does not enter the key.

Pruning realisers (`realise.mode: wanda | sparsegpt`): the seam between allocators and realisers
(docs/design.md section 3). Any allocation's per-matrix budget b is spent as pure sparsity (rank 0, nnz = b)
by a baseline's own pruning rule, so that CAP's learned budgets (or OWL's, or the uniform ones) can drive
Wanda or SparseGPT:
  * wanda: keep the b highest scores |W_ij| * ||X_j|| row by row (`row_topk_mask`, the Wanda baseline's
    per-row groups with an exact total; glrs.methods.wanda.wanda_scores), no weight update. ||X_j|| is
    sqrt(H_jj) of the statistics file (H = X^T X / tokens), i.e. ||X_j|| / sqrt(tokens): one factor common to
    every column, so the mask is the one the true norms give.
  * sparsegpt: glrs.methods.sparsegpt.sparsegpt_prune (OBS pruning + update, blocksize 128, float32 updates) at
    density b / (m n) with the statistics file's H; the relative dampening is `damp` (SparseGPT's percdamp, 0.01
    by default for both), and the scale of H (divided by tokens) cancels in the update and in the saliencies.
  Under `sparsity: "2:4"` both keep NVIDIA's 2:4 mask instead (wanda: the 2 highest scores of every 4
  consecutive inputs, glrs.masks.nm_mask; sparsegpt: its N:M path), with the budgets of
  `matrix_budgets_nm`: a matrix the allocation makes dense (budget m*n) stays dense, every other one keeps
  exactly m*n/2 and the rest of its budget goes unspent (recorded as `leftover`; at target density 0.5 there
  is none). Only `mode` (and `damp` for sparsegpt, and `sparsity` when not unstructured) enter their resolved
  settings, so the refit's settings do not change their keys. The files have the refit's layout (U, sigma, V
  empty; S_index, S_values), so materialise_realised and everything downstream is the same.
  [departure] Each per-layer job prunes with the dense model's statistics (glrs.stats: every layer's inputs
  from the unpruned model, all layers in parallel), not with the inputs of the already-pruned earlier
  layers as the reference code (locuslab/wanda, IST-DASLab/sparsegpt) and glrs's baselines
  (glrs.layers.sequential_layers) do. Measured cost on the embedded model: docs/departures.md.

Each decoder layer is one job (`glrs realise`); it reads its layer's weights, its activation
statistics (glrs.stats) and the allocation's JSON, and writes the factored form
(glrs.compressed layout) with the per-matrix errors before and after the refit.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import cas, compressed, modelio, stats
from .godec import SubspaceStep, column_scale, godec, unscaled_low_rank
from .masks import row_topk_mask
from .errors import GlrsError

REALISE_VERSION = 4  # 2: float32 GoDec by subspace iteration; 3: refit by conjugate gradients (refit_iterations);
# 4: the sparse support stored as glrs.compressed encodes it (bitmask or int16/int32 columns + int32 row
# offsets, whichever is smaller) instead of int64 flat indices: ~31 -> ~2.4 GB of indices at 8B, density 0.5
MODES = ("refit", "select", "wanda", "sparsegpt")
PRUNING_MODES = ("wanda", "sparsegpt")  # pure sparsity at each matrix's budget, by a baseline's pruning rule
# The settings each pruning realiser uses (besides mode and sparsity); the others are checked, then left out of
# its resolved settings (so of its key).
PRUNING_SETTINGS = {"wanda": (), "sparsegpt": ("damp",)}
SPARSEGPT_BLOCKSIZE = 128  # glrs.methods.sparsegpt's default
DEFAULTS = {"mode": "refit", "rank_ratio": 0.1, "iterations": 40, "damp": 0.01, "refit_iterations": 30}
# `sparsity` is a setting too, but only a non-default value is kept in the resolved settings (so the keys and
# file bytes of unstructured runs are those made before it existed).
SPARSITY = {"unstructured": None, "2:4": (2, 4)}
PARTS = ("U", "sigma", "V", "S_index", "S_values")
GODEC_DTYPE = torch.float32


def resolve_params(params: dict | None) -> dict:
    """The effective settings, checked. `sparsity` is there only when it is not "unstructured"; under "2:4"
    `rank_ratio` is checked and then dropped (the 2:4 split does not use it, so it must not change the key)."""
    p = dict(DEFAULTS) | dict(params or {})
    sparsity = p.pop("sparsity", "unstructured")
    unknown = sorted(set(p) - set(DEFAULTS))
    if unknown:
        raise GlrsError(f"config key realise: unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    if p["mode"] not in MODES:
        raise GlrsError(f"config key realise.mode: {p['mode']!r} is not one of {list(MODES)}")
    if not 0.0 <= float(p["rank_ratio"]) <= 1.0:
        raise GlrsError(f"config key realise.rank_ratio: {p['rank_ratio']} is outside [0, 1]")
    if int(p["iterations"]) < 1:
        raise GlrsError(f"config key realise.iterations: {p['iterations']} must be >= 1")
    if int(p["refit_iterations"]) < 0:
        raise GlrsError(f"config key realise.refit_iterations: {p['refit_iterations']} must be >= 0 (0: no refit)")
    if float(p["damp"]) <= 0:
        raise GlrsError(f"config key realise.damp: {p['damp']} must be > 0 (it keeps the row systems solvable)")
    if sparsity not in SPARSITY:
        raise GlrsError(f"config key realise.sparsity: {sparsity!r} is not one of {list(SPARSITY)}")
    if SPARSITY[sparsity] is not None:
        if p["mode"] == "select":
            raise GlrsError(f"config key realise.sparsity: {sparsity} needs realise.mode refit, wanda or sparsegpt "
                            "(mode select keeps the Stage-1 candidates as they are, which follow no N:M pattern)")
        del p["rank_ratio"]  # ignored under N:M: the sparse part takes exactly N/M of the matrix, the rank the rest
        p["sparsity"] = sparsity
    if p["mode"] in PRUNING_MODES:  # only what the pruning rule uses is a setting of it
        p = {k: v for k, v in p.items() if k in ("mode", "sparsity") + PRUNING_SETTINGS[p["mode"]]}
    return p


def nm_of(params: dict) -> tuple[int, int] | None:
    """The N:M pattern of resolved settings (None: unstructured)."""
    return SPARSITY[params.get("sparsity", "unstructured")]


# ---- budgets -------------------------------------------------------------------------------------

def matrix_budgets(alloc_info: dict) -> dict[str, int]:
    """Weight name -> parameters the realisation spends on it: what Stage 2 kept in that matrix
    (rank * (m + n) + nnz), capped at its dense size; what the cap removes goes to the other
    matrices in proportion to their budgets, so the total is exactly the allocation's."""
    from .masks import capped_split

    mats = alloc_info["matrices"]
    names = sorted(mats)
    want = [mats[n]["rank"] * sum(mats[n]["shape"]) + mats[n]["nnz"] for n in names]
    cap = [mats[n]["shape"][0] * mats[n]["shape"][1] for n in names]
    return dict(zip(names, capped_split(sum(want), want, cap)))


def matrix_budgets_nm(alloc_info: dict, nm: tuple[int, int] = (2, 4)) -> dict[str, int]:
    """Weight name -> budget under N:M sparsity: at least the N:M floor m*n*N/M (what the sparse part
    takes), at most m*n (dense), adding up to exactly the allocation's total (that of `matrix_budgets`).

    Starting from `matrix_budgets` (the allocation's per-matrix totals, capped at dense): the matrices the
    allocator made dense (budget m*n) stay dense when the others can still reach their floors; every other
    matrix gets its floor plus a share of what is left in proportion to how far the allocator put it above
    its floor, max(b_i - floor_i, 0), each capped at m*n (`capped_split`). So the parameters needed to lift
    the matrices below the floor are taken from the others in proportion to their excess. A total below the
    sum of the floors (target density < N/M) is an error; so is an input dimension not a multiple of M. One
    exception to the exact total: an allocation for a target density >= N/M whose rounding (e.g. OWL's
    per-matrix int()) left it short of the floors by at most DENSITY_TOLERANCE of the dense count gets the
    floors (it then spends those few parameters more)."""
    from .masks import DENSITY_TOLERANCE, capped_split

    n_keep, group = nm
    mats = alloc_info["matrices"]
    names = sorted(mats)
    for name in names:
        m, n = mats[name]["shape"]
        if n % group:
            raise GlrsError(f"realise.sparsity {n_keep}:{group} needs every input dimension to be a multiple of "
                            f"{group}; {name} is {m} x {n}. Use realise.sparsity unstructured for this model")
    base = matrix_budgets(alloc_info)
    dense = {k: mats[k]["shape"][0] * mats[k]["shape"][1] for k in names}
    floor = {k: dense[k] * n_keep // group for k in names}
    total, need = sum(base.values()), sum(floor.values())
    target = alloc_info.get("target_density")
    if total < need and target is not None and target >= n_keep / group - 1e-12 \
            and need - total <= DENSITY_TOLERANCE * sum(dense.values()):
        return floor  # the allocator's rounding left it a few parameters short of a target density >= N/M
    if total < need:
        raise GlrsError(f"realise.sparsity {n_keep}:{group}: the allocation keeps density {total / sum(dense.values()):.4g} "
                        f"({total} of {sum(dense.values())} parameters), but {n_keep}:{group} needs >= "
                        f"{n_keep / group:g} (its sparse part alone keeps {n_keep}/{group} of every matrix); "
                        f"raise target_density to >= {n_keep / group:g}")
    pinned = [k for k in names if base[k] >= dense[k]]
    rest = [k for k in names if k not in pinned]
    if sum(base[k] for k in rest) < sum(floor[k] for k in rest):  # the dense ones must give too
        pinned, rest = [], names
    out = {k: dense[k] for k in pinned}
    extra = sum(base[k] for k in rest) - sum(floor[k] for k in rest)
    parts = capped_split(extra, [max(base[k] - floor[k], 0) for k in rest], [dense[k] - floor[k] for k in rest])
    out |= {k: floor[k] + part for k, part in zip(rest, parts)}
    return {k: out[k] for k in names}


def split_budget_nm(shape: tuple[int, int], budget: int, nm: tuple[int, int] = (2, 4)) -> tuple[int, int, int]:
    """(rank, nonzeros, leftover) of an m x n matrix under N:M sparsity: the sparse part takes m*n*N/M, the
    rank r = floor((budget - m*n*N/M) / (m + n)), the leftover (< m + n) is unspent. A budget of m*n: dense,
    (0, m*n, 0)."""
    m, n = shape
    n_keep, group = nm
    floor = m * n * n_keep // group
    if n % group or not floor <= budget <= m * n:
        raise GlrsError(f"budget {budget} outside [{floor}, {m * n}] (or input dimension {n} not a multiple of "
                        f"{group}) for {n_keep}:{group} sparsity of a {m} x {n} matrix")
    if budget == m * n:
        return 0, m * n, 0
    r = (budget - floor) // (m + n)
    return r, floor, budget - floor - r * (m + n)


def split_budget(shape: tuple[int, int], budget: int, rank_ratio: float) -> tuple[int, int]:
    """(rank, nonzeros) spending exactly `budget` parameters of an m x n matrix."""
    m, n = shape
    if not 0 <= budget <= m * n:
        raise GlrsError(f"budget {budget} outside [0, {m * n}] for a {m} x {n} matrix")
    r = min(min(m, n), int(rank_ratio * budget / (m + n)))
    return r, budget - r * (m + n)


# ---- the refit ------------------------------------------------------------------------------------

def refit_sparse(R: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, damp: float, iterations: int) -> torch.Tensor:
    """The sparse matrix S supported on `mask` that (nearly) minimises tr((R - S) Hd (R - S)^T), Hd = H + delta I.

    Row i's optimum solves Hd_OO S_i,O = (R_i Hd)_O. All rows are solved at once by `iterations` steps of
    Jacobi-preconditioned conjugate gradients, started from the unrefitted values S = R on the mask, each
    step one float32 product of the masked rows with Hd (the support stays a mask: no gathered k x k
    systems). A fixed step count, no data-dependent branch: the bytes depend only on the inputs and the
    thread count. Measured on SmolLM2-135M (layers 0, 3, 12, 29; density 0.4 / 0.5; one thread): 30 steps
    leave the activation-weighted output error within 0.2 % of the exact row solves (which REALISE_VERSION 2
    made by Cholesky) in about a third of their time; GEMM-only, so it runs as well on a GPU.
    """
    R64 = R.to(torch.float64)
    Hd = H.to(R.device, torch.float64).clone()
    mean = float(Hd.diagonal().mean())
    Hd.diagonal().add_(damp * mean if mean > 0 else damp)
    X = R64 * mask  # float64: the steps' float32 updates accumulate onto it
    res = (((R64 - X) @ Hd) * mask).to(torch.float32)  # b - A x on the support
    M = mask.to(torch.float32)
    Hf = Hd.to(torch.float32)
    dinv = (1.0 / Hf.diagonal()).unsqueeze(0) * M
    Z = res * dinv
    P = Z.clone()
    rz = (res * Z).sum(1, keepdim=True)
    for _ in range(iterations):
        AP = (P @ Hf) * M
        alpha = rz / (P * AP).sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        X += alpha * P  # float32 step into float64
        res -= alpha * AP
        Z = res * dinv
        rz_next = (res * Z).sum(1, keepdim=True)
        P = Z + rz_next / rz.clamp_min(torch.finfo(torch.float32).tiny) * P
        rz = rz_next
    return X


def output_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor, den: float | None = None) -> float:
    """tr(E H E^T) / tr(W H W^T): the share of the output energy on the calibration inputs that is lost.
    `den`: tr(W H W^T) when the caller has it already."""
    E = (W - W_new).to(torch.float64)
    if den is None:
        W64 = W.to(torch.float64)
        den = float((W64 @ H * W64).sum())
    return float((E @ H * E).sum()) / den if den > 0 else 0.0


def realise_matrix(W: torch.Tensor, H: torch.Tensor, budget: int, params: dict) -> tuple[dict, dict]:
    """(factors in glrs.compressed layout, record) spending exactly `budget` parameters on W [m, n]
    (under N:M sparsity: `budget` less the record's `leftover` < m + n; a budget of m*n: W itself)."""
    m, n = W.shape
    nm = nm_of(params)
    W64 = W.to(torch.float64)
    H = H.to(W.device, torch.float64)
    extra = {}
    if nm is None:
        rank, nnz = split_budget((m, n), budget, float(params["rank_ratio"]))
    else:
        rank, nnz, leftover = split_budget_nm((m, n), budget, nm)
        extra = {"dense": nnz == m * n, "leftover": leftover}
        if extra["dense"]:  # stored exactly: every entry kept, no low rank
            factors = {"U": W64.new_zeros(m, 0), "sigma": W64.new_zeros(0), "V": W64.new_zeros(n, 0),
                       "S_index": torch.arange(m * n, device=W.device), "S_values": W64.reshape(-1).clone()}
            return factors, {"rank": 0, "nnz": m * n, "params": m * n, "error_before_refit": 0.0, "error": 0.0} | extra
    d = column_scale(torch.diagonal(H).clamp_min(0).sqrt())
    P, B, mask = godec((W64 * d).to(GODEC_DTYPE), rank, nnz, int(params["iterations"]), step=SubspaceStep, nm=nm)
    f = unscaled_low_rank(P, B, d)
    L = (f["U"] * f["sigma"]) @ f["V"].T
    den = float((W64 @ H * W64).sum())
    before = output_error(W64, L + (W64 - L) * mask, H, den) if nnz else output_error(W64, L, H, den)
    S = refit_sparse(W64 - L, mask, H, float(params["damp"]), int(params["refit_iterations"]))
    index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    factors = {"U": f["U"], "sigma": f["sigma"], "V": f["V"], "S_index": index, "S_values": S.reshape(-1)[index]}
    record = {"rank": rank, "nnz": int(index.numel()), "params": rank * (m + n) + int(index.numel()),
              "error_before_refit": before, "error": output_error(W64, L + S, H, den)} | extra
    return factors, record


# ---- the pruning realisers (realise.mode wanda | sparsegpt) ----------------------------------------

def prune_matrix(W: torch.Tensor, H: torch.Tensor, budget: int, params: dict) -> tuple[dict, dict]:
    """(factors in glrs.compressed layout, record): W [m, n] pruned to exactly `budget` nonzeros (rank 0) by
    Wanda's score or SparseGPT's OBS pruning (params["mode"]); H = X^T X / tokens. Under N:M sparsity the N:M
    mask (`budget` >= m*n*N/M; the rest, `leftover`, unspent), and a budget of m*n keeps W whole."""
    from .layers import LayerStats
    from .masks import nm_mask
    from .methods.sparsegpt import sparsegpt_prune
    from .methods.wanda import wanda_scores

    m, n = W.shape
    mode, nm = params["mode"], nm_of(params)
    H = H.to(W.device, torch.float64)
    extra = {}
    if nm is not None:
        _, nnz, _ = split_budget_nm((m, n), budget, nm)  # checks the budget's range (and n % M)
        extra = {"dense": nnz == m * n, "leftover": budget - nnz}
    elif not 0 <= budget <= m * n:
        raise GlrsError(f"budget {budget} outside [0, {m * n}] for a {m} x {n} matrix")
    if budget >= m * n:  # dense: every entry kept, as in the refit's layout
        mask, W_new = torch.ones(m, n, dtype=torch.bool, device=W.device), W
    elif mode == "wanda":
        scores = wanda_scores(W, LayerStats(H=H, abs_mean=H.new_zeros(0), tokens=0))  # |W_ij| sqrt(H_jj)
        mask = row_topk_mask(scores, budget) if nm is None else nm_mask(scores, nm)
        W_new = W * mask
    elif mode == "sparsegpt":
        W_new, mask = sparsegpt_prune(W, H, budget / (m * n), nm, SPARSEGPT_BLOCKSIZE, float(params["damp"]))
    else:
        raise GlrsError(f"realise.mode {mode!r} is not a pruning realiser; known: {list(PRUNING_MODES)}")
    W64 = W.to(torch.float64)
    den = float((W64 @ H * W64).sum())
    index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    nnz = int(index.numel())
    if nm is None and nnz != budget:
        raise GlrsError(f"realise.mode {mode}: kept {nnz} entries of a {m} x {n} matrix, its budget is {budget}")
    factors = {"U": W64.new_zeros(m, 0), "sigma": W64.new_zeros(0), "V": W64.new_zeros(n, 0), "S_index": index,
               "S_values": W_new.reshape(-1)[index].to(torch.float64)}
    error = output_error(W64, W_new.to(torch.float64) * mask, H, den)
    # error_before_refit: the pruned weights without any update (Wanda makes none; SparseGPT's OBS update is
    # what separates the two)
    before = output_error(W64, W64 * mask, H, den) if mode == "sparsegpt" else error
    return factors, {"rank": 0, "nnz": nnz, "params": nnz, "error_before_refit": before, "error": error} | extra


# ---- the per-layer job --------------------------------------------------------------------------

def realise_layer(model_dir: str, stats_file: str, alloc_json: str, layer: int, params: dict, out: str,
                  device: str = "cpu") -> dict:
    """Realise the seven targets of one layer at the allocation's budgets; write the factored form."""
    from .conditions import SOLVER_THREADS, current, pinned_threads

    p = resolve_params(params)
    info = json.loads(Path(alloc_json).read_text())
    nm = nm_of(p)
    budgets = matrix_budgets(info) if nm is None else matrix_budgets_nm(info, nm)
    allocated = matrix_budgets(info) if nm is not None else {}
    weights = modelio.read_layer(model_dir, layer)
    H = stats.read_layer(stats_file)
    tensors, records = {}, {}
    with pinned_threads(SOLVER_THREADS if str(device) == "cpu" else None):
        for short, W in weights.items():
            name = modelio.weight_name(layer, short)
            if name not in budgets:
                raise GlrsError(f"the allocation {alloc_json} has no budget for {name}; it was made for other layers")
            spend = prune_matrix if p["mode"] in PRUNING_MODES else realise_matrix
            factors, rec = spend(W.to(device), H[short].to(device), budgets[name], p)
            for part in PARTS:
                if part != "S_index":
                    tensors[f"{short}.{part}"] = factors[part].to("cpu", W.dtype).contiguous()
            if factors["S_index"].numel():  # the compact model's support encoding, not 8 bytes an entry
                support, _ = compressed.encode_support(factors["S_index"], tuple(W.shape))
                tensors |= {f"{short}.{k}": t.contiguous() for k, t in support.items()}
            records[short] = rec | {"name": name, "shape": list(W.shape), "budget": budgets[name]}
            if nm is not None:  # what the allocation gave it, before the N:M floor moved it
                records[short]["allocated"] = allocated[name]
    threads = SOLVER_THREADS if str(device) == "cpu" else torch.get_num_threads()
    meta = {"layer": layer, "params": p, "matrices": records, "conditions": current(device, "float64", threads=threads)}
    with cas.atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"glrs": cas.canonical_json(meta)})
    return meta


def read_realised(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(metadata, weight name -> factors) of one realised layer file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["glrs"])
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise GlrsError(f"cannot read realised layer {path}: {e}; delete the file and rerun its realise job") from e
    out = {}
    for short, rec in meta["matrices"].items():
        parts = {part: flat[f"{short}.{part}"] for part in PARTS if part != "S_index"}
        support = {k: flat[f"{short}.{k}"] for k in ("bitmask", "row_offsets", "cols") if f"{short}.{k}" in flat}
        parts["S_index"] = (compressed.decode_support(support, tuple(rec["shape"])) if support
                            else torch.zeros(0, dtype=torch.int64))
        out[rec["name"]] = {part: parts[part] for part in PARTS}
    return meta, out
