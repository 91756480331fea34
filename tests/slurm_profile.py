"""profiles/slurm as the tests' CPU-only Slurm runs it, and the rules it must name."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
CPU_OVERRIDES = REPO / "tests" / "slurm" / "cpu-overrides.yaml"


def workflow_rules() -> list[str]:
    """Every rule of the repository's Snakefile, from `snakemake --list-rules` (so a new or split rule is seen)."""
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--list-rules"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line.strip() for line in out.stdout.splitlines() if re.fullmatch(r"\s*\w+\s*", line)]


def cpu_profile(out_dir: Path) -> Path:
    """profiles/slurm with tests/slurm/cpu-overrides.yaml applied, written to out_dir/config.yaml: the same
    executor settings and the same rules, each rule's resources replaced by the test node's (no GPU)."""
    profile = yaml.safe_load(PROFILE.read_text())
    overrides = yaml.safe_load(CPU_OVERRIDES.read_text())
    per_rule = overrides.pop("rule-resources")
    profile.update(overrides)
    profile["set-resources"] = {rule: dict(per_rule) for rule in profile["set-resources"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out_dir
