"""`glrs summary`: the compact table fits 120 columns, groups each method's rows (dense first), `--wide` shows
every column and `--csv` is CSV a script can read; on a summary shaped like a real sweep (two models with long
names, two perplexity datasets, four zero-shot tasks, every stage's seconds)."""
from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import pytest

from glrs import summary
from glrs.cli import main

MODELS = ["/home/researcher/checkpoints/meta-llama/Meta-Llama-3.1-70B-Instruct-abliterated-Q4_K_M.gguf",
          "Qwen/Qwen2.5-14B-Instruct-1M-long-context-experimental-merge"]
TASKS = ["arc_challenge", "arc_easy", "hellaswag", "winogrande"]
RUNS = ([("cap", a) for a in ("cap", "uniform", "rpca-threshold", "lowrank-only", "sparse-only")]
        + [(m, "") for m in ("wanda", "sparsegpt", "magnitude", "svdllm", "oats", "bolaco")])
DENSITIES = [0.4, 0.5, 0.6]


def _header() -> list[str]:
    return (summary.ID_COLUMNS + ["ppl_pydoc", "ppl_wikitext2"] + [f"acc_{t}" for t in TASKS]
            + ["eval_pydoc", "eval_wikitext2", "zeroshot_limit"] + [f"seconds_{s}" for s in sorted(summary.STAGES)])


def _rows() -> list[dict]:
    rng = random.Random(0)
    rows = []
    for model in MODELS:
        base = {"model": model, "model_fp": "9f2c" * 16, "rpca_lambda_scale": "", "seed": "",
                "eval_pydoc": "71680 tokens x2048 text 6b1f0c2d9e", "eval_wikitext2": "297984 tokens x2048 text 1c2d3e4f5a",
                "zeroshot_limit": "all"}
        rows.append(base | {"method": "dense", "allocator": "", "target_density": 1.0, "achieved_density": 1.0,
                            "params_kept": 69_500_000_000, "ppl_pydoc": 3.1416, "ppl_wikitext2": 2.8543}
                    | {f"acc_{t}": 0.75 for t in TASKS} | {"seconds_prepare_model": 812.5, "seconds_evaluate_ppl": 2417.0})
        for method, allocator in RUNS:
            for d in DENSITIES:
                rows.append(base | {
                    "method": method, "allocator": allocator, "target_density": d, "seed": 0,
                    "achieved_density": round(d + rng.uniform(-4e-4, 4e-4), 6), "params_kept": int(d * 69_500_000_000),
                    "rpca_lambda_scale": 1.0 if method == "cap" else "",
                    "ppl_pydoc": round(rng.uniform(3, 5e10 if method == "svdllm" else 300), 4),
                    "ppl_wikitext2": round(rng.uniform(3, 300), 4)}
                    | {f"acc_{t}": round(rng.uniform(0.2, 0.8), 4) for t in TASKS}
                    | {f"seconds_{s}": round(rng.uniform(10, 40000), 3) for s in summary.STAGES})
    rng.shuffle(rows)
    return rows


@pytest.fixture
def sweep_csv(tmp_path) -> Path:
    path = tmp_path / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_header())
        writer.writeheader()
        writer.writerows(_rows())
    return path


def _glrs(capsys, *argv: str) -> str:
    assert main(["summary", *argv]) == 0
    return capsys.readouterr().out


def _table_rows(out: str) -> list[list[str]]:
    """The table's lines (up to the blank line before the legend), split on runs of two or more spaces."""
    import re

    lines = out.split("\n\n")[0].splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines]


