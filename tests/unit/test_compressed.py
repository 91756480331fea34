"""The compact compressed checkpoint (glrs.compressed): exact round trip, loading without a dense copy,
2:4 detection, sizes, clear errors for damaged files, and that the format version is read forward."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import glrs
from glrs import allocate, compressed, pipeline
from glrs.errors import GlrsError
from glrs.stage1 import Stage1

RPCA = {"lambda_scale": 1.0, "tol": 1e-6, "max_iter": 200, "rho": 1.5, "mu_factor": 1.25, "dtype": "float64"}


def _parts(m, n, r, keep, g, dtype=torch.float64):
    flat = torch.rand(m * n, generator=g) < keep
    idx = torch.nonzero(flat).squeeze(1)
    return {"U": torch.randn(m, r, generator=g, dtype=dtype), "sigma": torch.rand(r, generator=g, dtype=dtype) + 0.5,
            "V": torch.randn(n, r, generator=g, dtype=dtype), "S_index": idx,
            "S_values": torch.randn(idx.numel(), generator=g, dtype=dtype)}


def _module(enc, shape):
    return compressed.LowRankSparseLinear.from_tensors(shape, enc)


@pytest.mark.parametrize("keep,support", [(0.45, "bitmask"), (0.02, "cols")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_round_trip_is_exact(keep, support, dtype):
    """Values, support and dtype come back exactly; the low rank as sqrt(sigma)-folded factors."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 64, 256, 3
    parts = _parts(m, n, r, keep, g)
    enc, rec = compressed.encode(parts, (m, n), dtype)
    assert rec["support"] == support and rec["nnz"] == parts["S_index"].numel() and rec["rank"] == r
    assert enc["values"].dtype == dtype and enc["U"].dtype == dtype
    mod = _module(enc, (m, n))
    S = torch.zeros(m * n, dtype=dtype)
    S[parts["S_index"]] = parts["S_values"].to(dtype)
    assert torch.equal(mod.sparse_weight(), S.view(m, n))  # bit for bit
    root = parts["sigma"].sqrt()
    assert torch.equal(mod.U, (parts["U"] * root).to(dtype)) and torch.equal(mod.V, (parts["V"] * root).to(dtype))
    want = compressed.compose(**parts, shape=(m, n))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(mod.dense_weight(torch.float64), want, rtol=tol, atol=tol * want.abs().max().item())
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mod(x.to(dtype)).double(), x @ want.T, rtol=tol * 4, atol=tol * 4 * (x @ want.T).abs().max().item())


def test_support_choice_and_dense_fallback():
    g = torch.Generator().manual_seed(1)
    dense_enc, rec = compressed.encode(_parts(16, 16, 2, 0.95, g), (16, 16), torch.float32)
    assert rec["support"] == "dense" and list(dense_enc) == [""]
    sizes = compressed.support_bytes((576, 1536), 400_000)
    assert sizes["bitmask"] == 576 * 192 and sizes["cols"] == 2 * 400_000 + 4 * 577


def test_two_to_four_pattern_is_detected_and_bits_round_trip():
    g = torch.Generator().manual_seed(2)
    m, n = 8, 16
    scores = torch.rand(m, n, generator=g)
    from glrs.masks import nm_mask

    mask = nm_mask(scores, (2, 4))
    assert compressed.is_2to4(mask) and not compressed.is_2to4(torch.rand(m, n, generator=g) < 0.9)
    assert torch.equal(compressed.unpack_bitmask(compressed.pack_bitmask(mask), n), mask)
    idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
    parts = {"U": torch.zeros(m, 0), "sigma": torch.zeros(0), "V": torch.zeros(n, 0), "S_index": idx,
             "S_values": torch.randn(idx.numel(), generator=g)}
    _, rec = compressed.encode(parts, (m, n), torch.float16)
    assert rec["pattern"] == "2:4"


def _materialised(tiny_prepared, tmp_path, export="none"):
    files = []
    for layer in range(3):
        out = tmp_path / f"layer_{layer}.safetensors"
        pipeline.decompose_layer(str(tiny_prepared), layer, RPCA, str(out), device="cpu")
        files.append(str(out))
    pipeline.run_allocator(Stage1.from_files(files), "uniform", 0.5, {"rank_fraction": 0.5}, 0, None, None,
                           str(tmp_path / "a.json"), str(tmp_path / "a.safetensors"))
    info = pipeline.materialise(str(tiny_prepared), Stage1.from_files(files), str(tmp_path / "a.safetensors"), str(tmp_path / "a.json"),
                                {"method": "cap", "allocator": "uniform"}, str(tmp_path / "c"), export)
    return files, info


