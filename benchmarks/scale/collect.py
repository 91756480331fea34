#!/usr/bin/env python
"""Per-stage wall time and peak memory of a pipeline run, and a projection to a larger model (issue 12).

Reads Snakemake's benchmark files (results/bench/<rule>/**.tsv: wall seconds `s`, `max_rss` in MB) and the
jobs' logs (results/logs/<rule>/**.log: the line `peak GPU memory N bytes` that `glrs` prints at the end
of a job that used CUDA). Per rule: jobs, wall_seconds (sum over its jobs), max_job_seconds,
peak_gpu_bytes and peak_rss_bytes (maxima over its jobs; null where no job reported).

    python benchmarks/scale/collect.py --results results --model-dir results/model/<key> \
        --out results/benchmarks/scale_8b.json --note "one H200, ..."

The projection to Llama-70B shapes (80 layers, hidden 8192, intermediate 28672) is arithmetic, not a
measurement, and says how it was made: stages that stream the weights (prepare, activations, Stage 2,
materialise, evaluation) scale with the parameter count; the per-layer jobs (decompose, realise) with
the layer count times the per-layer cost of their largest products, m n^2 of the MLP matrices.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

LLAMA_70B = {"layers": 80, "hidden": 8192, "intermediate": 28672, "vocab": 128256, "kv_heads": 8, "heads": 64}
PER_LAYER_RULES = {"decompose", "realise"}
PEAK = re.compile(r"peak GPU memory (\d+) bytes")


def stages(results: Path) -> dict:
    out = {}
    for rule_dir in sorted(p for p in (results / "bench").iterdir() if p.is_dir()):
        rule = rule_dir.name
        secs, rss = [], []
        for tsv in rule_dir.rglob("*.tsv"):
            rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
            if rows:
                secs.append(float(rows[-1]["s"]))
                rss.append(float(rows[-1]["max_rss"]) * 2**20 if rows[-1]["max_rss"] not in ("", "NA") else None)
        gpu = [int(m.group(1)) for log in (results / "logs" / rule).rglob("*.log")
               for m in PEAK.finditer(log.read_text(errors="replace"))]
        rss = [r for r in rss if r is not None]
        out[rule] = {"jobs": len(secs), "wall_seconds": round(sum(secs), 2), "max_job_seconds": max(secs, default=0),
                     "peak_gpu_bytes": max(gpu) if gpu else None, "peak_rss_bytes": int(max(rss)) if rss else None}
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


def project(measured: dict, src: dict, dst: dict) -> dict:
    p_ratio = parameters(dst) / parameters(src)
    layer_ratio = dst["layers"] / src["layers"] * (dst["hidden"] * dst["intermediate"] ** 2) / (src["hidden"] * src["intermediate"] ** 2)
    out = {}
    for rule, m in measured.items():
        ratio = layer_ratio if rule in PER_LAYER_RULES else p_ratio
        out[rule] = {"wall_seconds": round(m["wall_seconds"] * ratio, 1), "scale": round(ratio, 2),
                     "peak_gpu_bytes": None if m["peak_gpu_bytes"] is None else int(
                         m["peak_gpu_bytes"] * (p_ratio if rule not in PER_LAYER_RULES else p_ratio * src["layers"] / dst["layers"]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results")
    ap.add_argument("--model-dir", required=True, help="the prepared model's directory (its config.json gives the shape)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    measured = stages(Path(args.results))
    shape = shape_of(Path(args.model_dir))
    record = {"note": args.note, "shape": shape, "parameters": parameters(shape), "stages": measured,
              "total_job_seconds": round(sum(m["wall_seconds"] for m in measured.values()), 1),
              "projection_70b": {"shape": LLAMA_70B, "parameters": parameters(LLAMA_70B),
                                 "method": "streaming stages x parameter ratio; per-layer jobs x layers x m n^2 ratio",
                                 "stages": project(measured, shape, LLAMA_70B)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: v for k, v in record.items() if k != "projection_70b"}, indent=1))


if __name__ == "__main__":
    main()
