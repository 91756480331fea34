#!/usr/bin/env python
"""Write profiles/slurm's `set-resources` (every rule's memory, time, CPUs and GPU) from a measured run.

    python benchmarks/scale/slurm_resources.py            # rewrites the block at the end of profiles/slurm/config.yaml

The source is the first that exists of results/benchmarks/scale_8b.json (benchmarks/scale/run-8b.sh: the
8B-shaped run itself) and results/benchmarks/scale_135m.json (the CPU demo on SmolLM2-135M, collect.py
over its results/). Both are benchmarks/scale/collect.py records: per rule, its longest job's wall seconds
and its largest peak RSS. The profile is for an 8B model (random_llama.py's default Llama-3-8B shape);
per rule:

    ratio      how the rule's memory and time grow from the measured shape to the 8B one, both taken as
               linear in it: 1 from the 8B run itself; else the parameter ratio (8B / measured) for the
               rules that hold the whole model (WHOLE_MODEL), the per-layer parameter ratio for those that
               hold one layer at a time (PER_LAYER: decompose, realise, plot_spectra), 1 for the rest
               (tokens, tables and figures: calibrate, summarise, plots, versions)
    mem_mb     1.5 x (base + (peak RSS - base) x ratio x bytes), rounded up to a whole GB, at least 4 GB;
               bytes = the 8B run's bytes a weight (float16, config/scale-8b.yaml) / the measured run's;
               base = the smallest peak RSS of any job of the run (a job that does little beyond
               importing torch and glrs), which does not grow with the model
    runtime    3 x longest job seconds x ratio, in minutes, rounded up to 10, within [30, 1440]
               (from a CPU measurement this over-states the GPU rules' time)
    gpu        1 for the rules that declare `gpu=1` in workflow/rules/*.smk, else 0
    cpus_per_task  4 for WHOLE_MODEL, 1 for the others (the per-layer rules pin one solver thread)

A rule the run did not execute takes the numbers of the rule in STAND_IN that does the same work at the
same scale; a rule with neither gets LIGHT. Re-run this script whenever the measurement changes: the
profile's set-resources is written only here.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect import parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SOURCES = [REPO / "results" / "benchmarks" / "scale_8b.json", REPO / "results" / "benchmarks" / "scale_135m.json"]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
MARKER = "# set-resources below is written by benchmarks/scale/slurm_resources.py"
LLAMA_8B = {"layers": 32, "hidden": 4096, "intermediate": 14336, "vocab": 128256, "kv_heads": 8, "heads": 32,
            "tied_embeddings": False, "dtype": "float16"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Rules a run may not execute (the default has no Stage 1 and no dense export) -> the measured rule whose
# job has the same shape: one layer's factorisation, a whole-model write, a whole-model evaluation, ...
STAND_IN = {"decompose": "realise", "materialise": "materialise_realised", "evaluate_zeroshot": "evaluate_ppl",
            "compress": "allocate", "allocate_with_masks": "allocate", "plot_zeroshot": "plot_ppl",
            # the workflow writes materialise_realised's benchmark under bench/materialise/
            "materialise_realised": "materialise"}
WHOLE_MODEL = {"prepare_model", "activations", "allocate", "compress", "materialise", "materialise_realised",
               "evaluate_ppl", "evaluate_zeroshot"}
PER_LAYER = {"decompose", "realise", "plot_spectra"}
LIGHT = {"mem_mb": 4000, "runtime": 30}
MEM_FACTOR, TIME_FACTOR = 1.5, 3.0


def per_layer_parameters(s: dict) -> int:
    return (parameters(s) - parameters(dict(s, layers=0))) // s["layers"]


def rule_gpus(rules_dir: Path) -> dict[str, int]:
    """rule -> the `gpu=N` its resources declare (0 when none), from the workflow's rule files."""
    out = {}
    for smk in sorted(rules_dir.glob("*.smk")):
        blocks = re.split(r"^rule (\w+):", smk.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2]):
            m = re.search(r"\bgpu\s*=\s*(\d+)", body)
            out[name] = int(m.group(1)) if m else 0
    for smk in sorted(rules_dir.glob("*.smk")):  # `use rule A as B with:` inherits A's resources
        for parent, child in re.findall(r"^use rule (\w+) as (\w+)", smk.read_text(), flags=re.M):
            out[child] = out[parent]
    return out


