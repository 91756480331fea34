# glrs: CAP (arXiv 2505.03801) as a content-addressed pipeline. docs/design.md section 3 draws the DAG.
# The whole plan (every key and path) is computed from the config before any job runs.
import os
import sys

sys.path.insert(0, workflow.basedir)

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from glrs.config import validate
from glrs.errors import GlrsError
from glrs.plan import key_pattern, make_plan, shell_json


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "workflow/report/workflow.rst"


try:
    PLAN = make_plan(validate(config))
except GlrsError as e:
    raise WorkflowError(f"glrs: {e}")
for _line in PLAN.excluded:  # N:M sparsity at a density it cannot keep (glrs/plan.py _feasible)
    print(f"glrs: not planned: {_line}", file=sys.stderr)

RESULTS = "results"

# Jobs run `python -m glrs` with the interpreter that runs Snakemake (the project's venv), unless
# Snakemake deploys the rules' conda environment (envs/glrs.yaml) itself.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(f'set -euo pipefail; export PATH="{os.path.dirname(sys.executable)}:$PATH"; ')


include: "workflow/rules/model.smk"
include: "workflow/rules/decompose.smk"
include: "workflow/rules/allocate.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/realise.smk"
include: "workflow/rules/materialise.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/plots.smk"


rule all:
    input:
        f"{RESULTS}/summary.csv",
        f"{RESULTS}/plots/spectra.png" if PLAN.cap_runs else [],
        f"{RESULTS}/plots/allocation.png" if PLAN.cap_runs else [],
        f"{RESULTS}/plots/ppl_vs_density.png",
        f"{RESULTS}/plots/zeroshot_vs_density.png" if PLAN.zeroshot_tasks else [],
        f"{RESULTS}/plots/stage_times.png",
        f"{RESULTS}/software_versions.csv",
        f"{RESULTS}/config_used.yaml",
    default_target: True
