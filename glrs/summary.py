"""results/summary.csv: every run in the results tree as one row (DESIGN.md section 7).

Rows are gathered from the metrics files, not from the current config, so a
sweep run over several days (or several configs) reads as one table. Stage
wall times come from Snakemake's benchmark files, found by the keys each
metrics record carries.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from . import cas

ID_COLUMNS = ["model", "model_fp", "method", "allocator", "rpca_lambda_scale", "target_density", "achieved_density",
              "params_kept", "seed"]
STAGES = ["prepare_model", "decompose", "calibrate", "allocate", "materialize", "compress", "evaluate_ppl", "evaluate_zeroshot"]


def column_safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _bench_seconds(results: Path, pattern: str) -> float | None:
    """Sum of wall seconds over the Snakemake benchmark TSVs matching `pattern` ('|' joins patterns)."""
    total, found = 0.0, False
    for tsv in (t for pat in pattern.split("|") for t in results.glob(pat)):
        rows = list(csv.DictReader(tsv.read_text().splitlines(), delimiter="\t"))
        if rows:
            total += float(rows[-1]["s"])
            found = True
    return round(total, 3) if found else None


def _stage_patterns(rec: dict) -> dict[str, str]:
    mk = rec.get("model_key", "")
    pats = {"prepare_model": f"bench/prepare_model/{mk}.tsv", "calibrate": f"bench/calibrate/{mk}/*.tsv"}
    if rec["method"] == "dense":
        target = f"dense-{mk}"
        pats["calibrate"] = ""
    else:
        target = rec["comp_key"]
        if rec.get("rpca_key"):
            pats["decompose"] = f"bench/decompose/{mk}/{rec['rpca_key']}/layer_*.tsv"
        if rec.get("alloc_key"):
            pats["allocate"] = f"bench/allocate/{rec['alloc_key']}.tsv"
            pats["materialize"] = f"bench/materialize/{target}.tsv"
        else:
            pats["compress"] = f"bench/compress/{target}.tsv"
    return {k: v for k, v in pats.items() if v}


def _eval_bench(metrics_file: Path) -> tuple[str, str]:
    """(stage, benchmark TSV relative to results/) of one metrics file: metrics/T/ppl-D-K.json was
    timed in bench/evaluate_ppl/T/D-K.tsv, metrics/T/zeroshot-K.json in bench/evaluate_zeroshot/T/K.tsv."""
    target, stem = metrics_file.parent.name, metrics_file.stem
    if stem.startswith("zeroshot-"):
        return "evaluate_zeroshot", f"bench/evaluate_zeroshot/{target}/{stem[len('zeroshot-'):]}.tsv"
    return "evaluate_ppl", f"bench/evaluate_ppl/{target}/{stem[len('ppl-'):]}.tsv"


def _record_columns(rec: dict) -> dict:
    """The columns one metrics record fills: a perplexity with its protocol (tokens, seqlen and
    text fingerprint: the offline text is the running Python's own docs and differs between
    Python versions), or zero-shot accuracies with their example limit."""
    if rec.get("kind", "ppl") == "ppl":
        ds = column_safe(rec["dataset"])
        return {f"ppl_{ds}": round(rec["ppl"], 4),
                f"eval_{ds}": f"{rec.get('tokens')} tokens x{rec.get('seqlen')} text {str(rec.get('text_sha256', ''))[:10]}"}
    cols = {f"acc_{column_safe(task)}": round(acc, 4) for task, acc in rec["accuracy"].items()}
    return cols | {"zeroshot_limit": "all" if rec.get("limit") is None else rec["limit"]}


def collect_rows(results: str | Path = "results") -> list[dict]:
    """One row per evaluated model and evaluation protocol. Records of one model that agree on every
    column they share join one row; a record that would overwrite a value measured under another
    protocol (another text, token count or zero-shot limit) starts a row of its own, so that no row
    mixes protocols."""
    results = Path(results)
    rows: dict[tuple, list[dict]] = {}
    for path in sorted(results.glob("metrics/*/*.json")):
        rec = json.loads(path.read_text())
        ident = tuple(rec.get(c) for c in ("model_fp", "method", "allocator", "target_density", "seed", "comp_key"))
        cols = _record_columns(rec)
        group = rows.setdefault(ident, [])
        for row in group:
            if all(row.get(k, v) == v for k, v in cols.items()):
                break
        else:
            row = {c: rec.get(c, "") for c in ID_COLUMNS} | {"_rec": rec}
            group.append(row)
        row.update(cols)
        row.setdefault("_evals", []).append(_eval_bench(path))
    out = []
    for row in (r for group in rows.values() for r in group):
        rec = row.pop("_rec")
        patterns = _stage_patterns(rec)
        for stage, pattern in row.pop("_evals"):  # only the evaluations this row reports
            patterns[stage] = f"{patterns[stage]}|{pattern}" if stage in patterns else pattern
        for stage, pattern in patterns.items():
            seconds = _bench_seconds(results, pattern)
            if seconds is not None:
                row[f"seconds_{stage}"] = seconds
        out.append(row)
    out.sort(key=lambda r: (str(r["model"]), r["method"] != "dense", str(r["method"]), str(r["allocator"]),
                            float(r["target_density"] or 0)))
    return out


def write_summary(results: str | Path, out: str | Path) -> list[dict]:
    rows = collect_rows(results)
    extra = sorted({k for r in rows for k in r} - set(ID_COLUMNS),
                   key=lambda c: (not c.startswith("ppl_"), not c.startswith("acc_"), not c.startswith("eval_"), c))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ID_COLUMNS + extra, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    cas.write_text_atomic(out, buf.getvalue())
    return rows


def print_summary(csv_path: str | Path) -> None:
    import pandas as pd

    from .errors import GlrsError

    if not Path(csv_path).is_file():
        raise GlrsError(f"{csv_path} does not exist yet; run the pipeline first (snakemake --cores all)")
    df = pd.read_csv(csv_path, keep_default_na=False)
    df["model_fp"] = df["model_fp"].astype(str).str[:10]
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(df.to_string(index=False))


VERSIONED = ["python", "glrs", "torch", "transformers", "snakemake", "lm_eval", "numpy", "matplotlib", "safetensors"]


def software_versions() -> list[tuple[str, str]]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = [("python", platform.python_version())]
    for name in VERSIONED[1:]:
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            out.append((name, "not installed"))
    return out


def write_versions(config: dict, csv_out: str | Path, config_out: str | Path) -> None:
    """results/software_versions.csv (package, version) and results/config_used.yaml (the validated config)."""
    import yaml

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["package", "version"])
    writer.writerows(software_versions())
    cas.write_text_atomic(csv_out, buf.getvalue())
    cas.write_text_atomic(config_out, yaml.safe_dump(config, sort_keys=True, default_flow_style=False))