def test_compact_table_fits_120_columns_with_long_model_names(sweep_csv, capsys):
    out = _glrs(capsys, str(sweep_csv))
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    table = out.split("\n\n")[0].splitlines()
    assert len(table) == 1 + len(_rows())
    heading = table[0].split()
    for col in ("model", "method", "allocator", "target", "achieved", "acc", "time"):
        assert col in heading, col
    assert "ppl" in table[0] and "pydoc" in table[0] and "wikitext2" in table[0]
    # both models stay recognisable: their names are shortened in the middle, so both ends survive
    body = "\n".join(table[1:])
    assert "Meta-Llama" in body and "Q4_K_M.gguf" in body and "Qwen2.5" in body and "merge" in body
    assert "/home/researcher" not in body  # a path shows its file name
    # the compact columns, not the 29 of the CSV
    assert "model_fp" not in out and "seconds_" not in table[0] and "params_kept" not in out
    assert "mean zero-shot accuracy over arc_challenge, arc_easy, hellaswag, winogrande" in out


@pytest.mark.parametrize("width", [100, 120])
def test_compact_table_respects_other_widths(sweep_csv, capsys, width):
    out = _glrs(capsys, str(sweep_csv), "--width", str(width))
    assert max(len(line) for line in out.splitlines()) <= width


def test_compact_table_groups_each_methods_rows_dense_first(sweep_csv, capsys):
    rows = _table_rows(_glrs(capsys, str(sweep_csv)))[1:]
    methods = [r[1] for r in rows]
    assert methods[:2] == ["dense", "dense"]
    blocks = [m for i, m in enumerate(methods) if i == 0 or methods[i - 1] != m]
    assert len(blocks) == len(set(blocks)), blocks  # each method's rows in one block
    assert blocks == ["dense"] + sorted({m for m, _ in RUNS})
    cap = [(r[2], r[0], float(r[3])) for r in rows if r[1] == "cap"]
    assert len(cap) == 5 * len(DENSITIES) * len(MODELS)
    # then by allocator and model, each (allocator, model) series in rising density
    series = [cap[i:i + len(DENSITIES)] for i in range(0, len(cap), len(DENSITIES))]
    assert all(len({s[:2] for s in block}) == 1 and [s[2] for s in block] == DENSITIES for block in series)
    assert [block[0][0] for block in series] == sorted(block[0][0] for block in series)


def test_csv_is_parseable_with_the_compact_columns(sweep_csv, capsys):
    out = _glrs(capsys, str(sweep_csv), "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["model", "method", "allocator", "target_density", "achieved_density",
                             "ppl_pydoc", "ppl_wikitext2", "acc_mean", "seconds_total"]
    assert len(rows) == len(_rows())
    assert {r["model"] for r in rows} == set(MODELS)  # the full spec, never shortened
    assert [r["method"] for r in rows][:2] == ["dense", "dense"]
    for r in rows:
        float(r["target_density"]), float(r["achieved_density"]), float(r["ppl_pydoc"])
        assert 0 <= float(r["acc_mean"]) <= 1 and float(r["seconds_total"]) > 0
    dense = next(r for r in rows if r["method"] == "dense")
    assert float(dense["acc_mean"]) == pytest.approx(0.75) and float(dense["seconds_total"]) == pytest.approx(3229.5)


def test_csv_wide_and_wide_table_keep_every_column(sweep_csv, capsys):
    rows = list(csv.DictReader(io.StringIO(_glrs(capsys, str(sweep_csv), "--csv", "--wide"))))
    assert list(rows[0]) == _header() and len(rows) == len(_rows())
    assert [r["method"] for r in rows][:2] == ["dense", "dense"]
    wide = _glrs(capsys, str(sweep_csv), "--wide").splitlines()
    assert wide[0].split() == _header() and len(wide) == 1 + len(_rows())
    assert "9f2c9f2c9f " in wide[1]  # model fingerprints cut to 10 characters


