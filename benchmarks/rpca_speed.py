#!/usr/bin/env python
"""RPCA speed: glrs.rpca.rpca (fast SVT) versus the textbook inexact ALM with a full SVD per iteration.

Both solvers run the same algorithm (Lin, Chen & Ma 2010) with the same lambda, mu_0, rho and
tolerance; they differ only in how each iteration's singular value threshold is computed, so they
take the same iterations to the same residual and rank. The textbook one is slow: on the large
shapes it runs for at most --ref-budget seconds (at least --ref-min-iters iterations), and its time
to convergence is extrapolated from the measured per-iteration time and the iteration count of our
solver; every such case says so ("ref_extrapolated": true) and records both solvers' residuals over
the iterations the textbook did run, which must agree (same arithmetic up to rounding). Smaller
shapes (--full-shapes) run the textbook solver to completion to check final residual and rank.

Cases: synthetic low-rank + sparse matrices with LLaMA-7B shapes (rank = 5% of the short side,
5% of the entries corrupted by uniform noise in [-5, 5] against N(0, 1) low-rank entries), and
with --model-dir, real weight matrices of one layer of a model (a glrs-prepared checkpoint or any
Hugging Face safetensors directory).

    python benchmarks/rpca_speed.py                       # CUDA: 7B shapes, float32 and float64 (~4-6 min on one H100)
    python benchmarks/rpca_speed.py --small --device cpu  # quick local check (~2-4 min on 2 CPU cores)

Writes --out (default results/benchmarks/rpca_speed.json) atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from glrs import rpca  # noqa: E402
from glrs.cas import write_json_atomic  # noqa: E402

LLAMA7B_SHAPES = ["4096x4096", "4096x11008", "11008x4096"]
SMALL_SHAPES = ["256x256", "256x688", "688x256"]


def parse_shape(s: str) -> tuple[int, int]:
    m, n = s.lower().split("x")
    return int(m), int(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(m: int, n: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
              rank_frac: float = 0.05, corrupt_frac: float = 0.05):
    """W = L0 + S0: rank round(rank_frac * min(m, n)), N(0, 1) entries; corrupt_frac of entries + U[-5, 5]."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = max(1, round(rank_frac * min(m, n)))
    X = torch.randn(m, r, generator=g, device=device, dtype=torch.float64)
    Yt = torch.randn(r, n, generator=g, device=device, dtype=torch.float64)
    L0 = (X @ Yt) / math.sqrt(r)
    support = torch.rand(m, n, generator=g, device=device) < corrupt_frac
    S0 = torch.where(support, 10 * (torch.rand(m, n, generator=g, device=device, dtype=torch.float64) - 0.5),
                     torch.zeros((), device=device, dtype=torch.float64))
    return (L0 + S0).to(dtype), L0, S0, r


