"""Snakemake through a real Slurm: `snakemake --executor slurm` runs glrs jobs to completion.

Needs a running Slurm whose node shares this filesystem, e.g. the single-node one that
`sudo bash tests/slurm/start_slurm.sh` starts on this host, and the executor plugin
(pip install snakemake-executor-plugin-slurm). Skipped, with the reason, otherwise.

The workflow is a tiny self-contained Snakefile (prepare a 2-layer random Llama, decompose each
layer as its own Slurm job, gather the results) run with the CPU-only test profile
tests/slurm/profile-cpu, which maps the pipeline's `gpu` resource to nothing.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "tests" / "slurm" / "profile-cpu"

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


SNAKEFILE = textwrap.dedent(
    """
    import json

    PY = config["python"]
    LAYERS = range(2)
    PARAMS = json.dumps({"lambda_scale": 1.0, "tol": 1e-7, "max_iter": 100, "rho": 1.5, "mu_factor": 1.25,
                         "dtype": "float64"})


    rule all:
        input:
            "summary.json",


    rule prepare_model:
        input:
            "hf/config.json",
        output:
            "model/glrs_manifest.json",
        shell:
            "{PY} -m glrs prepare-model --spec hf --out model"


    rule decompose:
        input:
            "model/glrs_manifest.json",
        output:
            rpca="rpca/layer_{i}.safetensors",
            job="jobs/layer_{i}.txt",
        resources:
            gpu=1,
        shell:
            "echo \\"$SLURM_JOB_ID $(hostname)\\" > {output.job} && "
            "{PY} -m glrs decompose --model-dir model --layer {wildcards.i} --params '{PARAMS}' --device auto "
            "--out {output.rpca}"


    rule gather:
        input:
            expand("rpca/layer_{i}.safetensors", i=LAYERS),
        output:
            "summary.json",
        run:
            from glrs.stage1 import read_rpca_layer

            summary = {}
            for path in input:
                meta, _ = read_rpca_layer(path)
                summary[meta["layer"]] = {k: m["rank"] for k, m in meta["matrices"].items()}
            with open(output[0], "w") as f:
                json.dump(summary, f)
    """
)

MAKE_MODEL = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out, tokenizer_dir = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # a real tokenizer: prepare-model checks it
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    """
)


def test_tiny_workflow_runs_through_slurm(tmp_path, real_tokenizer_dir):
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    subprocess.run([sys.executable, "-c", MAKE_MODEL, str(tmp_path / "hf"), str(real_tokenizer_dir)], check=True,
                   timeout=300)
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(tmp_path / "Snakefile"), "--directory", str(tmp_path),
           "--profile", str(PROFILE), "--config", f"python={sys.executable}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert "submitted with SLURM jobid" in log, log[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary) == ["0", "1"]
    assert all(set(ranks) == {"q", "k", "v", "o", "gate", "up", "down"} for ranks in summary.values())
    for i in range(2):
        job_id, _host = (tmp_path / "jobs" / f"layer_{i}.txt").read_text().split()
        assert job_id.isdigit(), "the decompose job did not run inside a Slurm allocation"
