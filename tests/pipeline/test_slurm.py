"""The repository's own Snakefile through a real Slurm (`snakemake --executor slurm`), on a tiny random Llama.

Needs a running Slurm whose node shares this filesystem, e.g. the single-node one that
`sudo bash tests/slurm/start_slurm.sh` starts on this host, and the executor plugin (a dependency of glrs).
Skipped, with the reason, otherwise.

The run uses profiles/slurm as a CPU-only cluster would (slurm_profile.cpu_profile: the same rules'
resources with no GPU and a test node's memory), checks that every job went through Slurm, one Slurm job
per layer for the per-layer rule, that its outputs are byte-identical to a local run of the same config,
and that a second run submits nothing.
"""
from __future__ import annotations

import csv
import filecmp
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from slurm_profile import cpu_profile
from test_snakemake import write_config

pytestmark = pytest.mark.slurm


def _slurm_unavailable() -> str | None:
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install snakemake-executor-plugin-slurm)"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm client tools (sinfo, sbatch) on PATH; start one with: sudo bash tests/slurm/start_slurm.sh"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s (slurmctld down?)"
    if out.returncode != 0:
        return f"sinfo fails ({out.stderr.strip() or out.returncode}); start Slurm with: sudo bash tests/slurm/start_slurm.sh"
    states = out.stdout.split()
    if not any(s.rstrip("*~#!%$@^-").lower() in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"Slurm has no usable node (sinfo states: {states or 'none'})"
    return None


def tiny_config(workdir: Path, model: Path) -> None:
    """CAP's default (learned Stage 2, no RPCA, per-layer refit) and one baseline (Wanda), short schedules."""
    write_config(workdir, model, methods=["cap", "wanda"], allocators=["cap"], stage1="weights",
                 evaluation={"zeroshot": {"tasks": []}}, plots={"spectra_layers": [0]})


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), *args]
    # Jobs run `python -m glrs` inside Slurm with the environment of this process (sbatch exports it):
    # this checkout's glrs first, as in the local run.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=workdir, env=env)


def slurm_jobs(workdir: Path) -> dict[str, list[tuple[str, str]]]:
    """rule -> [(wildcards, Slurm job id)] from the executor's per-job logs (.snakemake/slurm_logs/rule_<r>/<w>/<id>.log)."""
    jobs: dict[str, list[tuple[str, str]]] = {}
    for log in sorted((workdir / ".snakemake" / "slurm_logs").glob("rule_*/**/*.log")):
        rule = log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        jobs.setdefault(rule, []).append((log.parent.name, log.stem))
    return jobs


def job_stats(log: str) -> dict[str, int]:
    """rule -> job count from the 'Job stats' table that Snakemake prints before it starts."""
    table = log.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def test_real_snakefile_runs_through_slurm(tmp_path, tiny_llama_dir):
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    for wd in (local, slurm):
        wd.mkdir()
        tiny_config(wd, tiny_llama_dir)
    profile = cpu_profile(tmp_path / "profile")

    run = snakemake(local, "--cores", "2")
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    planned = job_stats(run.stdout + run.stderr)
    planned.pop("all")  # the default target gathers outputs: no job of its own
    run = snakemake(slurm, "--profile", str(profile))
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]

    # Every job that the local run ran was a Slurm job of its own, and Slurm saw each one complete.
    jobs = slurm_jobs(slurm)
    assert {rule: len(j) for rule, j in jobs.items()} == planned, log[-3000:]
    ids = {job_id: rule for rule, rule_jobs in jobs.items() for _, job_id in rule_jobs}
    assert all(i.isdigit() for i in ids) and len(ids) == sum(planned.values())
    assert log.count("submitted with SLURM jobid") == len(ids)
    # The executor names each job's rule in its Slurm comment; MinJobAge keeps finished jobs in squeue.
    seen = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T %k"],
                          capture_output=True, text=True, check=True).stdout.split("\n")
    seen = {i: (state, comment) for i, state, comment in (line.split() for line in seen if line)}
    assert set(seen) == set(ids)
    for i, (state, comment) in seen.items():
        assert state == "COMPLETED" and re.match(rf"rule_{ids[i]}(_wildcards_|$)", comment), (i, state, comment)
    # The per-layer rule: one Slurm job per layer of the tiny model (wildcards realise_key_layer).
    assert sorted(w.rsplit("_", 1)[1] for w, _ in jobs["realise"]) == ["0", "1", "2"], jobs["realise"]

    # Same config, same bytes: every compressed model and the summary's perplexities.
    comp_local = sorted(p.name for p in (local / "results" / "compressed").iterdir())
    assert comp_local == sorted(p.name for p in (slurm / "results" / "compressed").iterdir()) and len(comp_local) == 2
    for key in comp_local:
        a, b = local / "results" / "compressed" / key, slurm / "results" / "compressed" / key
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
        assert not mismatch and not errors, (key, mismatch, errors)

    def ppl(wd):
        return {(r["method"], r["allocator"]): r["ppl_pydoc"] for r in csv.DictReader((wd / "results" / "summary.csv").open())}

    assert ppl(slurm) == ppl(local) and len(ppl(local)) == 3

    # A second run finds everything done and submits nothing.
    again = snakemake(slurm, "--profile", str(profile))
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr
    assert "SLURM jobid" not in again.stdout + again.stderr
    assert slurm_jobs(slurm) == jobs
