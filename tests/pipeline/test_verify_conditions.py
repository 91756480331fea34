"""`glrs verify` after a run whose jobs used another thread count than verify itself (issue 13).

The workflow runs on a tiny random Llama up to the compressed models (CAP with the uniform
allocator and its realisation, and the magnitude baseline), every job with 2 threads; verify
runs with 1 thread.
It must recompute a sample of every kind of output under the recorded conditions and find
them identical; where a recorded condition is made to differ it must name it and compare
numerically; a real change of bytes must still fail.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO

pytestmark = pytest.mark.pipeline

JOB_THREADS = 2
RULES = ("prepare_model", "decompose", "calibrate", "activations", "allocate", "realise", "materialise_realised",
         "materialise", "compress")


def _config(workdir: Path, model: Path) -> None:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(
        model=str(model), device="cpu", methods=["cap", "magnitude"], target_density=[0.5], allocators=["uniform"],
        stage1="rpca", rpca=dict(cfg["rpca"], tol=1e-5, max_iter=200),  # the real RPCA (issue 13), not the default weights
        calibration={"dataset": "pydoc", "nsamples": 2, "seqlen": 32},
        evaluation={"datasets": ["pydoc"], "seqlen": 64, "max_tokens": 128, "zeroshot": {"tasks": []}},
        plots={"spectra_layers": [0]},
    )
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


def _verify(results: Path, *args: str) -> subprocess.CompletedProcess:
    """`glrs verify` in a fresh process with 1 thread (the jobs had JOB_THREADS)."""
    return subprocess.run([sys.executable, "-m", "glrs", "verify", "--results", str(results), "--threads", "1", *args],
                          capture_output=True, text=True)


def _verify_here(results: Path, capsys, *args: str) -> tuple[int, str, str]:
    """`glrs verify` in this process (cheaper: no second torch import); restores torch's thread count."""
    import torch

    from glrs.cli import main

    before = torch.get_num_threads()
    try:
        rc = main(["verify", "--results", str(results), "--threads", "1", *args])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_llama_dir) -> Path:
    wd = tmp_path_factory.mktemp("verify-threads")
    _config(wd, tiny_llama_dir)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
           "--configfile", str(wd / "config.yaml"), "--cores", str(JOB_THREADS),
           "--set-threads", *(f"{r}={JOB_THREADS}" for r in RULES), "--until", "materialise", "materialise_realised", "compress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return wd / "results"


def test_outputs_record_their_conditions(results):
    from glrs import conditions

    rpca = sorted(results.glob("rpca/*/*/layer_*.safetensors"))
    with safe_open(str(rpca[0]), framework="pt") as f:
        cond = json.loads(f.metadata()["glrs"])["conditions"]
    # the solver's thread count is fixed inside glrs, not the job's
    assert cond["threads"] == conditions.SOLVER_THREADS and cond["device"] == "cpu" and cond["dtype"] == "float64"
    assert {"torch", "blas", "lapack", "cpu_capability", "cpu_flags"} <= set(cond)
    alloc = json.loads(next(results.glob("alloc/*.json")).read_text())
    assert alloc["conditions"]["threads"] == JOB_THREADS
    assert set(alloc["inputs"]) == {"model_key", "stage1_key", "layers", "stage1"} and alloc["inputs"]["stage1"] == "files"
    comps = list(results.glob("compressed/*/conditions.json"))
    assert len(comps) == 2 and all(json.loads(c.read_text())["threads"] == JOB_THREADS for c in comps)
    with safe_open(str(next(results.glob("calib/*/*.safetensors"))), framework="pt") as f:
        assert "tokenizers" in json.loads(f.metadata()["glrs"])["conditions"]


def test_verify_with_another_thread_count_checks_every_kind(results):
    proc = _verify(results, "--sample", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if line and not line.startswith(" ")]
    checked = {(w[0], w[1]) for w in lines if len(w) >= 3}
    assert {k for s, k in checked} == {"rpca", "calib", "stats", "alloc", "realise", "compressed"}
    assert {s for s, k in checked} == {"identical"}, proc.stdout
    # 2 of 3 decomposed layers, 1 calibration file, 2 of 3 statistics files, 1 allocation,
    # 2 of 3 realised layers, 2 models (CAP realised, magnitude)
    assert sum(w[0] == "identical" for w in lines) == 2 + 1 + 2 + 1 + 2 + 2


def test_a_differing_condition_is_named_and_compared_numerically(results, capsys):
    rpca = sorted(results.glob("rpca/*/*/layer_*.safetensors"))[0]
    comp = next(p.parent for p in results.glob("compressed/*/glrs_format.json"))
    saved = rpca.read_bytes(), (comp / "conditions.json").read_bytes()
    try:
        with safe_open(str(rpca), framework="pt") as f:
            meta = json.loads(f.metadata()["glrs"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta["conditions"]["torch"] = "0.0.0"  # as if made by another torch
        save_file(tensors, str(rpca), metadata={"glrs": json.dumps(meta)})
        cond = json.loads((comp / "conditions.json").read_text())
        (comp / "conditions.json").write_text(json.dumps(cond | {"cpu_capability": "OTHER"}))
        rc, out, err = _verify_here(results, capsys, "--sample", "3", "--kinds", "rpca", "compressed")
        assert rc == 0, out + err
        assert f"close      rpca       {rpca}" in out
        assert f"close      compressed {comp}" in out
        assert "torch: 0.0.0 ->" in out and "cpu_capability: OTHER ->" in out
        assert "relative Frobenius error" in out
    finally:
        rpca.write_bytes(saved[0])
        (comp / "conditions.json").write_bytes(saved[1])


def test_changed_bytes_under_the_same_conditions_fail(results, capsys):
    rpca = sorted(results.glob("rpca/*/*/layer_*.safetensors"))[0]
    saved = rpca.read_bytes()
    try:
        with safe_open(str(rpca), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["q.sigma"] = tensors["q.sigma"] * (1 + 1e-6)
        save_file(tensors, str(rpca), metadata=metadata)
        rc, out, err = _verify_here(results, capsys, "--sample", "3", "--kinds", "rpca")
        assert rc == 2
        assert f"DIFFERENT  rpca       {rpca}  (bytes differ under the same conditions" in out
        assert "not reproducible" in err
    finally:
        rpca.write_bytes(saved)