def test_compact_table_of_the_tiny_pipeline_summary(tmp_path, capsys):
    """What `make demo` prints: dense, cap/uniform and wanda of one model; no column that tells nothing
    (the seed and lambda are the same in every row), the mean accuracy skips a task a row lacks."""
    header = summary.ID_COLUMNS + ["ppl_pydoc", "acc_glrs_cloze", "acc_glrs_nextsent", "eval_pydoc", "zeroshot_limit",
                                   "seconds_prepare_model", "seconds_evaluate_ppl"]
    base = {"model": "smollm2-135m-instruct", "model_fp": "ab", "eval_pydoc": "16384 tokens x2048 text 6b1f0c2d9e",
            "zeroshot_limit": 40, "seconds_prepare_model": 5.0, "seconds_evaluate_ppl": 50.0}
    rows = [base | {"method": "wanda", "target_density": 0.5, "achieved_density": 0.5, "seed": 0, "ppl_pydoc": 21.1234,
                    "acc_glrs_cloze": 0.5, "acc_glrs_nextsent": ""},
            base | {"method": "cap", "allocator": "uniform", "rpca_lambda_scale": 1.0, "seed": 0, "target_density": 0.5,
                    "achieved_density": 0.50004, "ppl_pydoc": 8670.25, "acc_glrs_cloze": 0.3, "acc_glrs_nextsent": 0.4},
            base | {"method": "dense", "target_density": 1.0, "achieved_density": 1.0, "ppl_pydoc": 10.9,
                    "acc_glrs_cloze": 0.6, "acc_glrs_nextsent": 0.7}]
    path = tmp_path / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    out = _glrs(capsys, str(path))
    table = _table_rows(out)
    assert table[0] == ["model", "method", "allocator", "target", "achieved", "ppl", "acc %", "time"]
    assert table[1] == ["smollm2-135m-instruct", "dense", "1.0", "1.0", "10.90", "65.0", "55.0s"]
    assert table[2] == ["smollm2-135m-instruct", "cap", "uniform", "0.5", "0.5", "8670.25", "35.0", "55.0s"]
    assert table[3][1] == "wanda" and table[3][-2] == "50.0"  # the missing nextsent accuracy is left out
    assert "perplexity on the evaluation text of pydoc" in " ".join(out.split())


def test_protocol_column_tells_two_evaluations_of_one_model_apart(tmp_path, capsys):
    header = summary.ID_COLUMNS + ["ppl_pydoc", "eval_pydoc"]
    rows = [{"model": "m", "method": "dense", "target_density": 1.0, "achieved_density": 1.0, "ppl_pydoc": p,
             "eval_pydoc": f"{t} tokens x2048 text 6b1f0c2d9e"} for t, p in ((16384, 10.9), (71680, 10.6))]
    path = tmp_path / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    table = _table_rows(_glrs(capsys, str(path)))
    assert "protocol" in table[0]
    assert {r[table[0].index("protocol")] for r in table[1:]} == {"16384 tok", "71680 tok"}


def test_summary_of_a_missing_file_says_to_run_the_pipeline(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "nope.csv")]) == 2
    assert "run the pipeline first" in capsys.readouterr().err


def test_realisers_of_one_allocation_are_rows_of_their_own(tmp_path, capsys):
    """realise.mode [wanda, sparsegpt]: one allocation spent by two realisers gives two rows, told apart by the
    variant column (which names the realiser), each realiser's rows together."""
    header = summary.ID_COLUMNS + ["ppl_pydoc"]
    rows = [{"model": "m", "method": "cap", "allocator": a, "variant": f"stage1=weights realise={r}", "target_density": d,
             "achieved_density": d, "ppl_pydoc": 20.0 + i}
            for i, (a, r, d) in enumerate([("uniform", "wanda", 0.6), ("uniform", "sparsegpt", 0.5),
                                           ("uniform", "wanda", 0.5), ("uniform", "sparsegpt", 0.6)])]
    path = tmp_path / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    table = _table_rows(_glrs(capsys, str(path)))
    col = table[0].index("variant")
    assert [(r[col], r[col + 1]) for r in table[1:]] == [("stage1=weights realise=sparsegpt", "0.5"),
                                                         ("stage1=weights realise=sparsegpt", "0.6"),
                                                         ("stage1=weights realise=wanda", "0.5"),
                                                         ("stage1=weights realise=wanda", "0.6")]