def real_matrices(model_dir: str, layer: int, shorts: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from glrs import modelio

    d = Path(model_dir)
    if (d / modelio.MANIFEST).is_file():
        weights = modelio.read_layer(d, layer)
        return {s: weights[s] for s in shorts}
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for s in shorts:
                name = modelio.weight_name(layer, s)
                if name in sf.keys():
                    out[s] = sf.get_tensor(name)
    missing = set(shorts) - set(out)
    if missing:
        raise SystemExit(f"{model_dir}: no tensors for {sorted(missing)} in layer {layer}")
    return out


class Recorder:
    """rpca callback: timestamps and residuals per iteration; stops after a time budget."""

    def __init__(self, device: torch.device, budget: float | None = None, min_iters: int = 1):
        self.device, self.budget, self.min_iters = device, budget, min_iters
        self.times: list[float] = []
        self.residuals: list[float] = []
        self.t0 = 0.0

    def start(self) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def __call__(self, it: int, residual: float) -> bool:
        sync(self.device)
        self.times.append(time.perf_counter() - self.t0)
        self.residuals.append(residual)
        return self.budget is not None and it >= self.min_iters and self.times[-1] >= self.budget


def solve(W, dtype, device, tol, max_iter, *, full_svd=False, svt_method="auto", budget=None, min_iters=1):
    rec = Recorder(device, budget, min_iters)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rec.start()
    res = rpca.rpca(W, tol=tol, max_iter=max_iter, dtype=dtype, device=device, full_svd=full_svd,
                    svt_method=svt_method, callback=rec)
    sync(device)
    seconds = time.perf_counter() - rec.t0
    out = {
        "seconds": seconds,
        "iterations": res.iterations,
        "residual": res.residual,
        "converged": res.converged,
        "rank": int(res.sigma.numel()),
        "nnz": int((res.S != 0).sum()),
        "residual_history": rec.residuals,
        "iteration_end_seconds": rec.times,
    }
    if not full_svd:
        out["svt_stats"] = res.stats
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return res, out


def extrapolate(ref: dict, iterations: int) -> float:
    """Seconds the textbook solver would take for `iterations`: measured set-up + first iteration,
    then the mean of the later iterations it ran (or the first iteration's time halved: it includes
    the textbook's norm(W, 2), one more SVD)."""
    t = ref["iteration_end_seconds"]
    per_iter = (t[-1] - t[0]) / (len(t) - 1) if len(t) >= 2 else t[0] / 2
    return t[0] + per_iter * (iterations - 1)


def run_case(name: str, W: torch.Tensor, dtype, device, tol, args, truth=None, run_ref_to_end=False,
             deadline: float | None = None) -> dict:
    case = {"case": name, "shape": list(W.shape), "dtype": str(dtype).replace("torch.", ""), "tol": tol}
    if truth is not None:
        L0, S0, r = truth
        case["true_rank"] = r
        case["true_nnz"] = int((S0 != 0).sum())
    ours = {}
    for method in args.ours:
        res, info = solve(W, dtype, device, tol, args.max_iter, svt_method=method)
        if truth is not None:
            info["rel_err_L"] = float(torch.linalg.norm(res.L.double() - L0) / torch.linalg.norm(L0))
            info["rel_err_S"] = float(torch.linalg.norm(res.S.double() - S0) / torch.linalg.norm(S0))
        ours[method] = info
        del res
        print(f"  ours[{method}] {name} {case['dtype']}: {info['seconds']:.2f} s, {info['iterations']} it, "
              f"residual {info['residual']:.2e}, rank {info['rank']}, svt {info['svt_stats'].get('svt')}", flush=True)
    case["ours"] = ours
    main = ours[args.ours[0]]
    if deadline is not None and time.monotonic() > deadline:
        case["ref"] = {"skipped": "the benchmark's overall time limit (--max-minutes) was reached"}
        return case
    budget = 4 * args.ref_budget if run_ref_to_end else args.ref_budget
    # The textbook solver may need an iteration or two more in float32 (its SVD is less accurate).
    ref_max_iter = args.max_iter if run_ref_to_end else main["iterations"] + 3
    _, ref = solve(W, dtype, device, tol, ref_max_iter, full_svd=True, budget=budget, min_iters=args.ref_min_iters)
    finished = ref["converged"] or ref["iterations"] >= ref_max_iter
    case["ref"] = ref
    case["ref_extrapolated"] = not finished
    if finished:
        case["ref_seconds"] = ref["seconds"]
        case["equal_rank"] = ref["rank"] == main["rank"]
        case["equal_iterations"] = ref["iterations"] == main["iterations"]
    else:
        case["ref_seconds"] = extrapolate(ref, main["iterations"])
        case["ref_note"] = (f"textbook solver stopped after {ref['iterations']} of {main['iterations']} iterations "
                            f"({ref['seconds']:.1f} s, budget {args.ref_budget} s); ref_seconds extrapolated from its "
                            "per-iteration time to our solver's iteration count")
    k = min(len(ref["residual_history"]), len(main["residual_history"]))
    diffs = [abs(a - b) / max(abs(b), 1e-300) for a, b in zip(main["residual_history"][:k], ref["residual_history"][:k])]
    case["residual_history_max_rel_diff"] = max(diffs) if diffs else None
    case["speedup"] = case["ref_seconds"] / main["seconds"]
    print(f"  ref {name} {case['dtype']}: {ref['seconds']:.2f} s for {ref['iterations']} it"
          f"{' (extrapolated to %.1f s)' % case['ref_seconds'] if case['ref_extrapolated'] else ''}; "
          f"speedup {case['speedup']:.1f}x", flush=True)
    return case


def time_op(fn, device, repeat=1) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeat


def primitives(device: torch.device, a: int, b: int, k: int) -> dict:
    """Times of the building blocks, to see where an SVT spends its time on this device."""
    g = torch.Generator(device=device).manual_seed(1)
    A64 = torch.randn(a, b, generator=g, device=device, dtype=torch.float64)
    G64 = A64 @ A64.T
    Q = torch.randn(a, k, generator=g, device=device, dtype=torch.float64)
    out = {
        f"gemm_f64_{a}x{b}x{k}": time_op(lambda: A64.T @ Q, device, 5),
        f"gram_f64_{a}x{b}": time_op(lambda: A64 @ A64.T, device, 2),
        f"qr_f64_{a}x{k}": time_op(lambda: torch.linalg.qr(Q), device, 3),
        f"eigh_f64_{k}": time_op(lambda: torch.linalg.eigh(Q.T @ Q), device, 3),
        f"eigh_f64_{a}": time_op(lambda: torch.linalg.eigh(G64), device, 1),
        f"eigh_f32_{a}": time_op(lambda: torch.linalg.eigh(G64.float()), device, 1),
        f"svd_f32_{a}x{b}": time_op(lambda: torch.linalg.svd(A64.float(), full_matrices=False), device, 1),
    }
    return {key: round(v, 5) for key, v in out.items()}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "host_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["preferred_linalg_library"] = str(torch.backends.cuda.preferred_linalg_library())
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="small shapes (quick CPU check)")
    p.add_argument("--shapes", help="comma-separated MxN (default: LLaMA-7B shapes, or small ones with --small)")
    p.add_argument("--full-shapes", help="shapes on which the textbook solver runs to completion "
                   "(default 1024x2752 on CUDA, 128x344 with --small)")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--tol64", type=float, default=1e-7, help="tolerance for float64 runs (the pipeline default)")
    p.add_argument("--tol32", type=float, default=1e-6,
                   help="tolerance for float32 runs: the textbook solver's float32 SVD cannot reach 1e-7")
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--ours", default="auto", help="our SVT variants to time, comma-separated (auto, gram, subspace); "
                   "the first is compared with the textbook solver")
    p.add_argument("--ref-budget", type=float, default=25.0, help="seconds the textbook solver may run per large case")
    p.add_argument("--ref-min-iters", type=int, default=2)
    p.add_argument("--max-minutes", type=float, default=5.5, help="skip remaining textbook runs after this")
    p.add_argument("--model-dir", help="also decompose real weights of this model (prepared or HF safetensors dir)")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--matrices", default="q,down", help="which of q,k,v,o,gate,up,down (with --model-dir)")
    p.add_argument("--no-primitives", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "rpca_speed.json"))
    args = p.parse_args(argv)
    args.ours = [m.strip() for m in args.ours.split(",") if m.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu --small")
    shapes = [parse_shape(s) for s in (args.shapes.split(",") if args.shapes else (SMALL_SHAPES if args.small else LLAMA7B_SHAPES))]
    full_default = "128x344" if args.small else "1024x2752"
    full_shapes = [parse_shape(s) for s in (args.full_shapes or full_default).split(",") if s]
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    tols = {torch.float32: args.tol32, torch.float64: args.tol64}
    start = time.monotonic()
    deadline = start + 60 * args.max_minutes

    report = {
        "benchmark": "rpca_speed",
        "rpca_version": rpca.RPCA_VERSION,
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "what": "ours = glrs.rpca.rpca (fast SVT in float64, iterates in dtype); ref = the same inexact ALM with "
                "torch.linalg.svd per iteration in dtype (the textbook, full_svd=True). speedup = ref_seconds / "
                "ours seconds. ref_extrapolated: the textbook run was cut at the time budget and its time to "
                "convergence extrapolated (see ref_note).",
        "cases": [],
    }
    # warm-up: CUDA context, cuBLAS/cuSOLVER handles, kernels
    Ww, *_ = synthetic(96, 160, torch.float64, device)
    rpca.rpca(Ww, device=device, svt_method="subspace")
    rpca.rpca(Ww, device=device, svt_method="gram")
    rpca.rpca(Ww, device=device, full_svd=True, max_iter=3)
    if not args.no_primitives:
        a, b = shapes[0] if args.small else (4096, 11008)
        report["primitives_seconds"] = primitives(device, min(a, b), max(a, b), max(16, round(0.1 * min(a, b))))
        print("primitives:", report["primitives_seconds"], flush=True)

    def save():
        report["total_seconds"] = time.monotonic() - start
        write_json_atomic(args.out, report)

    for (m, n) in full_shapes:
        for dtype in dtypes:
            W, L0, S0, r = synthetic(m, n, dtype, device)
            print(f"[full] synthetic {m}x{n} {dtype}", flush=True)
            report["cases"].append(run_case(f"synthetic-{m}x{n}-full", W, dtype, device, tols[dtype], args,
                                            (L0, S0, r), run_ref_to_end=True, deadline=deadline))
            del W, L0, S0
            save()
    for (m, n) in shapes:
        for dtype in dtypes:
            W, L0, S0, r = synthetic(m, n, dtype, device)
            print(f"synthetic {m}x{n} {dtype}", flush=True)
            report["cases"].append(run_case(f"synthetic-{m}x{n}", W, dtype, device, tols[dtype], args,
                                            (L0, S0, r), deadline=deadline))
            del W, L0, S0
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    if args.model_dir:
        mats = real_matrices(args.model_dir, args.layer, [s.strip() for s in args.matrices.split(",")])
        for short, W in mats.items():
            for dtype in dtypes:
                print(f"real {short} {tuple(W.shape)} {dtype}", flush=True)
                case = run_case(f"real-layer{args.layer}-{short}", W.to(device), dtype, device, tols[dtype], args,
                                deadline=deadline)
                case["model_dir"] = str(args.model_dir)
                report["cases"].append(case)
                save()
    speedups = [c["speedup"] for c in report["cases"] if "speedup" in c]
    report["summary"] = {
        "min_speedup": min(speedups) if speedups else None,
        "all_equal_rank_where_ref_finished": all(c.get("equal_rank", True) for c in report["cases"]),
        "cases": [{"case": c["case"], "dtype": c["dtype"], "ours_s": round(c["ours"][args.ours[0]]["seconds"], 3),
                   "ref_s": round(c["ref_seconds"], 2) if "ref_seconds" in c else None,
                   "extrapolated": c.get("ref_extrapolated"), "speedup": round(c["speedup"], 1) if "speedup" in c else None,
                   "iterations": c["ours"][args.ours[0]]["iterations"], "rank": c["ours"][args.ours[0]]["rank"],
                   "ref_rank": c["ref"].get("rank"), "residual": c["ours"][args.ours[0]]["residual"],
                   "ref_residual": c["ref"].get("residual")} for c in report["cases"]],
    }
    save()
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out} ({report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
