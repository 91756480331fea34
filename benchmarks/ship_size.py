#!/usr/bin/env python
"""Bytes a user ships: every compressed model under a results tree against its prepared model,
results/benchmarks/ship_size.json.

Per compressed model: the target matrices as stored and the whole directory (without the optional hf/
export), against the prepared model's target matrices and directory, in the stored dtype; and the same
model re-encoded in bfloat16 (every floating tensor cast, the supports unchanged: what `dtype: bfloat16`
would write) against the prepared model's bfloat16 bytes (its floating tensors at 2 bytes).

    python benchmarks/ship_size.py results [other-results ...] [--out results/benchmarks/ship_size.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glrs import cas, compressed, modelio  # noqa: E402


def _tensor_bytes(path: Path, dtype_size=None) -> int:
    """Bytes of the tensors of a safetensors file (floating ones at dtype_size bytes when given)."""
    total = 0
    for t in compressed.read_tensors(path).values():
        size = dtype_size if (dtype_size and t.is_floating_point()) else t.element_size()
        total += t.numel() * size
    return total


def measure(comp: Path, results: Path) -> dict:
    info = json.loads((comp / "info.json").read_text())
    header = compressed.read_format(comp)
    model_dir = results / "model" / info["model_key"]
    manifest = modelio.read_manifest(model_dir)
    dense_targets = sum(m * n for m, n in manifest["targets"].values()) * manifest["num_layers"]
    esize = {"float32": 4, "bfloat16": 2, "float16": 2}[header["dtype"]]
    other = lambda p: p.is_file() and p.suffix != ".safetensors" and p.name not in ("info.json", "conditions.json", compressed.FORMAT_FILE)  # noqa: E731
    small_files = sum(p.stat().st_size for p in comp.iterdir() if other(p))
    prepared_small = sum(p.stat().st_size for p in model_dir.iterdir()
                         if p.is_file() and p.suffix != ".safetensors" and p.name != modelio.MANIFEST)
    bf16_targets = 0
    for rec in header["targets"].values():  # values and factors at 2 bytes, supports unchanged
        m, n = rec["shape"]
        if rec["support"] == "dense":
            bf16_targets += 2 * m * n
        else:
            bf16_targets += 2 * rec["params"] + (rec["bytes"] - esize * rec["params"])
    rest_bf16 = _tensor_bytes(comp / compressed.REST_FILE, 2)
    prepared_bf16 = sum(_tensor_bytes(model_dir / f, 2) for f in sorted(set(modelio._weight_map(model_dir).values())))
    stored = compressed.directory_bytes(comp)
    return {
        "comp_key": comp.name, "model": info.get("model"), "method": info["method"], "allocator": info.get("allocator", ""),
        "target_density": info["target_density"], "achieved_density": info["achieved_density"],
        "patterns": sorted({t.get("pattern", "dense") for t in header["targets"].values()}),
        "stored_dtype": header["dtype"],
        "targets_bytes": stored["targets"], "targets_dense_bytes": dense_targets * esize,
        "targets_ratio": round(stored["targets"] / (dense_targets * esize), 4),
        "directory_bytes": stored["directory"], "prepared_directory_bytes": info["bytes_dense"]["directory"],
        "directory_ratio": round(stored["directory"] / info["bytes_dense"]["directory"], 4),
        "bf16_targets_ratio": round(bf16_targets / (dense_targets * 2), 4),
        "bf16_directory_ratio": round((rest_bf16 + bf16_targets + small_files) / (prepared_bf16 + prepared_small), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default="results/benchmarks/ship_size.json")
    args = ap.parse_args()
    rows = [measure(p, Path(results)) for results in args.results
            for p in sorted(Path(results).glob("compressed/*")) if compressed.is_compressed(p)]
    rows.sort(key=lambda r: (r["method"], r["allocator"], r["target_density"]))
    for r in rows:
        print(f"{r['method']:<10} {r['allocator']:<8} {r['target_density']:<5} {','.join(r['patterns']):<24} "
              f"targets {r['targets_ratio']:.3f}x  dir {r['directory_ratio']:.3f}x  "
              f"(bf16: targets {r['bf16_targets_ratio']:.3f}x, dir {r['bf16_directory_ratio']:.3f}x)")
    cas.write_json_atomic(args.out, {"benchmark": "ship_size", "command": " ".join(sys.argv), "models": rows})


if __name__ == "__main__":
    main()
