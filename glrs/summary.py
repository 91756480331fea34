"""results/summary.csv: every run in the results tree as one row (docs/design.md section 7).

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

ID_COLUMNS = ["model", "model_fp", "method", "allocator", "variant", "rpca_lambda_scale", "target_density", "achieved_density",
              "params_kept", "seed"]
VALIDATION = "_validation"  # ppl_<dataset>_validation, eval_<dataset>_validation: the validation text's
STDERR = "stderr_"  # stderr_<task>: lm-eval's standard error of acc_<task>
STAGES = ["prepare_model", "decompose", "calibrate", "activations", "allocate", "realise", "materialise", "compress", "evaluate_ppl", "evaluate_zeroshot"]


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
        if rec.get("stage1_key"):
            pats["decompose"] = f"bench/decompose/{mk}/{rec['stage1_key']}/layer_*.tsv"
        if rec.get("realise_key"):
            pats["activations"] = f"bench/activations/{mk}/{rec['stats_key']}.tsv"
            pats["realise"] = f"bench/realise/{rec['realise_key']}/layer_*.tsv"
        if rec.get("alloc_key"):
            pats["allocate"] = f"bench/allocate/{rec['alloc_key']}.tsv"
            pats["materialise"] = f"bench/materialise/{target}.tsv"
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


def _short_text(identity) -> str:
    """A text's identity as the summary shows it: a SHA-256 cut to 10 hex digits, a hub split's name whole."""
    if identity is None:
        return "none"
    identity = str(identity)
    return identity[:10] if len(identity) == 64 and all(c in "0123456789abcdef" for c in identity) else identity


def _record_columns(rec: dict) -> dict:
    """The columns one metrics record fills: a perplexity with its protocol (tokens, seqlen and
    text fingerprint: the offline text is the running Python's own docs and differs between
    Python versions) and its three texts (calibration, validation, evaluation; glrs.data.fingerprints), a
    validation perplexity under the same names with the suffix _validation, or zero-shot accuracies with
    lm-eval's standard errors and their example limit."""
    if rec.get("kind", "ppl") == "ppl":
        ds = column_safe(rec["dataset"])
        suffix = VALIDATION if rec.get("role") == "validation" else ""
        cols = {f"ppl_{ds}{suffix}": round(rec["ppl"], 4),
                f"eval_{ds}{suffix}": f"{rec.get('tokens')} tokens x{rec.get('seqlen')} text {str(rec.get('text_sha256', ''))[:10]}"}
        if rec.get("texts"):
            cols[f"texts_{ds}"] = " ".join(f"{role} {_short_text(rec['texts'].get(role))}"
                                           for role in ("calibration", "validation", "evaluation"))
        return cols
    cols = {f"acc_{column_safe(task)}": round(acc, 4) for task, acc in rec["accuracy"].items()}
    stderr = rec.get("stderr") or {t: (rec.get("results") or {}).get(t, {}).get("acc_stderr") for t in rec["accuracy"]}
    cols |= {f"{STDERR}{column_safe(task)}": round(se, 4) for task, se in stderr.items() if se is not None}
    return cols | {"zeroshot_limit": "all" if rec.get("limit") is None else rec["limit"]}


def _params_variant(rec: dict) -> str:
    """A baseline's settings that differ from its defaults ("rank_ratio=0.1"), so that two runs of one
    method at one density tell themselves apart in the table."""
    params = rec.get("method_params") or {}
    if not params or rec.get("method") in (None, "", "dense"):
        return ""
    from .errors import GlrsError
    from .methods import method_defaults

    try:
        defaults = method_defaults(rec["method"])
    except GlrsError:  # a method this install does not know: show every setting
        defaults = {}
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()) if defaults.get(k) != v)


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
            row = {c: rec.get(c, "") for c in ID_COLUMNS} | {"variant": rec.get("variant") or _params_variant(rec),
                                                              "_rec": rec}
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
                            str(r.get("variant") or ""), float(r["target_density"] or 0)))
    return out


