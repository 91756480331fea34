"""The whole workflow on a tiny random Llama: DAG shape, outputs, and the cache contract of docs/design.md section 4."""
from __future__ import annotations

import copy
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.pipeline

HEAVY = {"prepare_model", "decompose", "calibrate", "activations", "allocate", "realise", "materialise",
         "materialise_realised", "evaluate_ppl"}


# The repository's default config, read once: every write_config of this module starts from the same
# values, so an edit of config/config.yaml while the module runs cannot pass for a parameter change
# (the revert test below would then see other RPCA parameters, hence other keys, than the first run).
BASE_CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def write_config(workdir: Path, model: Path, **overrides) -> Path:
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg.update(
        model=str(model), device="cpu", methods=["cap"], target_density=[0.5], allocators=["uniform"],
        # These tests are about Stage 1 (one RPCA job per layer, its bytes, its keys): the real RPCA,
        # whatever the default stage1 is (weights: the trivial split L = 0, S = W).
        stage1="rpca", rpca=dict(BASE_CONFIG["rpca"], tol=1e-5, max_iter=200),
        calibration={"dataset": "pydoc", "nsamples": 4, "seqlen": 64},
        evaluation={"datasets": ["pydoc"], "seqlen": 128, "max_tokens": 1024,
                    "zeroshot": {"tasks": ["glrs_nextsent"], "limit": 5}},
        plots={"spectra_layers": [0, 2]},
    )
    for key, value in overrides.items():
        cfg[key] = dict(cfg.get(key, {}), **value) if isinstance(value, dict) else value
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(workdir: Path) -> dict[str, int]:
    """rule -> job count of a dry run ('Job stats' table); empty when there is nothing to do."""
    out = snakemake(workdir, "-n").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_llama_dir):
    wd = tmp_path_factory.mktemp("workflow")
    write_config(wd, tiny_llama_dir)
    return wd


def test_dry_run_has_one_decompose_job_per_layer(workdir):
    jobs = planned_jobs(workdir)
    assert jobs["decompose"] == 3
    assert jobs["prepare_model"] == jobs["allocate"] == jobs["materialise_realised"] == jobs["activations"] == 1
    assert jobs["realise"] == 3  # CAP's realisation: one job per layer
    assert jobs["evaluate_ppl"] == 2  # dense and compressed
    assert {"summarise", "plot_allocation", "plot_spectra"} <= set(jobs)


