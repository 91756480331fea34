#!/usr/bin/env python
"""Per-stage wall time, peak memory and disk of a pipeline run, and a projection to Llama-3-70B (issues 12, 21).

Per Snakemake rule (results/bench/<rule>/**.tsv: wall seconds `s`, `max_rss` in MB; results/logs/<rule>/**.log:
the line `peak GPU memory N bytes` that `glrs` prints at the end of a job that used CUDA): jobs, wall_seconds
(sum over its jobs), max_job_seconds, peak_gpu_bytes and peak_rss_bytes (maxima over its jobs; null where no
job reported), disk_bytes (allocated bytes of the files under the rule's output folder, each inode once; files
hard-linked to the source checkpoint are counted as linked_bytes instead).

    python benchmarks/scale/collect.py --results results --source /path/to/llama8b --out scale_8b.json

The projection to Llama-3-70B (80 layers, hidden 8192, intermediate 28672, 64 heads / 8 KV heads) is
arithmetic on the measured costs, not a measurement, and says per stage what it scales with (`scales_with`):
  params      whole-model passes (prepare, Stage 2, materialise, evaluation): the parameter count;
  layer_n2    the activation statistics: layers x the sum of the n^2 of the four accumulated inputs (time,
              disk), its GPU peak the largest n^2 (one layer's float64 accumulators);
  layer_mn2   the per-layer realisation: layers x m n^2 of the MLP matrices (time; GPU peak per job the
              largest n^2 + m n);
  fixed       calibration (tokenising) and the small jobs.
`gpus` is ceil(projected peak GPU bytes / 80 GB) for a stage that holds its model on one GPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
from pathlib import Path

LLAMA_70B = {"layers": 80, "hidden": 8192, "intermediate": 28672, "vocab": 128256, "kv_heads": 8, "heads": 64,
             "tied_embeddings": False}
PEAK = re.compile(r"peak GPU memory (\d+) bytes")
OUTPUT_DIR = {"prepare_model": "model", "calibrate": "calib", "activations": "stats", "allocate": "alloc",
              "decompose": "rpca", "realise": "realise", "materialise": "compressed", "materialise_realised": "compressed",
              "evaluate_ppl": "metrics", "evaluate_zeroshot": "metrics"}
SCALES_WITH = {"prepare_model": "params", "allocate": "params", "materialise": "params",
               "materialise_realised": "params", "evaluate_ppl": "params", "compress": "params",
               "activations": "layer_n2", "realise": "layer_mn2", "decompose": "layer_mn2"}
GPU_BYTES = 80 * 10**9


def disk(path: Path, source_inodes: set) -> tuple[int, int]:
    """(allocated bytes, bytes hard-linked to the source) of the files under path, each inode once."""
    seen, own, linked = set(), 0, 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            if key in source_inodes:
                linked += st.st_size
            else:
                own += st.st_blocks * 512
    return own, linked


def inodes(path: Path | None) -> set:
    if path is None or not path.is_dir():
        return set()
    return {(st.st_dev, st.st_ino) for st in (os.lstat(p) for p in path.rglob("*") if p.is_file())}


def stages(results: Path, source: Path | None) -> dict:
    out = {}
    src = inodes(source)
    bench = results / "bench"
    for rule_dir in sorted(p for p in bench.iterdir() if p.is_dir()) if bench.is_dir() else []:
        rule = rule_dir.name
        secs, rss = [], []
        for tsv in rule_dir.rglob("*.tsv"):
            rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
            if rows:
                secs.append(float(rows[-1]["s"]))
                if rows[-1].get("max_rss") not in (None, "", "NA", "-"):
                    rss.append(float(rows[-1]["max_rss"]) * 2**20)
        gpu = [int(m.group(1)) for log in (results / "logs" / rule).rglob("*.log")
               for m in PEAK.finditer(log.read_text(errors="replace"))]
        rec = {"jobs": len(secs), "wall_seconds": round(sum(secs), 2), "max_job_seconds": max(secs, default=0),
               "peak_gpu_bytes": max(gpu) if gpu else None, "peak_rss_bytes": int(max(rss)) if rss else None}
        if rule in OUTPUT_DIR and (results / OUTPUT_DIR[rule]).is_dir():
            rec["disk_bytes"], linked = disk(results / OUTPUT_DIR[rule], src)
            if linked:
                rec["linked_bytes"] = linked
        out[rule] = rec
    return out


def shape_of(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    dtype = json.loads((model_dir / "glrs_manifest.json").read_text())["dtype"]
    return {"dtype": dtype, "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"],
            "vocab": cfg["vocab_size"], "kv_heads": cfg["num_key_value_heads"], "heads": cfg["num_attention_heads"],
            "tied_embeddings": bool(cfg.get("tie_word_embeddings", False))}


def parameters(s: dict) -> int:
    head = s["hidden"] // s["heads"]
    attn = 2 * s["hidden"] * s["hidden"] + 2 * s["hidden"] * s["kv_heads"] * head
    embeddings = (1 if s.get("tied_embeddings") else 2) * s["vocab"] * s["hidden"]
    return s["layers"] * (attn + 3 * s["hidden"] * s["intermediate"]) + embeddings


def _n2(s: dict) -> tuple[int, int]:
    """(sum over a layer's four accumulated inputs of n^2, the largest n^2)."""
    h, i = s["hidden"], s["intermediate"]
    o = s["heads"] * (h // s["heads"])
    return 2 * h * h + o * o + i * i, max(h, i, o) ** 2


def ratios(src: dict, dst: dict) -> dict:
    """scales_with -> (ratio of totals: time and disk, ratio of one job's peak memory)."""
    p = parameters(dst) / parameters(src)
    (sn, smax), (dn, dmax) = _n2(src), _n2(dst)
    mn2 = lambda s: s["hidden"] * s["intermediate"] ** 2  # noqa: E731
    per_job_mem = lambda s: max(s["hidden"], s["intermediate"]) ** 2 + s["hidden"] * s["intermediate"]  # noqa: E731
    return {"params": (p, p), "fixed": (1.0, 1.0),
            "layer_n2": (dst["layers"] * dn / (src["layers"] * sn), dmax / smax),
            "layer_mn2": (dst["layers"] * mn2(dst) / (src["layers"] * mn2(src)), per_job_mem(dst) / per_job_mem(src))}


def project(measured: dict, src: dict, dst: dict) -> dict:
    r = ratios(src, dst)
    out = {}
    for rule, m in measured.items():
        how = SCALES_WITH.get(rule, "fixed")
        total, mem = r[how]
        gpu = None if m["peak_gpu_bytes"] is None else int(m["peak_gpu_bytes"] * mem)
        rss_ratio = r["params"][1] if how in ("params", "layer_n2") else mem  # the activations job holds the model
        out[rule] = {"scales_with": how, "wall_seconds": round(m["wall_seconds"] * total, 1),
                     "peak_gpu_bytes": gpu, "gpus": None if gpu is None else max(1, math.ceil(gpu / GPU_BYTES)),
                     "peak_rss_bytes": None if m["peak_rss_bytes"] is None else int(m["peak_rss_bytes"] * rss_ratio),
                     "disk_bytes": None if m.get("disk_bytes") is None else int(m["disk_bytes"] * total)}
    return out


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # the record says why it is missing rather than failing the collection
        return f"unknown ({type(e).__name__})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results")
    ap.add_argument("--model-dir", help="the prepared model (default: the one folder under RESULTS/model)")
    ap.add_argument("--source", help="the source checkpoint (its size, and hard links into it, are reported)")
    ap.add_argument("--complete", default=None, help="snakemake's exit status (0: the run finished)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    results = Path(args.results)
    source = Path(args.source) if args.source else None
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None:
        found = sorted((results / "model").glob("*/config.json")) if (results / "model").is_dir() else []
        model_dir = found[-1].parent if found else source
    measured = stages(results, source)
    record = {"note": args.note, "device": device_name(), "complete": args.complete == "0",
              "snakemake_exit": args.complete, "gpu_memory_cap_gb": os.environ.get("GLRS_GPU_MEMORY_GB") or None,
              "stages": measured, "total_job_seconds": round(sum(m["wall_seconds"] for m in measured.values()), 1),
              "total_disk_bytes": sum(m.get("disk_bytes") or 0 for m in measured.values())}
    if source is not None and source.is_dir():
        record["source_bytes"] = disk(source, set())[0]
    if model_dir is not None and (model_dir / "config.json").is_file():
        shape = shape_of(model_dir)
        record |= {"shape": shape, "parameters": parameters(shape),
                   "projection_70b": {"shape": LLAMA_70B, "parameters": parameters(LLAMA_70B),
                                      "method": __doc__.split("The projection", 1)[1].strip(),
                                      "stages": project(measured, shape, LLAMA_70B)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: v for k, v in record.items() if k not in ("projection_70b", "shape")}, indent=1))


if __name__ == "__main__":
    main()