def write_summary(results: str | Path, out: str | Path) -> list[dict]:
    rows = collect_rows(results)
    extra = sorted({k for r in rows for k in r} - set(ID_COLUMNS),
                   key=lambda c: (not c.startswith("ppl_"), not c.startswith("acc_"), not c.startswith(STDERR),
                                  not c.startswith("eval_"), c))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ID_COLUMNS + extra, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    cas.write_text_atomic(out, buf.getvalue())
    return rows


# `glrs summary`: the compact table (default), every column (--wide), or CSV for scripts (--csv).
COMPACT_WIDTH = 120
_TEXT_COLUMNS = {"model", "model_fp", "method", "allocator", "seed"}


def read_summary(csv_path: str | Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a summary CSV, every value a string ('' where empty)."""
    from .errors import GlrsError

    if not Path(csv_path).is_file():
        raise GlrsError(f"{csv_path} does not exist yet; run the pipeline first (snakemake --cores all)")
    reader = csv.DictReader(Path(csv_path).read_text().splitlines())
    rows = [{k: ("" if v is None else v) for k, v in r.items() if k is not None} for r in reader]
    return list(reader.fieldnames or []), rows


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if out != out else out  # NaN reads as missing


def sort_rows(rows: list[dict]) -> list[dict]:
    """Each method's rows together, dense first; then by method, allocator, variant (e.g. CAP's realiser:
    realise=wanda), model, seed and target density (each curve of the figures reads top to bottom)."""
    def key(r):
        density = _float(r.get("target_density"))
        return (r.get("method") != "dense", str(r.get("method", "")), str(r.get("allocator", "")),
                str(r.get("variant") or ""), str(r.get("model", "")), str(r.get("seed", "")),
                1.0 if density is None else density)

    return sorted(rows, key=key)


def mean_accuracy(row: dict, acc_columns: list[str]) -> float | None:
    """Mean zero-shot accuracy (0..1) over the tasks this row has; a missing task is left out, not counted as 0."""
    accs = [a for a in (_float(row.get(c)) for c in acc_columns) if a is not None]
    return sum(accs) / len(accs) if accs else None


def mean_accuracy_stderr(row: dict, acc_columns: list[str]) -> float | None:
    """Standard error of mean_accuracy, the tasks taken as independent: sqrt(sum of se^2) / tasks, over the tasks
    this row has; None unless every one of them has its standard error (stderr_<task>)."""
    tasks = [c[len("acc_"):] for c in acc_columns if _float(row.get(c)) is not None]
    ses = [_float(row.get(STDERR + t)) for t in tasks]
    if not tasks or any(se is None for se in ses):
        return None
    return sum(se * se for se in ses) ** 0.5 / len(tasks)


def total_seconds(row: dict) -> float | None:
    """Wall seconds of every stage this row's result went through (sum of its seconds_<stage> columns)."""
    secs = [s for s in (_float(v) for k, v in row.items() if k.startswith("seconds_")) if s is not None]
    return round(sum(secs), 3) if secs else None


def model_names(models: list[str]) -> dict[str, str]:
    """Model spec -> display name: the last path component (a .gguf file, a directory, a hub id's name),
    unless two different specs would then read the same."""
    short = {m: Path(str(m).rstrip("/")).name or str(m) for m in models}
    clash = {s for s in short.values() if sum(v == s for v in short.values()) > 1}
    return {m: (m if s in clash else s) for m, s in short.items()}


def _fmt_ppl(value) -> str:
    v = _float(value)
    if v is None:
        return ""
    return f"{v:.2f}" if abs(v) < 1e5 else f"{v:.2e}"


def _fmt_seconds(value) -> str:
    if value is None:
        return ""
    s = int(round(value))
    if value < 60:
        return f"{value:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt_density(value) -> str:
    v = _float(value)
    if v is None:
        return ""
    text = f"{v:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _varying(rows: list[dict], column: str) -> bool:
    """More than one value among the rows that have one (the dense rows have no seed or lambda)."""
    return len({str(r.get(column, "")) for r in rows} - {""}) > 1


