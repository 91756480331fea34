"""profiles/slurm: Snakemake parses it, and it sets every rule's memory, time, CPUs and GPU (its set-resources,
written by benchmarks/scale/slurm_resources.py, is the one place those numbers live)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from slurm_profile import PROFILE, REPO, workflow_rules

KEYS = {"mem_mb", "runtime", "cpus_per_task", "gpu"}


@pytest.fixture(scope="module")
def rules() -> list[str]:
    # `all` is the default target: it gathers outputs and runs no job, so it needs no resources.
    return [r for r in workflow_rules() if r != "all"]


def test_snakemake_parses_the_profile():
    # --list-rules reads the profile (an unknown key or a malformed value stops it) without submitting anything.
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                          "--profile", str(PROFILE.parent), "--list-rules"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]


def test_profile_sets_every_rules_resources(rules):
    assert "realise" in rules and len(rules) > 10  # the rule list really came from the workflow
    set_resources = yaml.safe_load(PROFILE.read_text())["set-resources"]
    assert sorted(set_resources) == sorted(rules), "re-run benchmarks/scale/slurm_resources.py"
    for rule, res in set_resources.items():
        assert set(res) == KEYS, rule
        assert res["mem_mb"] >= 1000 and 30 <= res["runtime"] <= 1440 and res["cpus_per_task"] >= 1, rule
        assert res["gpu"] in (0, 1), rule


def test_profile_gpus_are_the_rules_gpus(rules):
    """A rule that declares gpu=1 (the local GPU scheduling of profiles/local-gpu) asks Slurm for one GPU; no other does."""
    sys.path.insert(0, str(REPO / "benchmarks" / "scale"))
    from slurm_resources import rule_gpus

    declared = rule_gpus(REPO / "workflow" / "rules")
    assert sorted(declared) == sorted(rules)
    set_resources = yaml.safe_load(PROFILE.read_text())["set-resources"]
    assert {r: set_resources[r]["gpu"] for r in rules} == declared
    assert 0 < sum(declared.values()) < len(rules)


def test_profile_is_what_the_script_writes(tmp_path):
    out = tmp_path / "config.yaml"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale" / "slurm_resources.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    assert out.read_text() == PROFILE.read_text(), "re-run benchmarks/scale/slurm_resources.py"
