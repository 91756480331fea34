#!/usr/bin/env python
"""Does a structural change keep the bytes? Run the same small pipeline at two git revisions and compare
what they compute (docs/testing.md, "structural changes"):

    python benchmarks/same_bytes.py OLD_REF [NEW_REF] [--model DIR] [--out results/benchmarks/same_bytes.json]

Each revision is checked out into its own worktree (NEW_REF defaults to the working tree as it is) and runs
`snakemake` with its own config/config.yaml and an overlay of settings both spell alike: CAP's learned
budgets, uniform and OWL (realised), Wanda, SparseGPT and OATS at density 0.5 on a tiny random Llama with the
real tokenizer, small calibration and evaluation. Content keys may differ between the revisions (a rename
changes key inputs); the compressed models are matched by (method, allocator, density) from their metrics
records, and for each one the script compares every tensor of every file of the compressed model, the
per-matrix budgets of its allocation and the perplexity, and writes a JSON verdict per model. Exit status 1
when any model differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OVERLAY = {
    "device": "cpu", "methods": ["cap", "wanda", "sparsegpt", "oats"], "allocators": ["cap", "uniform", "owl"],
    "target_density": [0.5], "calibration": {"dataset": "pydoc", "nsamples": 8, "seqlen": 64},
    "evaluation": {"datasets": ["pydoc"], "seqlen": 128, "max_tokens": 2048, "zeroshot": {"tasks": []}},
}


def tiny_model(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_llama  # the suite's tiny Llama, one definition
    from transformers import AutoTokenizer

    from glrs.modelio import embedded_gguf_path

    gguf = embedded_gguf_path()
    tok = root / "tokenizer"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tok)
    return make_tiny_llama(root / "tiny-llama", tok, layers=3)


def run(tree: Path, model: Path, work: Path) -> dict:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    overlay = work / "overlay.yaml"
    overlay.write_text(yaml.safe_dump(dict(OVERLAY, model=str(model))))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(tree / "Snakefile"), "--directory", str(work),
           "--configfile", str(tree / "config" / "config.yaml"), str(overlay), "--cores", "2"]
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed in {tree}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    models = {}
    for path in sorted((work / "results" / "metrics").glob("*/ppl-*.json")):
        rec = json.loads(path.read_text())
        if rec.get("method") == "dense" or rec.get("split", "evaluation") != "evaluation":
            continue
        models[f"{rec['method']}/{rec.get('allocator') or '-'}@{rec['target_density']}"] = rec
    return models


def tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def budgets(work: Path, rec: dict) -> dict | None:
    key = rec.get("alloc_key")
    if not key:
        return None
    alloc = json.loads((work / "results" / "alloc" / f"{key}.json").read_text())
    return {"params_kept": alloc["params_kept"],
            "matrices": {k: (m.get("rank"), m.get("nnz")) for k, m in alloc["matrices"].items()}}


def compare(old: tuple[Path, dict], new: tuple[Path, dict]) -> dict:
    import torch

    (wa, ma), (wb, mb) = old, new
    out = {}
    for name in sorted(set(ma) | set(mb)):
        if name not in ma or name not in mb:
            out[name] = {"same": False, "why": f"only in {'old' if name in ma else 'new'}"}
            continue
        ta = tensors(wa / "results" / "compressed" / ma[name]["comp_key"])
        tb = tensors(wb / "results" / "compressed" / mb[name]["comp_key"])
        differ = sorted(k for k in set(ta) | set(tb) if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
        worst = max((float((ta[k].double() - tb[k].double()).abs().max()) for k in differ
                     if k in ta and k in tb and ta[k].shape == tb[k].shape), default=0.0)
        same_budgets = budgets(wa, ma[name]) == budgets(wb, mb[name])
        out[name] = {"same": not differ and same_budgets and ma[name]["ppl"] == mb[name]["ppl"],
                     "tensors": len(ta), "tensors_differing": len(differ), "max_abs_difference": worst,
                     "budgets_equal": same_budgets, "ppl": [ma[name]["ppl"], mb[name]["ppl"]],
                     "keys": [ma[name]["comp_key"], mb[name]["comp_key"]]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new", nargs="?", help="a revision (default: the working tree)")
    p.add_argument("--model", type=Path, help="a Hugging Face model directory (default: the suite's tiny Llama)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "same_bytes.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="same_bytes-") as tmp:
        root = Path(tmp)
        model = a.model or tiny_model(root)
        trees = {}
        for label, ref in (("old", a.old), ("new", a.new)):
            if ref is None:
                trees[label] = REPO
                continue
            trees[label] = root / f"tree-{label}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(trees[label]), ref], check=True)
        try:
            runs = {label: (root / f"work-{label}", run(tree, model, root / f"work-{label}")) for label, tree in trees.items()}
            result = compare(runs["old"], runs["new"])
        finally:
            for label, tree in trees.items():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    revs = {label: subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True,
                                  text=True).stdout.strip() if ref else "working tree" for label, ref in (("old", a.old), ("new", a.new))}
    report = {"old": revs["old"], "new": revs["new"], "overlay": OVERLAY, "models": result,
              "all_same": all(v["same"] for v in result.values())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, v in result.items():
        print(f"{name:28s} {'same' if v['same'] else 'DIFFERENT'}  " + (f"{v['tensors_differing']}/{v['tensors']} tensors differ, max |diff| {v['max_abs_difference']:.3g}, ppl {v['ppl'][0]:.6g} vs {v['ppl'][1]:.6g}" if "tensors" in v else v["why"]))
    print(f"wrote {a.out}")
    return 0 if report["all_same"] else 1


if __name__ == "__main__":
    sys.exit(main())
