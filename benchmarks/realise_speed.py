#!/usr/bin/env python
"""CAP's realisation (glrs.realise) on real layers: seconds and output errors, before and after the speed-up.

"before" is REALISE_VERSION 2, its refit frozen below: every row's least-squares system solved exactly
(float32 Cholesky factors refined to float64 accuracy). "after" is glrs.realise.realise_matrix as it is
in this checkout (version 3: the refit by conjugate gradients; the same GoDec). Version 1 -> 2 (GoDec by
subspace iteration, ~4x faster, errors within 0.5 %) was measured by this script's earlier version (git
history). Both run under glrs.conditions.pinned_threads(SOLVER_THREADS) (one thread), as the realise job
does, on the seven matrices of each layer with uniform budgets b = round(density*m*n).
For each layer it records seconds (total and per matrix), the activation-weighted output error of each
matrix after the refit (`error`, what realise writes into its metadata) and the relative change of
the mean error over the layer.

    python benchmarks/realise_speed.py                          # layers 0,12,29: ~3-4 min on 2 CPU cores
    python benchmarks/realise_speed.py --skip-before --layers 12

Inputs: --model-dir (a glrs-prepared HF dir) and --stats-dir (an activations job's output, one
layer_<i>.safetensors per layer); the defaults are the CPU demo's. Writes --out (default
results/benchmarks/realise_speed.json) atomically.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DEFAULT_MODEL = REPO / "results" / "model" / "f6bab58734d6"
DEFAULT_STATS = REPO / "results" / "stats" / "f6bab58734d6" / "69762eb07cff"


# ---- REALISE_VERSION 2, frozen: the exact refit (float32 Cholesky per row + refinement) -----------------

from glrs.errors import GlrsError  # noqa: E402

def _gather_block_v2(Hd: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[rows, k, k]: Hd[idx_i][:, idx_i] for each row of idx (two index_selects per row: faster than one
    advanced-indexing gather over the batch)."""
    rows, k = idx.shape
    out = torch.empty(rows, k, k, dtype=Hd.dtype, device=Hd.device)
    for i in range(rows):
        torch.index_select(torch.index_select(Hd, 0, idx[i]), 1, idx[i], out=out[i])
    return out


