"""glrs.stats at scale (issue 21): one layer's statistics in memory at a time, the upper triangle on disk,
resumable after an interruption, and the same numbers as the whole-model collection it replaced."""
from __future__ import annotations

import json
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glrs import modelio, stats
from glrs.layers import collect_stats


def _ids(n=4, seqlen=16, vocab=500, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_pack_round_trip_and_diagonal():
    A = torch.randn(7, 7, dtype=torch.float64)
    H = A @ A.T
    packed = stats.pack(H)
    assert packed.numel() == 7 * 8 // 2
    assert torch.equal(stats.unpack(packed), torch.triu(H) + torch.triu(H, 1).T)
    assert torch.equal(stats.packed_diagonal(packed), torch.diagonal(H))


def test_layer_files_equal_the_whole_model_collection(tiny_prepared, tmp_path):
    """Upper triangles bit-identical to what the former code path (collect_stats over the float32 model,
    H / tokens in float32) gave; read_layer mirrors them."""
    from transformers import AutoModelForCausalLM

    ids = _ids()
    stats.collect(str(tiny_prepared), ids, [0, 1, 2], str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_prepared, dtype=torch.float32).eval()
    old = collect_stats(model, ids, "cpu")
    assert not (tmp_path / stats.PARTIAL).exists()
    for layer in range(3):
        H = stats.read_layer(stats.layer_file(tmp_path, layer))
        with safe_open(str(stats.layer_file(tmp_path, layer)), framework="pt") as f:
            stored = {g: f.get_tensor(g) for g in f.keys()}
        diag = stats.read_diagonals(stats.layer_file(tmp_path, layer))
        for short, group in stats.INPUT_OF.items():
            st = old[modelio.weight_name(layer, short)]
            want = (st.H / st.tokens).to(torch.float32)
            assert torch.equal(stored[group], stats.pack(want)), (layer, short)
            assert torch.equal(H[short], stats.unpack(stats.pack(want)).double())
            assert torch.equal(diag[short], torch.diagonal(want).double())


def test_bfloat16_model_is_computed_in_float32(tiny_llama_dir, tmp_path):
    """A checkpoint stored in bfloat16 is held so and each layer computed in float32: the statistics equal
    those of the same weights loaded in float32 (the former path)."""
    from glrs.modelio import prepare_model
    from transformers import AutoModelForCausalLM

    prepared = tmp_path / "bf16"
    prepare_model(str(tiny_llama_dir), prepared, dtype="bfloat16")
    ids = _ids()
    stats.collect(str(prepared), ids, [0, 1, 2], str(tmp_path / "s"))
    model = AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.float32).eval()
    old = collect_stats(model, ids, "cpu")
    for layer in range(3):
        H = stats.read_layer(stats.layer_file(tmp_path / "s", layer))
        for short in stats.INPUT_OF:
            st = old[modelio.weight_name(layer, short)]
            assert torch.equal(H[short], stats.unpack(stats.pack((st.H / st.tokens).to(torch.float32))).double())


def test_interrupted_collection_resumes_from_the_partial_files(tiny_prepared, tmp_path, monkeypatch):
    """A rerun keeps the layers an interrupted job finished (under .partial/) and computes only the rest."""
    ids = _ids()
    full = tmp_path / "full"
    stats.collect(str(tiny_prepared), ids, [0, 1, 2], str(full))
    out = tmp_path / "resumed"
    (out / stats.PARTIAL).mkdir(parents=True)
    shutil.copy(stats.layer_file(full, 1), stats.layer_file(out / stats.PARTIAL, 1))
    seen = []
    real = stats.pack
    monkeypatch.setattr(stats, "pack", lambda H: seen.append(H.shape) or real(H))
    stats.collect(str(tiny_prepared), ids, [0, 1, 2], str(out))
    assert len(seen) == 2 * 4  # layers 0 and 2, four inputs each; layer 1 was kept
    for layer in range(3):
        a, b = stats.read_layer(stats.layer_file(full, layer)), stats.read_layer(stats.layer_file(out, layer))
        assert all(torch.equal(a[s], b[s]) for s in a)


def test_partial_file_of_other_inputs_is_recomputed(tiny_prepared, tmp_path):
    ids = _ids()
    out = tmp_path / "s"
    (out / stats.PARTIAL).mkdir(parents=True)
    meta = {"tokens": 1, "layers": [0], "version": stats.STATS_VERSION, "layer": 0}
    save_file({g: torch.zeros(3) for g in set(stats.INPUT_OF.values())}, str(stats.layer_file(out / stats.PARTIAL, 0)),
              metadata={"glrs": json.dumps(meta)})
    stats.collect(str(tiny_prepared), ids, [0], str(out))
    H = stats.read_layer(stats.layer_file(out, 0))
    assert H["q"].shape[0] > 2 and float(torch.diagonal(H["q"]).sum()) > 0


def test_version_1_file_is_a_clear_error(tmp_path):
    import pytest

    from glrs.errors import GlrsError

    path = tmp_path / "layer_0.safetensors"
    save_file({g: torch.eye(3) for g in set(stats.INPUT_OF.values())}, str(path),
              metadata={"glrs": json.dumps({"version": 1})})
    with pytest.raises(GlrsError, match="rerun the activations job"):
        stats.read_layer(path)
