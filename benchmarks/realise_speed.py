#!/usr/bin/env python
"""CAP's realisation (glrs.realise) on real layers: seconds and output errors, before and after the speed-up.

"before" is REALISE_VERSION 1 as it was, frozen below: GoDec with a full eigendecomposition of the
Gram matrix for every best rank-r step (glrs.methods.oats.oats_decompose, float64), row top-k by a
full argsort, and the refit by float64 Cholesky per row. "after" is glrs.realise.realise_matrix as it
is in this checkout. Both run under glrs.conditions.pinned_threads(SOLVER_THREADS) (one thread), as
the realise job does, on the seven matrices of each layer with uniform budgets b = round(density*m*n).
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


# ---- REALISE_VERSION 1, frozen -------------------------------------------------------------------

def _refit_v1(R, mask, H, damp, max_elements=1 << 26):
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
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :kmax]
    valid = torch.arange(kmax, device=R.device).unsqueeze(0) < counts.unsqueeze(1)
    rows = max(1, max_elements // (kmax * kmax))
    eye = torch.eye(kmax, dtype=torch.float64, device=R.device)
    for a in range(0, m, rows):
        idx, ok = order[a:a + rows], valid[a:a + rows]
        both = ok.unsqueeze(2) & ok.unsqueeze(1)
        A = torch.where(both, Hd[idx.unsqueeze(2), idx.unsqueeze(1)], eye)
        b = torch.where(ok, G[a:a + rows].gather(1, idx), 0.0).unsqueeze(2)
        C, info = torch.linalg.cholesky_ex(A)
        assert int(info.max()) == 0
        x = torch.cholesky_solve(b, C).squeeze(2)
        S[a:a + rows].scatter_(1, idx, torch.where(ok, x, 0.0))
    return S


def realise_matrix_v1(W, H, budget, params):
    from glrs.methods.oats import oats_decompose
    from glrs.realise import output_error, split_budget

    m, n = W.shape
    rank, nnz = split_budget((m, n), budget, float(params["rank_ratio"]))
    W64 = W.to(torch.float64)
    H = H.to(W.device, torch.float64)
    col_norm = torch.diagonal(H).clamp_min(0).sqrt()
    _, mask, _, f = oats_decompose(W64, col_norm, rank, nnz, int(params["iterations"]), torch.float64)
    L = (f["U"] * f["sigma"]) @ f["V"].T
    before = output_error(W64, L + (W64 - L) * mask, H) if nnz else output_error(W64, L, H)
    S = _refit_v1(W64 - L, mask, H, float(params["damp"]))
    index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    return {"rank": rank, "nnz": int(index.numel()), "error_before_refit": before,
            "error": output_error(W64, L + S, H)}


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
            impls = ([] if args.skip_before else [("before", realise_matrix_v1)]) + [("after", realise.realise_matrix)]
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