def compact_columns(header: list[str], rows: list[dict]) -> list[tuple[str, str, callable]]:
    """(CSV name, table heading, value of a row) of the compact view. Beyond the fixed columns, a column
    appears only when it tells rows apart: the seed, the RPCA lambda scale, the evaluation protocol."""
    ppl = [c for c in header if c.startswith("ppl_")]
    acc = sorted(c for c in header if c.startswith("acc_"))
    names = model_names(sorted({str(r.get("model", "")) for r in rows}))
    cols = [("model", "model", lambda r: names.get(str(r.get("model", "")), str(r.get("model", "")))),
            ("method", "method", lambda r: r.get("method", "")),
            ("allocator", "allocator", lambda r: r.get("allocator", ""))]
    if _varying(rows, "variant"):
        cols.append(("variant", "variant", lambda r: r.get("variant", "")))
    if _varying(rows, "rpca_lambda_scale"):
        cols.append(("rpca_lambda_scale", "lambda", lambda r: r.get("rpca_lambda_scale", "")))
    if _varying(rows, "seed"):
        cols.append(("seed", "seed", lambda r: r.get("seed", "")))
    cols += [("target_density", "target", lambda r: r.get("target_density", "")),
             ("achieved_density", "achieved", lambda r: r.get("achieved_density", ""))]
    evaluated = [c for c in ppl if not c.endswith(VALIDATION)]
    for c in ppl:  # validation perplexities (evaluation.validation) as "val", beside the evaluation's "ppl"
        ds, val = c[len("ppl_"):].removesuffix(VALIDATION), c.endswith(VALIDATION)
        heading = ("val" if val else "ppl") + ("" if len(evaluated) == 1 else f" {ds}")
        cols.append((c, heading, lambda r, c=c: r.get(c, "")))
    protocol = [c for c in header if (c.startswith("eval_") or c == "zeroshot_limit") and _varying(rows, c)]
    if protocol:
        def proto(r):
            parts = [f"{str(r.get(c, '')).split(' ')[0]} tok" for c in protocol if c.startswith("eval_") and r.get(c)]
            return " ".join(parts + [f"zs {r.get('zeroshot_limit')}" for c in protocol
                                     if c == "zeroshot_limit" and r.get(c) != ""])
        cols.append(("protocol", "protocol", proto))
    if acc:
        cols.append(("acc_mean", "acc %", lambda r: mean_accuracy(r, acc)))
        if any(c.startswith(STDERR) for c in header):
            cols.append(("acc_mean_stderr", "\u00b1", lambda r: mean_accuracy_stderr(r, acc)))
    cols.append(("seconds_total", "time", total_seconds))
    return cols


