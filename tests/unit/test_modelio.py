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
