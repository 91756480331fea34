#!/usr/bin/env python
"""Check glrs.gpuslots on a real multi-GPU host: concurrent jobs land on distinct GPUs.

Starts --jobs worker processes (default: 2 per visible GPU) that each take a slot with
glrs.gpuslots.device_slot("auto"), allocate on it, hold it for --hold seconds and report. Passes if
no two workers ever held the same GPU at once and every GPU was used. No Slurm job id may be set
(inside Slurm no locks are taken, by design).

    python benchmarks/gpu_slots_check.py            # ~10 s on a 2-GPU host
    python benchmarks/gpu_slots_check.py --out $OUT/gpu_slots.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def worker(lock_dir: str, hold: float, q) -> None:
    import torch

    from glrs import gpuslots

    with gpuslots.device_slot("auto", lock_dir) as dev:
        t0 = time.time()
        x = torch.ones(1024, 1024, device=dev)
        uuid = str(torch.cuda.get_device_properties(dev).uuid) if dev.startswith("cuda") else "cpu"
        time.sleep(hold)
        float(x.sum())
        q.put({"pid": os.getpid(), "device": dev, "uuid": uuid, "start": t0, "end": time.time()})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int)
    p.add_argument("--hold", type=float, default=2.0)
    p.add_argument("--out")
    args = p.parse_args()
    os.environ.pop("SLURM_JOB_ID", None)
    import torch

    n = torch.cuda.device_count()
    jobs = args.jobs or max(2, 2 * n)
    lock_dir = tempfile.mkdtemp(prefix="glrs-gpu-locks-check-")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(lock_dir, args.hold, q)) for _ in range(jobs)]
    for pr in procs:
        pr.start()
    rows = [q.get(timeout=600) for _ in procs]
    for pr in procs:
        pr.join()
    overlaps = [(a["pid"], b["pid"], a["uuid"]) for i, a in enumerate(rows) for b in rows[i + 1:]
                if a["uuid"] == b["uuid"] and a["uuid"] != "cpu" and a["start"] < b["end"] and b["start"] < a["end"]]
    used = sorted({r["uuid"] for r in rows})
    result = {"gpus_visible": n, "jobs": jobs, "gpus_used": len(used), "overlapping_holders": overlaps,
              "ok": not overlaps and (n == 0 or len(used) == n), "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