def resources(record: dict, rules: dict[str, int], target: dict) -> dict[str, dict]:
    stages, shape = record["stages"], record["shape"]
    rss = [m["peak_rss_bytes"] for m in stages.values() if m.get("peak_rss_bytes")]
    base = min(rss)
    whole = parameters(target) / parameters(shape)
    layer = per_layer_parameters(target) / per_layer_parameters(shape)
    out = {}
    for rule, gpu in sorted(rules.items()):
        source = rule if rule in stages else STAND_IN.get(rule)
        kind = rule if rule in WHOLE_MODEL | PER_LAYER else STAND_IN.get(rule)
        entry = {"gpu": gpu, "cpus_per_task": 4 if kind in WHOLE_MODEL else 1}
        if source in stages and stages[source].get("peak_rss_bytes"):
            m = stages[source]
            ratio = whole if kind in WHOLE_MODEL else layer if kind in PER_LAYER else 1.0
            size = DTYPE_BYTES[target["dtype"]] / DTYPE_BYTES[shape["dtype"]] if ratio != 1.0 else 1.0
            mem = MEM_FACTOR * (base + (m["peak_rss_bytes"] - base) * ratio * size) / 2**20
            minutes = TIME_FACTOR * m["max_job_seconds"] * ratio / 60
            entry["mem_mb"] = max(4000, 1000 * math.ceil(mem / 1000))
            entry["runtime"] = min(1440, max(30, 10 * math.ceil(minutes / 10)))
            entry["from"] = (f"{source}: peak RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB, longest job "
                             f"{m['max_job_seconds']:.0f} s, x{ratio:.3g}")
        else:
            entry.update(LIGHT, **{"from": "no benchmark in the run: LIGHT"})
        out[rule] = entry
    return out


def render(entries: dict[str, dict], source: Path, record: dict) -> str:
    lines = [MARKER, f"# from {source.resolve().relative_to(REPO) if source.resolve().is_relative_to(REPO) else source} ({record.get('note') or 'no note'}; measured "
             f"{record['parameters']:,} parameters), for a Llama-3-8B-shaped model ({parameters(LLAMA_8B):,}).",
             "# The formula is in the script's docstring; override one value with --set-resources RULE:KEY=VALUE.",
             "set-resources:"]
    for rule, e in entries.items():
        lines.append(f"  {rule}:  # {e['from']}")
        lines += [f"    {k}: {e[k]}" for k in ("mem_mb", "runtime", "cpus_per_task", "gpu")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="a collect.py record (default: the first of %s that exists)"
                    % ", ".join(str(s.relative_to(REPO)) for s in SOURCES))
    ap.add_argument("--profile", type=Path, default=PROFILE, help="the profile whose set-resources block to rewrite")
    ap.add_argument("--out", type=Path, help="write the rewritten profile here instead (default: in place)")
    args = ap.parse_args()
    source = args.source or next((s for s in SOURCES if s.is_file()), None)
    if source is None or not source.is_file():
        sys.exit(f"slurm_resources.py: no measurement ({args.source or ', '.join(map(str, SOURCES))}); run "
                 "benchmarks/scale/collect.py over a pipeline run first")
    record = json.loads(source.read_text())
    is_8b = record["shape"]["layers"] == LLAMA_8B["layers"] and record["shape"]["hidden"] == LLAMA_8B["hidden"]
    target = record["shape"] if is_8b else LLAMA_8B
    text = args.profile.read_text()
    if MARKER not in text:
        sys.exit(f"slurm_resources.py: {args.profile} has no line '{MARKER}' to write below")
    head = text[: text.index(MARKER)]
    out = args.out or args.profile
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(head + render(resources(record, rule_gpus(REPO / "workflow" / "rules"), target), source, record))
    tmp.replace(out)
    print(f"wrote {out} from {source}")


if __name__ == "__main__":
    main()
