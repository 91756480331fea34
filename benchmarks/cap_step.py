#!/usr/bin/env python
"""Seconds per CAP Stage-2 step (issue 11), the default budget policy, on a prepared model.

A step is `pairs_per_step` mirrored pairs (default 4), each two forward passes of one calibration
window through the model whose target matrices keep their top Wanda scores at the sampled budgets
(glrs/cap/budget.py); the record also gives seconds per forward pass. Runs
`glrs.cap.budget.learn_budgets` for --steps steps on --device and records wall seconds per step
(the model load and the surrogate's set-up excluded: timed separately). One record per device is
kept in --out (default results/benchmarks/cap_step.json); a rerun on a device replaces its record.

    python benchmarks/cap_step.py --model-dir results/model/<key> --stats-dir results/stats/<key>/<key> \\
        --calib results/calib/<key>/<key>.safetensors            # ~1-2 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from glrs import cas, modelio, pipeline, stats
    from glrs.cap import budget as cap_budget
    from glrs.cap import resolve_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--stats-dir", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "cap_step.json"))
    a = ap.parse_args()

    manifest = json.loads((Path(a.model_dir) / modelio.MANIFEST).read_text())
    layers = list(range(int(manifest["num_layers"])))
    names, lay, shapes, Hd = [], [], [], []
    from safetensors import safe_open

    with safe_open(str(Path(a.model_dir) / "model.safetensors"), "pt") as f:
        for layer in layers:
            H = stats.read_layer(stats.layer_file(a.stats_dir, layer))
            for short in modelio.TARGETS:
                name = modelio.weight_name(layer, short)
                names.append(name), lay.append(layer), Hd.append(torch.diagonal(H[short]).float().clone())
                shapes.append(tuple(f.get_slice(name).get_shape()))
    calib = pipeline.load_calibration(a.calib)[:, : a.seqlen]
    budget = round(0.5 * sum(m * n for m, n in shapes))
    params = resolve_params({"max_steps": a.steps, "epochs": a.steps})
    dev = torch.device(a.device)

    def timed(steps: int) -> float:
        t0 = time.perf_counter()
        cap_budget.learn_budgets(names, lay, shapes, budget, params | {"max_steps": steps}, 0, a.model_dir, calib, Hd, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(1)  # warm-up: first CUDA kernels, file cache
    short, total = timed(1), timed(1 + a.steps)
    per_step = (total - short) / a.steps  # set-up (load, ranks, two probe losses) cancels
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    forwards = 2 * params["pairs_per_step"]
    rec = {"device": device, "policy": "budget", "tokens_per_forward": int(calib.shape[1]),
           "forwards_per_step": forwards, "steps": a.steps, "seconds_per_step": round(per_step, 3),
           "seconds_per_forward": round(per_step / forwards, 3), "seconds_total": round(total, 2),
           "torch": torch.__version__}
    out = Path(a.out)
    records = json.loads(out.read_text())["records"] if out.exists() else []
    records = [r for r in records if r["device"] != device] + [rec]
    cas.write_json_atomic(out, {"benchmark": "cap_step", "records": records})
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
