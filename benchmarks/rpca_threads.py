#!/usr/bin/env python
"""Stage 1's bytes versus the CPU thread count (issue 13).

For each thread count (default 1, 2, 4) a fresh process, started with OMP_NUM_THREADS and
torch.set_num_threads at that count as a Snakemake job would be, decomposes
- a 576 x 1536 matrix (SmolLM2's MLP shape; low rank + noise from a seeded torch.Generator),
  to the default tolerance, and
- one whole layer of a prepared model (seven matrices; --model-dir, default: the embedded
  SmolLM2-135M, prepared into --work on first use) through glrs.pipeline.decompose_layer,
twice: "pinned" (glrs as it is: the solver runs at glrs.conditions.SOLVER_THREADS) and
"unpinned" (threads=None: the solver uses the process's thread count, as before the fix).
It records the sha256 of the results and the seconds each took.

    python benchmarks/rpca_threads.py                       # ~5-15 min on 2 CPU cores
    python benchmarks/rpca_threads.py --skip-layer          # the matrix only (~1-2 min)

Writes --out (default results/benchmarks/rpca_threads.json) atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARAMS = {"lambda_scale": 1.0, "tol": 1e-7, "max_iter": 500, "rho": 1.5, "mu_factor": 1.25, "dtype": "float64"}


def _hash(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def worker(what: str, mode: str, model_dir: str | None, layer: int) -> dict:
    import torch

    from glrs import modelio, pipeline, rpca

    threads = None if mode == "unpinned" else rpca.SOLVER_THREADS
    t0 = time.perf_counter()
    if what == "matrix":
        g = torch.Generator().manual_seed(0)
        W = (0.02 * (torch.randn(576, 24, generator=g) @ torch.randn(24, 1536, generator=g))
             + 0.02 * torch.randn(576, 1536, generator=g)).float()
        res = rpca.rpca(W, tol=PARAMS["tol"], max_iter=PARAMS["max_iter"], threads=threads)
        values, index = rpca.sort_sparse(res.S)
        digest = _hash([res.U, res.sigma, res.V, values, index])
        extra = {"iterations": res.iterations, "rank": int(res.sigma.numel())}
    elif mode == "pinned":
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "layer.safetensors"
            meta = pipeline.decompose_layer(model_dir, layer, PARAMS, str(out), "cpu")
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
        extra = {"iterations": {k: m["iterations"] for k, m in meta["matrices"].items()}, "file_sha256": True}
    else:  # the layer as glrs computed it before the fix: each matrix at the process's thread count
        parts, its = [], {}
        for short, W in modelio.read_layer(model_dir, layer).items():
            lam = PARAMS["lambda_scale"] * rpca.default_lambda(tuple(W.shape))
            res = rpca.rpca(W, lam=lam, tol=PARAMS["tol"], max_iter=PARAMS["max_iter"], rho=PARAMS["rho"],
                            mu_factor=PARAMS["mu_factor"], dtype=torch.float64, threads=None)
            values, index = rpca.sort_sparse(res.S)
            parts += [res.U.float(), res.sigma.float(), res.V.float(), values.float(), index]
            its[short] = res.iterations
        digest = _hash(parts)
        extra = {"iterations": its}
    return {"sha256": digest, "seconds": round(time.perf_counter() - t0, 3), "torch_threads": torch.get_num_threads(), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--model-dir", help="a glrs-prepared checkpoint (default: the embedded model, prepared into --work)")
    ap.add_argument("--work", default=str(REPO / "results" / "benchmarks" / "work"))
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "rpca_threads.json"))
    ap.add_argument("--worker", nargs=2, metavar=("WHAT", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.model_dir, args.layer)))
        return

    model_dir = args.model_dir
    if not args.skip_layer and model_dir is None:
        from glrs.modelio import EMBEDDED_DEFAULT, prepare_model

        model_dir = str(Path(args.work) / "smollm2-135m")
        if not Path(model_dir).is_dir():
            prepare_model(EMBEDDED_DEFAULT, model_dir)
    counts = [int(t) for t in args.threads.split(",")]
    cases = [("matrix", "576x1536")] + ([] if args.skip_layer else [("layer", f"layer {args.layer} of {model_dir}")])
    rows = []
    for what, label in cases:
        for mode in ("pinned", "unpinned"):
            for t in counts:
                env = dict(os.environ, OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
                cmd = [sys.executable, __file__, "--worker", what, mode, "--layer", str(args.layer)]
                if model_dir:
                    cmd += ["--model-dir", model_dir]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({"case": what, "label": label, "mode": mode, "threads": t, **r})
                print(f"{what:6} {mode:8} threads {t}: {r['seconds']:8.2f} s  sha256 {r['sha256'][:16]}", flush=True)
    summary = {}
    for what, _ in cases:
        for mode in ("pinned", "unpinned"):
            sel = [r for r in rows if r["case"] == what and r["mode"] == mode]
            summary[f"{what}_{mode}"] = {"identical_across_threads": len({r["sha256"] for r in sel}) == 1,
                                         "seconds": {r["threads"]: r["seconds"] for r in sel}}
            print(f"{what} {mode}: identical across {counts} threads: {summary[f'{what}_{mode}']['identical_across_threads']}")
    import torch

    from glrs import conditions
    from glrs.cas import write_json_atomic

    write_json_atomic(args.out, {"rows": rows, "summary": summary, "host": platform.node(), "cpus": os.cpu_count(),
                                 "conditions": conditions.current("cpu"), "params": PARAMS,
                                 "note": "seconds are wall time on a possibly shared machine"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
