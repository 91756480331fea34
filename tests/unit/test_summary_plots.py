"""Figures from summary.csv and the benchmark files, the summary's handling of zero-shot records, and the
provenance files, all on small synthetic inputs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from glrs import plots, summary

PNG = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["model", "model_fp", "method", "allocator", "rpca_lambda_scale", "target_density", "achieved_density",
           "params_kept", "seed", "ppl_pydoc", "acc_glrs_cloze", "acc_glrs_nextsent"]


def _rows() -> list[dict]:
    rows = [dict(method="dense", allocator="", target_density=1.0, achieved_density=1.0, ppl_pydoc=10.0,
                 acc_glrs_cloze=0.6, acc_glrs_nextsent=0.8)]
    for density, ppl in ((0.3, 80.0), (0.5, 20.0), (0.7, 12.0)):
        rows.append(dict(method="cap", allocator="uniform", target_density=density, achieved_density=density,
                         ppl_pydoc=ppl, acc_glrs_cloze=0.4, acc_glrs_nextsent=0.6))
        rows.append(dict(method="cap", allocator="cap", target_density=density, achieved_density=density,
                         ppl_pydoc=ppl * 0.9, acc_glrs_cloze=0.45, acc_glrs_nextsent=0.65))
        rows.append(dict(method="wanda", allocator="", target_density=density, achieved_density=density,
                         ppl_pydoc=ppl * 1.2, acc_glrs_cloze=0.35, acc_glrs_nextsent="" if density == 0.3 else 0.5))
    return [{c: r.get(c, "") for c in COLUMNS} | {"model": "tiny", "model_fp": "ab"} for r in rows]


@pytest.fixture
def summary_csv(tmp_path) -> Path:
    path = tmp_path / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(_rows())
    return path


def _labels(fig) -> list[str]:
    return sorted(line.get_label() for line in fig.axes[0].get_lines())


def test_ppl_vs_density_one_line_per_method_dense_dashed_log_y(summary_csv):
    fig = plots.ppl_vs_density_figure(plots._read_summary(summary_csv))
    ax = fig.axes[0]
    assert _labels(fig) == ["cap/cap", "cap/uniform", "dense", "wanda"]
    assert ax.get_yscale() == "log"
    dense = next(line for line in ax.get_lines() if line.get_label() == "dense")
    assert dense.get_linestyle() == "--" and set(dense.get_ydata()) == {10.0}
    cap = next(line for line in ax.get_lines() if line.get_label() == "cap/uniform")
    assert list(cap.get_xdata()) == [0.3, 0.5, 0.7] and list(cap.get_ydata()) == [80.0, 20.0, 12.0]
    assert "density" in ax.get_xlabel() and "perplexity" in ax.get_ylabel()


def test_zeroshot_vs_density_mean_accuracy_linear_y(summary_csv):
    fig = plots.zeroshot_vs_density_figure(plots._read_summary(summary_csv))
    ax = fig.axes[0]
    assert _labels(fig) == ["cap/cap", "cap/uniform", "dense", "wanda"]
    assert ax.get_yscale() == "linear" and "%" in ax.get_ylabel()
    wanda = next(line for line in ax.get_lines() if line.get_label() == "wanda")
    # a missing task accuracy is left out of that row's mean, not counted as zero
    assert wanda.get_ydata()[0] == pytest.approx(35.0) and wanda.get_ydata()[1] == pytest.approx(42.5)


def test_plot_files_are_png(summary_csv, tmp_path):
    for fn in (plots.plot_ppl_vs_density, plots.plot_zeroshot_vs_density):
        out = tmp_path / f"{fn.__name__}.png"
        fn(summary_csv, out)
        assert out.read_bytes()[:8] == PNG


def test_plots_of_an_empty_summary_still_draw(tmp_path):
    path = tmp_path / "summary.csv"
    path.write_text(",".join(COLUMNS[:9]) + "\n")
    plots.plot_ppl_vs_density(path, tmp_path / "a.png")
    plots.plot_zeroshot_vs_density(path, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == (tmp_path / "b.png").read_bytes()[:8] == PNG


def _bench(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("s\th:m:s\tmax_rss\n" f"{seconds}\t0:00:01\t100\n")


def test_stage_times_sums_jobs_per_rule(tmp_path):
    bench = tmp_path / "bench"
    _bench(bench / "decompose" / "mk" / "rk" / "layer_0.tsv", 1.5)
    _bench(bench / "decompose" / "mk" / "rk" / "layer_1.tsv", 2.5)
    _bench(bench / "evaluate_ppl" / "dense-mk" / "pydoc-k.tsv", 3.0)
    (bench / "allocate").mkdir()
    (bench / "allocate" / "empty.tsv").write_text("s\th:m:s\n")
    times = plots.stage_seconds(bench)
    assert times == {"decompose": (4.0, 2), "evaluate_ppl": (3.0, 1)}
    fig = plots.stage_times_figure(times)
    assert len(fig.axes[0].patches) == 2 and "(s)" in fig.axes[0].get_xlabel()
    plots.plot_stage_times(bench, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG


def test_summary_merges_zeroshot_and_ppl_records(tmp_path):
    run = {"method": "cap", "allocator": "uniform", "model": "tiny", "model_fp": "ab", "model_key": "mk",
           "comp_key": "ck", "seed": 0, "target_density": 0.5, "achieved_density": 0.5, "params_kept": 10}
    metrics = tmp_path / "metrics" / "ck"
    metrics.mkdir(parents=True)
    (metrics / "ppl-pydoc-k.json").write_text(json.dumps(run | {"dataset": "pydoc", "ppl": 12.345678}))
    (metrics / "zeroshot-z.json").write_text(json.dumps(run | {"kind": "zeroshot", "accuracy": {"glrs_cloze": 0.5}}))
    _bench(tmp_path / "bench" / "evaluate_zeroshot" / "ck" / "z.tsv", 7.0)
    rows = summary.write_summary(tmp_path, tmp_path / "summary.csv")
    assert len(rows) == 1
    assert rows[0]["ppl_pydoc"] == 12.3457 and rows[0]["acc_glrs_cloze"] == 0.5
    assert rows[0]["seconds_evaluate_zeroshot"] == 7.0
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert header.index("ppl_pydoc") < header.index("acc_glrs_cloze")


def test_summary_keeps_evaluation_protocols_apart(tmp_path):
    """The same model measured on two texts / token counts (another max_tokens, another Python's docs)
    gives two rows, each with its own protocol and its own evaluation time, never one mixed row."""
    run = {"method": "dense", "allocator": "", "model": "tiny", "model_fp": "ab", "model_key": "mk",
           "comp_key": "", "seed": "", "target_density": 1.0, "achieved_density": 1.0, "params_kept": 10}
    metrics = tmp_path / "metrics" / "dense-mk"
    metrics.mkdir(parents=True)
    for key, tokens, ppl, secs in (("a", 16384, 10.9, 3.0), ("b", 71680, 10.6, 11.0)):
        rec = run | {"dataset": "pydoc", "ppl": ppl, "tokens": tokens, "seqlen": 2048, "text_sha256": "f" * 64}
        (metrics / f"ppl-pydoc-{key}.json").write_text(json.dumps(rec))
        _bench(tmp_path / "bench" / "evaluate_ppl" / "dense-mk" / f"pydoc-{key}.tsv", secs)
    (metrics / "zeroshot-z.json").write_text(json.dumps(run | {"kind": "zeroshot", "limit": 40,
                                                                "accuracy": {"glrs_cloze": 0.5}}))
    rows = summary.write_summary(tmp_path, tmp_path / "summary.csv")
    assert len(rows) == 2
    by_tokens = {r["eval_pydoc"].split()[0]: r for r in rows}
    assert by_tokens["16384"]["ppl_pydoc"] == 10.9 and by_tokens["16384"]["seconds_evaluate_ppl"] == 3.0
    assert by_tokens["71680"]["ppl_pydoc"] == 10.6 and by_tokens["71680"]["seconds_evaluate_ppl"] == 11.0
    assert sum(r.get("acc_glrs_cloze") == 0.5 for r in rows) == 1  # the zero-shot record joins one row
    fig = plots.ppl_vs_density_figure(plots._read_summary(tmp_path / "summary.csv"))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("16384 tokens" in lab for lab in labels) and any("71680 tokens" in lab for lab in labels)


def test_write_versions(tmp_path):
    summary.write_versions({"model": "m", "seed": 0}, tmp_path / "v.csv", tmp_path / "c.yaml")
    versions = dict(csv.reader((tmp_path / "v.csv").read_text().splitlines()))
    assert versions["package"] == "version"
    assert {"python", "glrs", "torch", "transformers", "snakemake", "lm_eval"} <= set(versions)
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == {"model": "m", "seed": 0}


def test_allocation_difference_from_uniform_is_per_layer_and_matrix(tmp_path):
    def info(allocator, kept):
        mats = {}
        for layer, short, rank, nnz in kept:
            mats[f"model.layers.{layer}.{short}"] = {"layer": layer, "matrix": short, "shape": [4, 8], "rank": rank,
                                                    "nnz": nnz, "rank_available": 4, "nnz_available": 32}
        return {"allocator": allocator, "target_density": 0.5, "matrices": mats}

    uni = info("uniform", [(0, "q", 1, 4), (1, "q", 1, 4)])
    cap = info("cap", [(0, "q", 2, 0), (1, "q", 0, 16)])
    diff, layers = plots.density_minus(cap, uni)
    assert layers == [0, 1]
    q = plots.MATRICES.index("q")
    assert diff[0, q] == (2 * 12 - (12 + 4)) / 32 and diff[1, q] == (16 - 16) / 32
    other = info("uniform", [(0, "q", 1, 4), (1, "q", 1, 4)])
    other["matrices"]["model.layers.0.q"]["rank_available"] = 3
    with pytest.raises(ValueError, match="Stage-1"):
        plots.density_minus(cap, other)
    paths = []
    for name, i in (("u", uni), ("c", cap)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(i))
    plots.plot_allocation([str(p) for p in paths], tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_lm_eval_record(acc: dict, stderr: dict) -> dict:
    """What glrs.zeroshot.run_zeroshot returns, its numbers read from a fake lm-eval result dict (lm-eval's own
    keys, 'acc,none' and 'acc_stderr,none', through zeroshot._metric)."""
    from glrs import zeroshot

    lm_eval_results = {t: {"alias": t, "acc,none": acc[t], "acc_stderr,none": stderr[t]} for t in acc}
    results = {t: {m: zeroshot._metric(r, m) for m in ("acc", "acc_stderr")} | {"examples": 20} for t, r in
               lm_eval_results.items()}
    return {"tasks": list(acc), "offline_tasks": {"dataset": "pydoc", "n": 300, "fingerprint": "f" * 64},
            "limit": 20, "seed": 0, "results": results, "acc": {t: r["acc"] for t, r in results.items()}}


def test_zeroshot_standard_errors_reach_record_summary_table_and_plot(tmp_path, capsys):
    """lm-eval's standard error of each task is in the zero-shot record (stderr), in summary.csv (stderr_<task>),
    in the compact table (the mean's standard error, column ±) and in the plot (error bars)."""
    from glrs import cli, data

    run = {"method": "cap", "allocator": "uniform", "model": "tiny", "model_fp": "ab", "model_key": "mk",
           "comp_key": "ck", "seed": 0, "target_density": 0.5, "achieved_density": 0.5, "params_kept": 10}
    info = tmp_path / "info.json"
    info.write_text(json.dumps(run))
    acc, se = {"glrs_cloze": 0.5, "glrs_nextsent": 0.7}, {"glrs_cloze": 0.03, "glrs_nextsent": 0.04}
    out = tmp_path / "metrics" / "ck" / "zeroshot-z.json"
    out.parent.mkdir(parents=True)
    rec = cli.write_zeroshot_record(_fake_lm_eval_record(acc, se), str(info), "unused", list(acc), str(out), "pydoc")
    written = json.loads(out.read_text())
    assert written == rec and written["stderr"] == se and written["accuracy"] == acc
    assert written["texts"] == data.fingerprints("pydoc", "pydoc")  # the tasks are cut from pydoc's evaluation text
    rows = summary.write_summary(tmp_path, tmp_path / "summary.csv")
    assert rows[0]["stderr_glrs_cloze"] == 0.03 and rows[0]["stderr_glrs_nextsent"] == 0.04
    header, csv_rows = summary.read_summary(tmp_path / "summary.csv")
    assert header.index("acc_glrs_nextsent") < header.index("stderr_glrs_cloze") < header.index("zeroshot_limit")
    mean_se = summary.mean_accuracy_stderr(csv_rows[0], ["acc_glrs_cloze", "acc_glrs_nextsent"])
    assert mean_se == pytest.approx((0.03 ** 2 + 0.04 ** 2) ** 0.5 / 2)  # 0.025
    summary.print_summary(tmp_path / "summary.csv")
    table = capsys.readouterr().out
    head, first = table.splitlines()[:2]
    assert head.split()[-3:] == ["acc", "%", "\u00b1"] and first.split()[-2:] == ["60.0", "2.5"]
    assert "differences under about 2 standard errors do not separate methods" in " ".join(table.split())
    fig = plots.zeroshot_vs_density_figure(plots._read_summary(tmp_path / "summary.csv"))
    bars = [c for c in fig.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 1
    (segment,) = bars[0].lines[2][0].get_segments()
    assert [y for _, y in segment] == pytest.approx([60.0 - 2.5, 60.0 + 2.5])


def test_validation_perplexity_is_its_own_column_and_the_texts_are_in_the_row(tmp_path):
    """A validation record (role validation) fills ppl_<dataset>_validation and eval_<dataset>_validation on
    the row of its model, beside the evaluation record's columns; the row names the three texts; the
    perplexity figure draws the evaluation perplexity only."""
    run = {"method": "cap", "allocator": "uniform", "model": "tiny", "model_fp": "ab", "model_key": "mk",
           "comp_key": "ck", "seed": 0, "target_density": 0.5, "achieved_density": 0.5, "params_kept": 10}
    texts = {"calibration": "c" * 64, "validation": "a" * 64, "evaluation": "e" * 64}
    metrics = tmp_path / "metrics" / "ck"
    metrics.mkdir(parents=True)
    for role, key, ppl in (("evaluation", "k1", 20.0), ("validation", "k2", 30.0)):
        rec = run | {"dataset": "pydoc", "role": role, "ppl": ppl, "tokens": 1024, "seqlen": 128,
                     "text_sha256": texts[role], "texts": texts}
        (metrics / f"ppl-pydoc-{key}.json").write_text(json.dumps(rec))
        _bench(tmp_path / "bench" / "evaluate_ppl" / "ck" / f"pydoc-{key}.tsv", 2.0)
    rows = summary.write_summary(tmp_path, tmp_path / "summary.csv")
    assert len(rows) == 1
    row = rows[0]
    assert row["ppl_pydoc"] == 20.0 and row["ppl_pydoc_validation"] == 30.0
    assert row["eval_pydoc"].endswith("text eeeeeeeeee") and row["eval_pydoc_validation"].endswith("text aaaaaaaaaa")
    assert row["texts_pydoc"] == "calibration cccccccccc validation aaaaaaaaaa evaluation eeeeeeeeee"
    assert row["seconds_evaluate_ppl"] == 4.0
    fig = plots.ppl_vs_density_figure(plots._read_summary(tmp_path / "summary.csv"))
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_ydata()) == [20.0]
    header, csv_rows = summary.read_summary(tmp_path / "summary.csv")
    headings = [h for _, h, _ in summary.compact_columns(header, csv_rows)]
    assert "ppl" in headings and "val" in headings