def _refit_v2(R: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, damp: float,
                 max_elements: int = 1 << 22, refine: int | None = 1) -> torch.Tensor:
    """The sparse matrix S supported on `mask` minimising tr((R - S) Hd (R - S)^T), Hd = H + delta I.

    Row i: S_i,O = Hd_OO^-1 (R_i Hd)_O. Rows are solved in batches padded to the largest support
    (padding rows/columns are the identity with a zero right-hand side). Each system is factored in
    float32 (Cholesky) and solved to float64 accuracy by `refine` steps of iterative refinement, the
    residual computed in float64 against the full Hd (x Hd, one matrix product per batch): with
    delta = damp * mean(diag H) the systems' condition numbers stay below ~1e5, so each step gains
    ~3 digits. A batch whose float32 factorisation fails is factored in float64 instead.
    `refine=None` factors everything in float64 (no refinement needed).
    """
    m, n = R.shape
    R = R.to(torch.float64)
    Hd = H.to(R.device, torch.float64).clone()
    Hd.diagonal().add_(damp * float(Hd.diagonal().mean()) if float(Hd.diagonal().mean()) > 0 else damp)
    counts = mask.sum(1)
    kmax = int(counts.max()) if m else 0
    S = torch.zeros_like(R)
    if kmax == 0:
        return S
    G = R @ Hd
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :kmax]  # support first, ascending
    valid = torch.arange(kmax, device=R.device).unsqueeze(0) < counts.unsqueeze(1)
    rows = max(1, max_elements // (kmax * kmax))
    Hf = Hd if refine is None else Hd.to(torch.float32)

    def factor(A, cnt):
        for c in torch.unique(cnt[cnt < kmax]).tolist():  # padding: identity rows/columns
            sel = (cnt == c).nonzero()  # [s, 1]
            pad = torch.arange(c, kmax, device=A.device)
            A[sel, pad.unsqueeze(0)] = 0  # rows c.. of the selected systems
            A[sel.unsqueeze(2), :, pad] = 0  # columns c..
            A[sel, pad, pad] = 1
        C, info = torch.linalg.cholesky_ex(A.mT)  # A is symmetric; its transpose view is already column-major
        return C, int(info.max()) == 0

    def solve(C, rhs):  # two triangular solves: several times faster than cholesky_solve on a batch
        y = torch.linalg.solve_triangular(C, rhs.to(C.dtype).unsqueeze(2), upper=False)
        return torch.linalg.solve_triangular(C.mT, y, upper=True).squeeze(2).to(torch.float64)

    for a in range(0, m, rows):
        idx, ok, cnt = order[a:a + rows], valid[a:a + rows], counts[a:a + rows]
        b = torch.where(ok, G[a:a + rows].gather(1, idx), 0.0)
        C, fine = factor(_gather_block_v2(Hf, idx), cnt)
        if fine and refine is not None:
            x = solve(C, b)
            for _ in range(refine):
                full = torch.zeros(idx.shape[0], n, dtype=torch.float64, device=R.device).scatter_(1, idx, x)
                res = torch.where(ok, b - (full @ Hd).gather(1, idx), 0.0)
                x += solve(C, res)
                x = torch.where(ok, x, 0.0)
        else:
            if Hf.dtype != torch.float64:
                C, fine = factor(_gather_block_v2(Hd, idx), cnt)
            if not fine:
                raise GlrsError("realise: a damped row system is not positive definite; raise realise.damp (e.g. 0.1)")
            x = solve(C, b)
        S[a:a + rows].scatter_(1, idx, torch.where(ok, x, 0.0))
    return S


def realise_matrix_v2(W, H, budget, params):
    """glrs.realise.realise_matrix with version 2's exact refit in place of version 3's conjugate gradients."""
    from glrs import realise

    exact = lambda R, mask, H, damp, iterations: _refit_v2(R, mask, H, damp)  # noqa: E731
    saved, realise.refit_sparse = realise.refit_sparse, exact
    try:
        return realise.realise_matrix(W, H, budget, params)
    finally:
        realise.refit_sparse = saved


# ---- the benchmark --------------------------------------------------------------------------------

def run_layer(fn, weights, H, density, params) -> dict:
    per, t_all = {}, time.perf_counter()
    for short, W in weights.items():
        t0 = time.perf_counter()
        out = fn(W, H[short], int(round(density * W.numel())), params)
        rec = out[1] if isinstance(out, tuple) else out
        per[short] = {"shape": list(W.shape), "rank": rec["rank"], "nnz": rec["nnz"],
                      "seconds": round(time.perf_counter() - t0, 3),
                      "error_before_refit": rec["error_before_refit"], "error": rec["error"]}
    return {"seconds": round(time.perf_counter() - t_all, 3), "matrices": per,
            "mean_error": sum(p["error"] for p in per.values()) / len(per)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL))
    ap.add_argument("--stats-dir", default=str(DEFAULT_STATS))
    ap.add_argument("--layers", default="0,12,29")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--skip-before", action="store_true", help="time only glrs as it is")
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "realise_speed.json"))
    args = ap.parse_args()

    from glrs import conditions, modelio, realise, stats
    from glrs.cas import write_json_atomic

    params = realise.resolve_params({})
    rows = []
    with conditions.pinned_threads(conditions.SOLVER_THREADS) as threads:
        for layer in [int(x) for x in args.layers.split(",")]:
            weights = modelio.read_layer(args.model_dir, layer)
            H = stats.read_layer(stats.layer_file(args.stats_dir, layer))
            row = {"layer": layer, "density": args.density}
            impls = ([] if args.skip_before else [("before", realise_matrix_v2)]) + [("after", realise.realise_matrix)]
            for label, fn in impls:
                row[label] = run_layer(fn, weights, H, args.density, params)
                errs = " ".join(f"{s} {p['error']:.4g}" for s, p in row[label]["matrices"].items())
                print(f"layer {layer:2d} {label:6s} {row[label]['seconds']:7.2f} s  mean error "
                      f"{row[label]['mean_error']:.5g}  ({errs})", flush=True)
            if "before" in row:
                b, a = row["before"], row["after"]
                rel = [a["matrices"][s]["error"] / b["matrices"][s]["error"] - 1 for s in b["matrices"]]
                row["speedup"] = round(b["seconds"] / a["seconds"], 2)
                row["mean_error_change"] = a["mean_error"] / b["mean_error"] - 1
                row["mean_of_per_matrix_error_change"] = sum(rel) / len(rel)
                row["max_per_matrix_error_change"] = max(rel)
                print(f"layer {layer:2d}: {row['speedup']}x faster, mean error {row['mean_error_change']:+.2%}, "
                      f"per-matrix change mean {row['mean_of_per_matrix_error_change']:+.2%} "
                      f"max {row['max_per_matrix_error_change']:+.2%}", flush=True)
            rows.append(row)
    write_json_atomic(args.out, {
        "rows": rows, "device": "cpu", "threads": threads, "host": platform.node(), "cpus": os.cpu_count(),
        "realise_version": realise.REALISE_VERSION, "params": params, "conditions": conditions.current("cpu"),
        "model_dir": args.model_dir, "stats_dir": args.stats_dir,
        "note": "seconds are wall time on a possibly shared machine; budgets uniform, round(density*m*n) per matrix"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