def _ellipsize(text: str, width: int) -> str:
    """`text` cut to `width` characters by removing its middle (both ends of a model name tell)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = width // 2
    return text[:head] + "\u2026" + text[len(text) - (width - 1 - head):]


def _render(headings: list[str], cells: list[list[str]], numeric: list[bool], sep: str = "  ") -> list[str]:
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headings)]
    def line(values):
        return sep.join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    return [line(headings)] + [line(row) for row in cells]


def compact_table(header: list[str], rows: list[dict], width: int = COMPACT_WIDTH) -> str:
    """The default `glrs summary`: one line per row, at most `width` characters (long model names and
    then allocator names are shortened in the middle), and a legend under it."""
    rows = sort_rows(rows)
    cols = compact_columns(header, rows)
    filled = [any(value(r) not in ("", None) for r in rows) or name == "method" for name, _, value in cols]
    cols = [c for c, keep in zip(cols, filled) if keep]  # a column empty in every row says nothing
    headings = [h for _, h, _ in cols]
    numeric = [name not in _TEXT_COLUMNS and name != "protocol" for name, _, _ in cols]
    cells = []
    for r in rows:
        line = []
        for name, _, value in cols:
            v = value(r)
            if name.startswith("ppl_"):
                v = _fmt_ppl(v)
            elif name.endswith("_density"):
                v = _fmt_density(v)
            elif name in ("acc_mean", "acc_mean_stderr"):
                v = "" if v is None else f"{100 * v:.1f}"
            elif name == "seconds_total":
                v = _fmt_seconds(v)
            line.append(str(v))
        cells.append(line)
    names = [n for n, _, _ in cols]
    for shrink in ("model", "allocator", "protocol"):  # shorten text columns, middle first, until the table fits
        over = max(map(len, _render(headings, cells, numeric))) - width
        if over <= 0 or shrink not in names:
            continue
        i = names.index(shrink)
        keep = max(len(headings[i]), max([0] + [len(row[i]) for row in cells]) - over, 6)
        for row in cells:
            row[i] = _ellipsize(row[i], keep)
    ppl = [c[len("ppl_"):] for c in header if c.startswith("ppl_") and not c.endswith(VALIDATION)]
    acc = sorted(c[len("acc_"):] for c in header if c.startswith("acc_"))
    legend = [f"{len(rows)} rows. target, achieved: kept share of the compressed layers' parameters. "
              f"ppl: perplexity on the evaluation text{f' of {ppl[0]}' if len(ppl) == 1 else ''}."]
    if any(c.endswith(VALIDATION) for c in header if c.startswith("ppl_")):
        legend.append("val: perplexity on the validation text, the only one a setting may be chosen on.")
    if acc:
        legend.append("acc %: mean zero-shot accuracy over " + ", ".join(acc) + (
            "; \u00b1: its standard error (lm-eval's per task, combined as sqrt(sum se^2) / tasks); differences under "
            "about 2 standard errors do not separate methods" if any(c.startswith(STDERR) for c in header) else "") + ".")
    legend.append("time: wall time of every stage behind the row. Every column: glrs summary --wide; CSV: --csv.")
    return "\n".join(_render(headings, cells, numeric) + [""] + _wrap(legend, width)) + "\n"


def _wrap(lines: list[str], width: int) -> list[str]:
    import textwrap

    return [w for line in lines for w in textwrap.wrap(line, width, subsequent_indent="  ")]


def wide_table(header: list[str], rows: list[dict]) -> str:
    """Every column of the summary (model fingerprints cut to 10 characters), rows sorted as the compact table."""
    rows = sort_rows(rows)
    cells = [[str(r.get(c, ""))[:10] if c == "model_fp" else str(r.get(c, "")) for c in header] for r in rows]
    numeric = [c not in _TEXT_COLUMNS and not c.startswith("eval_") for c in header]
    return "\n".join(_render(header, cells, numeric)) + "\n"


def summary_csv_text(header: list[str], rows: list[dict], wide: bool = False) -> str:
    """CSV for scripts: the compact columns (mean accuracy as a fraction, total time in seconds, full
    precision), or with `wide` every column; rows sorted as the table."""
    rows = sort_rows(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if wide:
        writer.writerow(header)
        writer.writerows([r.get(c, "") for c in header] for r in rows)
    else:
        cols = [(n, v) for n, _, v in compact_columns(header, rows)]
        cols[0] = ("model", lambda r: r.get("model", ""))  # the full spec, not the display name
        writer.writerow([n for n, _ in cols])
        for r in rows:
            writer.writerow(["" if (x := v(r)) is None else x for _, v in cols])
    return buf.getvalue()


def print_summary(csv_path: str | Path, wide: bool = False, as_csv: bool = False, width: int = COMPACT_WIDTH) -> None:
    header, rows = read_summary(csv_path)
    if as_csv:
        text = summary_csv_text(header, rows, wide)
    elif wide:
        text = wide_table(header, rows)
    else:
        text = compact_table(header, rows, width)
    print(text, end="")


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
