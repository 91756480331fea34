"""Exactness where the answer is known: the compressed weights equal a slow, obvious computation.

Every check here compares the code under test with `slow_dense`, written the
textbook way -- U @ diag(sigma) @ V^T, plus a dense S filled one entry at a
time from flat row-major indices -- on square and non-square matrices, with a
non-empty sparse part and a non-zero rank, and with values that are all
distinct, so that each of these faults fails a test (each was planted in a
scratch copy and seen to fail):
  * sparse values misaligned with their indices (e.g. values kept in Stage-1
    order while indices are sorted, or the values reversed);
  * sparse indices read transposed (column-major, idx % m / idx // m);
  * the low-rank part dropped;
  * U and V exchanged.
The compact files are decoded the slow way (conftest.slow_read_compressed), and
the loaded module's forward is compared with x @ W^T of the dense export.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from glrs import allocate, compressed, pipeline
from glrs.methods import get_method
from glrs.layers import target_shapes
from glrs.stage1 import Stage1

from conftest import slow_dense, slow_read_compressed

transformers = pytest.importorskip("transformers")

# Fast, unconverged RPCA: exactness of the composition does not need a converged decomposition.
RPCA = {"lambda_scale": 1.0, "tol": 1e-4, "max_iter": 30, "rho": 1.5, "mu_factor": 1.25, "dtype": "float64"}
SHAPES = [(12, 12), (12, 20), (20, 12)]

pytestmark = pytest.mark.usefixtures("one_thread")


def random_factors(m, n, r, k, seed):
    """Random factors with distinct sparse values at k distinct flat positions (ascending)."""
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64)
    sigma = torch.rand(r, generator=g, dtype=torch.float64).sort(descending=True).values + 0.5
    S_index = torch.randperm(m * n, generator=g)[:k].sort().values
    S_values = (torch.rand(k, generator=g, dtype=torch.float64) + 1.0) * torch.where(
        torch.rand(k, generator=g) < 0.5, -1.0, 1.0).double() * torch.arange(1, k + 1).double()
    return {"U": U, "sigma": sigma, "V": V, "S_index": S_index, "S_values": S_values}


@pytest.mark.parametrize("shape", SHAPES)
def test_compose_and_module_equal_the_slow_composition(shape):
    m, n = shape
    f = random_factors(m, n, r=3, k=17, seed=m * 100 + n)
    want = slow_dense(**f, shape=shape)
    torch.testing.assert_close(compressed.compose(**f, shape=shape), want, rtol=1e-12, atol=1e-12)
    enc, rec = compressed.encode(f, shape, torch.float64)
    assert rec["support"] != "dense" and rec["rank"] == 3 and rec["nnz"] == 17
    module = compressed.LowRankSparseLinear.from_tensors(shape, enc)
    torch.testing.assert_close(module.dense_weight(), want, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 5, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(module(x), x @ want.T, rtol=1e-10, atol=1e-10)


# ---- the materialised CAP model: Stage-1 file + masks -> factored checkpoint and dense export ----------

@pytest.fixture(scope="module")
def materialised(tiny_prepared, tmp_path_factory):
    """Two layers decomposed, arbitrary (not prefix) keep-masks, materialised."""
    tmp = tmp_path_factory.mktemp("exact")
    files = []
    for layer in (0, 2):
        out = tmp / f"layer_{layer}.safetensors"
        pipeline.decompose_layer(str(tiny_prepared), layer, RPCA, str(out), device="cpu")
        files.append(str(out))
    g = torch.Generator().manual_seed(3)
    rank_keep, sparse_keep, shapes = {}, {}, {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["glrs"])
            for short, m in meta["matrices"].items():
                R, K = f.get_slice(f"{short}.sigma").get_shape()[0], f.get_slice(f"{short}.S_values").get_shape()[0]
                assert R >= 4 and K >= 8, "the test needs both parts in every matrix"
                rk, sk = torch.rand(R, generator=g) < 0.5, torch.rand(K, generator=g) < 0.3
                rk[1], rk[2], sk[1], sk[-1] = True, False, True, True  # never empty, never a prefix
                rank_keep[m["name"]], sparse_keep[m["name"]] = rk, sk
                shapes[m["name"]] = tuple(m["shape"])
    info = {"target_density": 0.5, "achieved_density": 0.5, "params_dense": 1}
    allocate.save(allocate.Allocation(rank_keep, sparse_keep), info, tmp / "a.json", tmp / "a.safetensors")
    out = tmp / "c"
    pipeline.materialise(str(tiny_prepared), Stage1.from_files(files), str(tmp / "a.safetensors"), str(tmp / "a.json"),
                         {"method": "cap", "allocator": "test"}, str(out), export="dense")
    return files, tmp / "a.safetensors", out, shapes


def _slow_expected(files, masks_file) -> dict[str, torch.Tensor]:
    """Kept parts, read from the raw files: sum of the kept sigma_k u_k v_k^T plus the kept S entries."""
    with safe_open(str(masks_file), framework="pt") as f:
        numel = json.loads(f.metadata()["bits"])  # one bit a candidate: bit j of byte b is candidate 8b + j
        masks = {}
        for k in f.keys():
            data = f.get_tensor(k).tolist()
            masks[k] = torch.tensor([(data[i // 8] >> (i % 8)) & 1 for i in range(numel[k])], dtype=torch.bool)
    want = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["glrs"])
            for short, m in meta["matrices"].items():
                name, shape = m["name"], tuple(m["shape"])
                rk, sk = masks[f"{name}.rank_keep"], masks[f"{name}.sparse_keep"]
                t = {p: f.get_tensor(f"{short}.{p}") for p in ("U", "sigma", "V", "S_index", "S_values")}
                kept = [k for k in range(rk.numel()) if rk[k]]
                entries = [j for j in range(sk.numel()) if sk[j]]
                want[name] = slow_dense(t["U"][:, kept], t["sigma"][kept], t["V"][:, kept],
                                        t["S_index"][entries], t["S_values"][entries], shape)
    return want


def test_materialised_weights_equal_the_kept_parts_of_stage_1(materialised, tiny_prepared):
    files, masks_file, out, shapes = materialised
    want = _slow_expected(files, masks_file)
    assert {s for s in shapes.values()} >= {(32, 32), (16, 32), (64, 32), (32, 64)}  # square and non-square
    factored = slow_read_compressed(out)
    assert set(factored) == set(shapes)
    dense = {}
    for shard in (out / compressed.DENSE_DIR).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            dense |= {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(next(tiny_prepared.glob("*.safetensors"))), framework="pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    for name in shapes:
        tol = {"rtol": 1e-5, "atol": 1e-6}  # float32 storage
        torch.testing.assert_close(dense[name].double(), want[name], **tol)
        torch.testing.assert_close(factored[name].double(), want[name], **tol)
        assert not torch.allclose(dense[name], original[name], atol=1e-4)
    for name, t in original.items():  # everything else is copied unchanged
        if name not in shapes:
            assert torch.equal(dense[name], t), name


def test_factored_forward_equals_dense_export_forward(materialised):
    files, masks_file, out, shapes = materialised
    want = _slow_expected(files, masks_file)
    g = torch.Generator().manual_seed(4)
    factored_model = compressed.load(out)
    for name, shape in shapes.items():
        module = factored_model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, compressed.LowRankSparseLinear)
        x = torch.randn(3, shape[1], generator=g)
        torch.testing.assert_close(module(x).double(), x.double() @ want[name].T, rtol=1e-4, atol=1e-5)
    dense_model = transformers.AutoModelForCausalLM.from_pretrained(out / compressed.DENSE_DIR).eval()
    ids = torch.randint(0, dense_model.config.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(factored_model(ids).logits, dense_model(ids).logits, rtol=1e-4, atol=1e-4)


# ---- baselines that write factors -------------------------------------------------------------------

def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


FACTORED_METHODS = [("svd", {}), ("asvd", {}), ("svdllm", {}), ("oats", {"iterations": 3}),
                    ("sslc", {"iters": 3}), ("bolaco", {"n_trials": 2})]


@pytest.mark.parametrize("name,params", FACTORED_METHODS, ids=[m for m, _ in FACTORED_METHODS])
def test_baseline_factors_equal_its_weights(name, params):
    model = tiny_llama()
    calib = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    out = get_method(name).compress(model, calib, 0.5, params, 0, "cpu")
    shapes = target_shapes(model)
    assert out.factors is not None and set(out.factors) == set(shapes)
    assert {s for s in shapes.values()} >= {(64, 64), (32, 64), (128, 64), (64, 128)}
    ranks, nnz = 0, 0
    g = torch.Generator().manual_seed(2)
    for key, f in out.factors.items():
        m, n = shapes[key]
        assert f["U"].shape[0] == m and f["V"].shape[0] == n
        assert out.params_kept[key] == f["U"].shape[1] * (m + n) + f["S_values"].numel()
        want = slow_dense(**f, shape=(m, n))
        scale = float(want.abs().max())
        torch.testing.assert_close(out.weights[key].double(), want, rtol=1e-4, atol=1e-5 * scale)
        enc, rec = compressed.encode(f, (m, n), torch.float64)
        if rec["support"] == "dense":  # the compact form would not be smaller: stored as the matrix itself
            module = lambda x, W=enc[""]: x @ W.T  # noqa: E731
        else:
            module = compressed.LowRankSparseLinear.from_tensors((m, n), enc)
        x = torch.randn(3, n, generator=g).double()
        torch.testing.assert_close(module(x).double(), x.double() @ out.weights[key].double().T, rtol=1e-4,
                                   atol=1e-5 * scale * n ** 0.5)
        ranks += f["U"].shape[1]
        nnz += f["S_values"].numel()
    assert ranks > 0
    if name in ("oats", "sslc"):
        assert nnz > 0
