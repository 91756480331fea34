"""One config runs the whole comparison grid: every method and allocator at the same budget, one table."""
from __future__ import annotations

import csv

import pytest

from test_snakemake import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.pipeline

METHODS = ["cap", "magnitude", "wanda", "sparsegpt", "svd", "asvd", "svdllm", "oats", "bolaco", "sslc"]
ALLOCATORS = ["cap", "uniform", "rpca-threshold", "lowrank-only", "sparse-only"]


def test_every_method_and_allocator_meets_the_budget(tmp_path, tiny_llama_dir):
    write_config(
        tmp_path, tiny_llama_dir, methods=METHODS, allocators=ALLOCATORS, target_density=[0.6],
        allocator_params={name: {"epochs": 1} for name in ("cap", "lowrank-only", "sparse-only")},
        method_params={"bolaco": {"n_trials": 3}, "oats": {"iterations": 5}, "sslc": {"iters": 3}},
    )
    jobs = planned_jobs(tmp_path)
    assert jobs["allocate"] == len(ALLOCATORS) and jobs["compress"] == len(METHODS) - 1
    assert jobs["calibrate"] == 1  # one calibration set shared by CAP and every baseline
    snakemake(tmp_path)
    rows = list(csv.DictReader((tmp_path / "results" / "summary.csv").open()))
    seen = {(r["method"], r["allocator"]) for r in rows}
    assert seen == {("dense", "")} | {("cap", a) for a in ALLOCATORS} | {(m, "") for m in METHODS[1:]}
    for r in rows:
        if r["method"] != "dense":
            assert abs(float(r["achieved_density"]) - 0.6) <= 1e-3, r
            assert float(r["ppl_pydoc"]) > 1
