"""The perplexity protocol (docs/design.md section 7), pinned on a fixed text."""
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from glrs import data, evaluate


def test_protocol_matches_a_direct_loop_over_model_with_labels(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = data.tokenize(tokenizer, data.load_text("pydoc", "evaluation"))[:, :1000]
    result = evaluate.perplexity(model, ids, seqlen=128)
    assert result["windows"] == 1000 // 128 == 7
    assert result["tokens"] == 7 * 128 and result["seqlen"] == 128
    with torch.no_grad():
        losses = [model(ids[:, i * 128 : (i + 1) * 128], labels=ids[:, i * 128 : (i + 1) * 128]).loss for i in range(7)]
    assert math.isclose(result["ppl"], math.exp(torch.stack(losses).mean().item()), rel_tol=1e-5)


def test_seqlen_is_capped_by_the_model_context(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 100, (1, 600), generator=torch.Generator().manual_seed(0))
    assert evaluate.perplexity(model, ids, seqlen=2048)["seqlen"] == model.config.max_position_embeddings == 256


def test_records_name_their_text_and_all_three_texts(tiny_prepared, tmp_path):
    """An evaluation and a validation perplexity of one model: each measures its own text (its SHA-256 in
    text_sha256) and both name the calibration, validation and evaluation texts (glrs.data.fingerprints)."""
    import json

    import pytest

    from glrs import pipeline
    from glrs.errors import GlrsError

    texts = {role: data.load_text("pydoc", role).fingerprint for role in data.ROLES}
    recs = {}
    for role in ("evaluation", "validation"):
        out = tmp_path / f"{role}.json"
        pipeline.evaluate_ppl(str(tiny_prepared), None, "pydoc", 64, 128, "float32", str(out), "cpu", role, "pydoc")
        recs[role] = json.loads(out.read_text())
        assert recs[role]["role"] == recs[role]["split"] == role
        assert recs[role]["text_sha256"] == texts[role]
        assert recs[role]["texts"] == texts
    assert recs["evaluation"]["ppl"] != recs["validation"]["ppl"]  # two texts, two numbers
    dense = pipeline.evaluate_ppl(str(tiny_prepared), None, "pydoc", 64, 128, "float32", str(tmp_path / "d.json"), "cpu")
    assert dense["role"] == "evaluation" and dense["texts"]["calibration"] is None
    with pytest.raises(GlrsError, match="role 'test'"):
        pipeline.evaluate_ppl(str(tiny_prepared), None, "pydoc", 64, 128, "float32", str(tmp_path / "x.json"), "cpu", "test")