def test_run_leaves_every_output(workdir):
    snakemake(workdir)
    res = workdir / "results"
    rpca = sorted(res.glob("rpca/*/*/layer_*.safetensors"))
    assert len(rpca) == 3
    from safetensors import safe_open

    with safe_open(str(rpca[0]), framework="pt") as f:
        assert {"q.U", "q.sigma", "q.V", "q.S_values", "q.S_index"} <= set(f.keys())
    alloc = json.loads(next(res.glob("alloc/*.json")).read_text())
    assert {"rank", "nnz"} <= set(next(iter(alloc["matrices"].values())))
    assert not list(res.glob("alloc/*.safetensors"))  # the realisation spends budgets: no keep-masks on disk
    comp = next(res.glob("compressed/*"))
    assert (comp / "glrs_format.json").is_file() and not (comp / "hf").exists()  # compact only, no dense export
    import glrs

    glrs.load(comp)
    rows = list(csv.DictReader((res / "summary.csv").open()))
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"dense", "cap"}
    assert float(by_method["cap"]["target_density"]) == 0.5
    assert abs(float(by_method["cap"]["achieved_density"]) - 0.5) < 1e-3
    for r in rows:
        assert float(r["ppl_pydoc"]) > 1
        assert float(r["seconds_evaluate_ppl"]) > 0
    assert float(by_method["cap"]["seconds_decompose"]) > 0
    for png in ("allocation.png", "spectra.png"):
        assert (res / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(res.rglob("*.tmp"))


def test_nothing_to_do_on_rerun(workdir):
    assert planned_jobs(workdir) == {}


def test_verify_recomputes_decompositions_bit_for_bit(workdir):
    proc = subprocess.run([sys.executable, "-m", "glrs", "verify", "--results", str(workdir / "results"), "--sample", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("identical  rpca") == 3 and "DIFFERENT" not in proc.stdout


def test_changing_density_reuses_every_decomposition(workdir, tiny_llama_dir):
    write_config(workdir, tiny_llama_dir, target_density=[0.3])
    jobs = planned_jobs(workdir)
    assert "decompose" not in jobs and "prepare_model" not in jobs and "activations" not in jobs
    assert jobs["allocate"] == jobs["materialise_realised"] == jobs["evaluate_ppl"] == 1
    assert jobs["realise"] == 3
    snakemake(workdir)
    rows = list(csv.DictReader((workdir / "results" / "summary.csv").open()))
    assert sorted(float(r["target_density"]) for r in rows) == [0.3, 0.5, 1.0]  # the whole tree, old runs included


def test_validation_adds_only_its_perplexities(workdir, tiny_llama_dir):
    """evaluation.validation: one more evaluate_ppl job per model (dense and compressed), nothing else reruns; the
    rows get the validation perplexity beside the evaluation's, and name their three texts."""
    from glrs import data

    write_config(workdir, tiny_llama_dir, target_density=[0.3],
                 evaluation={"datasets": ["pydoc"], "seqlen": 128, "max_tokens": 1024, "validation": True,
                             "zeroshot": {"tasks": ["glrs_nextsent"], "limit": 5}})
    jobs = planned_jobs(workdir)
    assert jobs["evaluate_ppl"] == 2 and not set(jobs) & (HEAVY - {"evaluate_ppl"}) and "evaluate_zeroshot" not in jobs
    snakemake(workdir)
    rows = {r["method"] + r["target_density"]: r for r in csv.DictReader((workdir / "results" / "summary.csv").open())}
    fp = {role: data.load_text("pydoc", role).fingerprint[:10] for role in data.ROLES}
    for key, cal in (("dense1.0", "none"), ("cap0.3", fp["calibration"])):
        row = rows[key]
        assert float(row["ppl_pydoc_validation"]) > 1 and float(row["ppl_pydoc"]) > 1
        assert row["eval_pydoc_validation"].endswith(fp["validation"]) and row["eval_pydoc"].endswith(fp["evaluation"])
        assert row["texts_pydoc"] == f"calibration {cal} validation {fp['validation']} evaluation {fp['evaluation']}"
        assert row["stderr_glrs_nextsent"] != ""


def test_rpca_parameter_change_is_new_keys_and_revert_is_free(workdir, tiny_llama_dir):
    before = set((workdir / "results").glob("rpca/*/*/layer_*.safetensors"))
    write_config(workdir, tiny_llama_dir, target_density=[0.3], rpca={"tol": 1e-4})
    assert planned_jobs(workdir)["decompose"] == 3
    snakemake(workdir)
    after = set((workdir / "results").glob("rpca/*/*/layer_*.safetensors"))
    assert before < after and len(after) == 6  # new keys; the old factors stay on disk
    write_config(workdir, tiny_llama_dir, target_density=[0.3])
    # Back to the old parameters: every heavy stage is found again. Only the aggregates over the
    # current plan (summary table and plots, seconds) are redrawn, because their input set changed.
    assert not set(planned_jobs(workdir)) & HEAVY


def test_stage1_weights_plans_no_stage1_and_switching_back_is_free(workdir, tiny_llama_dir):
    """The default stage1 weights has no decompose job and writes nothing under results/rpca/: its
    consumers split the model's weights in memory (glrs.stage1). Its CAP runs are complete, realised
    (refit) and selected (the kept candidates of S = W); verify recomputes their allocations from the
    weights; back to ialm, everything is found again."""
    res = workdir / "results"

    def stage1_traces():
        return {p for d in ("rpca", "bench/decompose", "logs/decompose") for p in res.glob(f"{d}/**/*")}

    before = stage1_traces()
    write_config(workdir, tiny_llama_dir, target_density=[0.3], stage1="weights")
    jobs = planned_jobs(workdir)
    assert "decompose" not in jobs and "activations" not in jobs and "prepare_model" not in jobs
    assert jobs["allocate"] == jobs["materialise_realised"] == 1 and "plot_spectra" in jobs
    snakemake(workdir)
    assert not set(planned_jobs(workdir)) & HEAVY
    write_config(workdir, tiny_llama_dir, target_density=[0.3], stage1="weights", realise={"mode": "select"})
    jobs = planned_jobs(workdir)
    # the same allocation (its key does not depend on realise.mode), its kept candidates materialised
    assert "decompose" not in jobs and "allocate" not in jobs and jobs["materialise"] == 1
    snakemake(workdir)
    assert stage1_traces() == before  # nothing written under results/rpca/, no decompose job ran
    infos = [json.loads(i.read_text()) for i in res.glob("compressed/*/info.json")]
    none = [i for i in infos if "stage1=weights" in i["variant"].split()]
    assert {i["variant"].split()[-1] for i in none} == {"realise=refit", "realise=select"}
    assert float(next(r for r in csv.DictReader((res / "summary.csv").open())
                      if r["method"] == "cap" and r["variant"] == "stage1=weights realise=select")["achieved_density"]) > 0.29
    proc = subprocess.run([sys.executable, "-m", "glrs", "verify", "--results", str(res), "--sample", "20",
                           "--kinds", "alloc", "compressed"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DIFFERENT" not in proc.stdout and "skipped" not in proc.stdout, proc.stdout
    none_allocs = {i["alloc_key"] for i in none}
    assert len(none_allocs) == 1
    assert all(f"identical  alloc      {res}/alloc/{k}.json" in proc.stdout for k in none_allocs), proc.stdout
    write_config(workdir, tiny_llama_dir, target_density=[0.3])
    assert not set(planned_jobs(workdir)) & HEAVY


def test_default_config_plans_no_decompose_job(tmp_path):
    """config/config.yaml as it is (stage1 weights): no decompose job, the spectra plot still drawn."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    assert BASE_CONFIG["stage1"] == "weights"
    jobs = planned_jobs(tmp_path)
    assert "decompose" not in jobs and "plot_spectra" in jobs and jobs["allocate"] == len(BASE_CONFIG["allocators"])


def test_bad_config_stops_before_any_job(workdir, tiny_llama_dir):
    write_config(workdir, tiny_llama_dir, target_density=[1.5])
    proc = snakemake(workdir, "-n", check=False)
    assert proc.returncode != 0
    assert "target_density" in proc.stdout + proc.stderr and "<= 1" in proc.stdout + proc.stderr
    write_config(workdir, tiny_llama_dir, layers=[7])
    proc = snakemake(workdir, "-n", check=False)
    assert proc.returncode != 0 and "out of range" in proc.stdout + proc.stderr