def test_materialise_loads_as_itself_without_a_dense_copy(tiny_prepared, tmp_path, monkeypatch):
    files, info = _materialised(tiny_prepared, tmp_path)
    out = tmp_path / "c"
    assert not (out / compressed.DENSE_DIR).exists()  # the dense export only when asked
    assert not (out / "model.safetensors").exists()  # nothing Hugging Face would load as a dense model
    assert abs(info["achieved_density"] - 0.5) < 1e-3
    assert info["params_kept"] == allocate.summarise(allocate.load_pools(files), allocate.load_masks(tmp_path / "a.safetensors"), 0.5)["params_kept"]
    assert info["bytes"]["targets"] < info["bytes_dense"]["targets"]
    # Loading never composes a dense target: forbid it while loading.
    monkeypatch.setattr(compressed.LowRankSparseLinear, "dense_weight", lambda *a, **k: pytest.fail("dense target formed"))
    monkeypatch.setattr(compressed, "compose", lambda *a, **k: pytest.fail("dense target formed"))
    model = glrs.load(out)
    monkeypatch.undo()
    assert isinstance(model.model.layers[1].mlp.up_proj, compressed.LowRankSparseLinear)
    # Its logits are those of the dense model carrying the composed matrices.
    reference = AutoModelForCausalLM.from_pretrained(tiny_prepared).eval()
    header = compressed.read_format(out)
    with torch.no_grad():
        for name in header["targets"]:
            mod = model.get_submodule(name.removesuffix(".weight"))
            reference.get_submodule(name.removesuffix(".weight")).weight.copy_(mod.dense_weight())
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        original = AutoModelForCausalLM.from_pretrained(tiny_prepared).eval()
        assert not torch.allclose(original(ids).logits, model(ids).logits)  # compression changed something


def test_dense_export_on_request_matches_the_compact_model(tiny_prepared, tmp_path):
    _materialised(tiny_prepared, tmp_path, export="dense")
    out = tmp_path / "c"
    exported = AutoModelForCausalLM.from_pretrained(out / compressed.DENSE_DIR).eval()
    model = glrs.load(out)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, exported(ids).logits, rtol=1e-4, atol=1e-4)


def test_damaged_files_give_a_clear_error(tiny_prepared, tmp_path):
    _materialised(tiny_prepared, tmp_path)
    out = tmp_path / "c"
    layer = out / compressed.layer_file(1)
    data = layer.read_bytes()
    layer.write_bytes(data[: len(data) // 2])
    with pytest.raises(GlrsError, match=r"layer-00001\.safetensors.*(truncated|past the end)"):
        glrs.load(out)
    layer.write_bytes(b"\x00garbage")
    with pytest.raises(GlrsError, match=r"layer-00001\.safetensors"):
        glrs.load(out)
    layer.unlink()
    with pytest.raises(GlrsError, match=r"layer-00001\.safetensors is missing"):
        glrs.load(out)
    with pytest.raises(GlrsError, match="not a glrs compressed model"):
        glrs.load(tiny_prepared)


def test_format_version_is_read_forward_and_newer_is_refused(tiny_prepared, tmp_path):
    """A model saved by this version records its format version; a loader reads every version up to its
    own and refuses a newer one by name (so the next glrs, with a higher version, loads this one)."""
    _materialised(tiny_prepared, tmp_path)
    fmt = tmp_path / "c" / compressed.FORMAT_FILE
    header = json.loads(fmt.read_text())
    assert header["format"] == compressed.FORMAT and header["version"] == compressed.FORMAT_VERSION
    header["version"] = compressed.FORMAT_VERSION + 1
    fmt.write_text(json.dumps(header))
    with pytest.raises(GlrsError, match="newer than this glrs reads"):
        glrs.load(tmp_path / "c")


def test_materialise_is_bit_identical_across_runs(tiny_prepared, tmp_path):
    _materialised(tiny_prepared, tmp_path / "a")
    _materialised(tiny_prepared, tmp_path / "b")
    for f in sorted((tmp_path / "a" / "c").iterdir()):
        if f.name != "conditions.json":
            assert f.read_bytes() == (tmp_path / "b" / "c" / f.name).read_bytes(), f.name


def test_decompose_is_bit_identical_across_runs(tiny_prepared, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pipeline.decompose_layer(str(tiny_prepared), 0, RPCA, str(a), device="cpu")
    pipeline.decompose_layer(str(tiny_prepared), 0, RPCA, str(b), device="cpu")
    assert a.read_bytes() == b.read_bytes()


def test_prefix_allocations_materialise_without_keep_masks(tiny_prepared, tmp_path):
    """An allocation that keeps prefixes (uniform here) needs no masks file: its .json's counts give the same
    model, byte for byte; one that kept other candidates is refused without its masks, naming the fix."""
    files, _ = _materialised(tiny_prepared, tmp_path / "a")
    alloc = json.loads((tmp_path / "a" / "a.json").read_text())
    assert alloc["kept"] == "prefixes"
    pipeline.materialise(str(tiny_prepared), Stage1.from_files(files), None, str(tmp_path / "a" / "a.json"),
                         {"method": "cap", "allocator": "uniform"}, str(tmp_path / "b"))
    for f in sorted((tmp_path / "a" / "c").iterdir()):
        if f.name != "conditions.json":
            assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    alloc["kept"] = "masks"
    (tmp_path / "masked.json").write_text(json.dumps(alloc))
    with pytest.raises(GlrsError, match="--masks"):
        pipeline.materialise(str(tiny_prepared), Stage1.from_files(files), None, str(tmp_path / "masked.json"),
                             {"method": "cap", "allocator": "cap"}, str(tmp_path / "d"))


def test_allocation_writes_keep_masks_only_when_asked(tiny_prepared, tmp_path):
    files, _ = _materialised(tiny_prepared, tmp_path / "a")
    pipeline.run_allocator(Stage1.from_files(files), "uniform", 0.5, {"rank_fraction": 0.5}, 0, None, None, str(tmp_path / "b.json"))
    assert not list(tmp_path.glob("*.safetensors"))
    a, b = (json.loads(p.read_text()) for p in (tmp_path / "a" / "a.json", tmp_path / "b.json"))
    assert a["matrices"] == b["matrices"]
