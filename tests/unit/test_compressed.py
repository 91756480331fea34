"""The compressed model: the factored module equals its dense export, and both load back."""
import torch
from transformers import AutoModelForCausalLM

from glrs import allocate, compressed, pipeline

RPCA = {"lambda_scale": 1.0, "tol": 1e-6, "max_iter": 200, "rho": 1.5, "mu_factor": 1.25, "dtype": "float64"}


def test_low_rank_sparse_linear_matches_compose():
    g = torch.Generator().manual_seed(0)
    m, n, r = 12, 20, 3
    U, V, sigma = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g), torch.rand(r, generator=g)
    idx = torch.tensor([0, 5, 33, 100, 239])
    vals = torch.randn(5, generator=g)
    module = compressed.LowRankSparseLinear(U, sigma, V, idx, vals, (m, n))
    W = compressed.compose(U, sigma, V, idx, vals, (m, n))
    x = torch.randn(2, 4, n, generator=g)
    torch.testing.assert_close(module(x), x @ W.T)
    torch.testing.assert_close(module.dense_weight(), W)


def test_materialize_writes_loadable_dense_and_factored_forms(tiny_prepared, tmp_path):
    files = []
    for layer in range(3):
        out = tmp_path / f"layer_{layer}.safetensors"
        pipeline.decompose_layer(str(tiny_prepared), layer, RPCA, str(out), device="cpu")
        files.append(str(out))
    pipeline.run_allocator(files, "uniform", 0.5, {"rank_fraction": 0.5}, 0, None, None,
                           str(tmp_path / "a.json"), str(tmp_path / "a.safetensors"))
    info = pipeline.materialize(str(tiny_prepared), files, str(tmp_path / "a.safetensors"), str(tmp_path / "a.json"),
                                {"method": "cap", "allocator": "uniform"}, str(tmp_path / "c"))
    assert abs(info["achieved_density"] - 0.5) < 1e-3
    assert info["params_kept"] == allocate.summarize(allocate.load_pools(files), allocate.load_masks(tmp_path / "a.safetensors"), 0.5)["params_kept"]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "c" / "hf").eval()
    factored = compressed.load_factored(tmp_path / "c")
    assert isinstance(factored.model.layers[1].mlp.up_proj, compressed.LowRankSparseLinear)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(factored(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        original = AutoModelForCausalLM.from_pretrained(tiny_prepared).eval()
        assert not torch.allclose(original(ids).logits, dense(ids).logits)  # compression changed something


def test_decompose_is_bit_identical_across_runs(tiny_prepared, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pipeline.decompose_layer(str(tiny_prepared), 0, RPCA, str(a), device="cpu")
    pipeline.decompose_layer(str(tiny_prepared), 0, RPCA, str(b), device="cpu")
    assert a.read_bytes() == b.read_bytes()
