"""Budgets and masks: how a count of kept parameters becomes the kept entries of a matrix.

* Exact per-matrix counts (`exact_count`), a total split over parts with cumulative rounding so the
  parts add up exactly (`split_count`), and the same with a cap per part (`capped_split`).
* Top-k masks: over the whole tensor (`topk_mask`) and per output row with an exact total
  (`row_topk_mask`).
* N:M semi-structured sparsity: parsing the pattern (`parse_nm`), the density it implies
  (`check_nm_density`) and its mask (`nm_mask`).
* `DENSITY_TOLERANCE`: how far an achieved overall density may miss its target.

Shared by everything that prunes: CAP's budgets (glrs.cap.budget), the realisation (glrs.realise),
GoDec (glrs.godec) and the baseline methods (glrs.methods); none of it is specific to a baseline.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import GlrsError

DENSITY_TOLERANCE = 1e-3  # 0.1 percentage points, overall


def exact_count(density: float, numel: int) -> int:
    """Kept entries of one matrix: round(density * numel), at least 0, at most numel."""
    return max(0, min(numel, int(round(density * numel))))


def split_count(total: int, sizes: list[int]) -> list[int]:
    """Split `total` kept entries over consecutive parts of the given sizes in proportion,
    with cumulative rounding so the parts add up to `total` exactly."""
    whole = sum(sizes)
    out, cum, prev = [], 0, 0
    for s in sizes:
        cum += s
        nxt = int(round(total * cum / whole)) if whole else 0
        out.append(nxt - prev)
        prev = nxt
    return out


def capped_split(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Integers in proportion to `weights`, each at most its cap, adding up to min(total, sum caps):
    what a capped part cannot take goes to the others in proportion to their weights. Integer
    weights are split exactly by split_count (cumulative rounding in the given order); real ones
    are first put on an integer grid fine enough that its rounding is far below one unit."""
    total = min(int(total), sum(int(c) for c in caps))
    out: dict[int, int] = {}
    free = dict(enumerate(weights))
    left = total
    while free:
        mass = sum(free.values())
        scale = left / mass if mass > 0 else 0.0
        over = [i for i, w in free.items() if w * scale >= caps[i]]
        if not over:
            break
        for i in over:
            out[i] = int(caps[i])
            left -= int(caps[i])
            del free[i]
    idx = sorted(free)
    sizes = [free[i] for i in idx]
    if not all(isinstance(w, int) for w in sizes):
        grid = 2**40 / max(sum(sizes), 1e-300)
        sizes = [max(1, int(w * grid)) for w in sizes]
    for i, part in zip(idx, split_count(left, sizes)):  # adds up to `left` exactly
        out[i] = min(int(caps[i]), part)
    return [out[i] for i in range(len(caps))]


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` highest scores of the whole tensor (ties broken by index)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        idx = torch.topk(flat, keep, sorted=False).indices
        mask[idx] = True
    return mask.reshape(scores.shape)


def row_topk_mask(scores: torch.Tensor, keep_total: int) -> torch.Tensor:
    """Per-output-row comparison groups with an exact total: each row keeps floor(keep_total / m) or one more
    of its highest scores (ties to the lower column index); the rows that keep one more are those whose
    next-best score is highest. When keep_total is a multiple of m this is exactly per-row top-k. By a
    partial selection (topk), not a full sort of every row: several times faster, the same mask (a test
    holds it equal to the sort, ties included)."""
    m, n = scores.shape
    base, extra = divmod(int(keep_total), m) if m else (0, 0)
    if base >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if base > 0:
        thr = torch.topk(scores, base, dim=1, sorted=False).values.amin(1, keepdim=True)  # base-th largest
        mask = scores >= thr
        over = (mask.sum(1) > base).nonzero().squeeze(1)
        if over.numel():  # ties at the threshold: the lowest columns first
            sc, th = scores[over], thr[over]
            tie = sc == th
            need = base - (sc > th).sum(1, keepdim=True)
            mask[over] = (sc > th) | (tie & (torch.cumsum(tie, 1) <= need))
    else:
        mask = torch.zeros_like(scores, dtype=torch.bool)
    if extra > 0:
        rest = scores.masked_fill(mask, -float("inf"))
        cand, col = rest.max(1)  # first maximal column: what a stable descending sort puts at `base`
        rows = torch.argsort(cand, descending=True, stable=True)[:extra]
        mask[rows, col[rows]] = True
    return mask


def parse_nm(nm) -> tuple[int, int] | None:
    if nm is None or nm in ("", "null", "none", "None"):
        return None
    try:
        n_str, m_str = str(nm).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError as e:
        raise GlrsError(f"nm must look like '2:4' (keep N of every M consecutive inputs) or null, not {nm!r}") from e
    if not 0 < n < m:
        raise GlrsError(f"nm {nm!r}: need 0 < N < M")
    return n, m


def check_nm_density(nm: tuple[int, int], density: float) -> None:
    n, m = nm
    if abs(density - n / m) > 1e-9:
        raise GlrsError(f"N:M sparsity {n}:{m} keeps exactly {n}/{m} = {n / m:g} of the weights, but the target "
                        f"density is {density:g}; set target_density to {n / m:g} or use unstructured sparsity (nm: null)")


def nm_mask(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive inputs (columns) of each row."""
    n, m = nm
    rows, cols = scores.shape
    if cols % m:
        raise GlrsError(f"N:M sparsity {n}:{m} needs the input dimension to be a multiple of {m}; got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)

