"""Semi-structured (2:4) low rank + sparse: CAP's realisation under `realise.sparsity: "2:4"` and OATS's `nm`.

Every realised or decomposed sparse support must be 2:4 (exactly 2 kept in every group of 4 consecutive
inputs of each row), every budget spent exactly up to a recorded leftover < m + n, a dense budget kept
exact, and the budgets moved under the 2:4 floor with the allocation's total.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from glrs import realise
from glrs.errors import GlrsError
from glrs.layers import target_shapes
from glrs.methods.oats import OATS, oats_budget_nm, oats_decompose

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(m=24, n=32, seed=0):
    """W with a weak low-rank part and inputs with correlated features of uneven scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64) ** 3 * 0.1
    W += 0.3 * torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.randn(2, n, generator=g, dtype=torch.float64)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n) + torch.eye(n, dtype=torch.float64)
    X = (torch.randn(8 * n, n, generator=g, dtype=torch.float64) @ A) * torch.exp(torch.randn(n, generator=g,
                                                                                                dtype=torch.float64))
    return W, X.T @ X / X.shape[0]


def _is_24(mask: torch.Tensor) -> bool:
    m, n = mask.shape
    return bool((mask.reshape(m, n // 4, 4).sum(-1) == 2).all())


def _mask_of(f: dict, shape) -> torch.Tensor:
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[f["S_index"]] = True
    return mask.reshape(shape)


def _compose(f, shape):
    W = (f["U"] * f["sigma"]) @ f["V"].T
    W.view(-1).index_add_(0, f["S_index"], f["S_values"].to(W.dtype))
    return W.reshape(shape)


P24 = {"sparsity": "2:4", "iterations": 8}


# ---- settings --------------------------------------------------------------------------------------

def test_settings_unstructured_unchanged_and_24_drops_rank_ratio():
    assert realise.resolve_params({}) == realise.resolve_params({"sparsity": "unstructured"}) == realise.DEFAULTS
    p = realise.resolve_params({"sparsity": "2:4", "rank_ratio": 0.3})
    assert p["sparsity"] == "2:4" and "rank_ratio" not in p  # ignored, so not in the key
    assert realise.resolve_params(p) == p  # idempotent: what the plan hashes is what the job resolves
    assert realise.nm_of(p) == (2, 4) and realise.nm_of(realise.resolve_params({})) is None
    with pytest.raises(GlrsError, match="realise.sparsity"):
        realise.resolve_params({"sparsity": "4:8"})
    with pytest.raises(GlrsError, match="mode refit"):
        realise.resolve_params({"sparsity": "2:4", "mode": "select"})
    with pytest.raises(GlrsError, match="rank_ratio"):  # still range-checked
        realise.resolve_params({"sparsity": "2:4", "rank_ratio": 2.0})


def test_split_budget_nm():
    assert realise.split_budget_nm((10, 20), 100) == (0, 100, 0)
    assert realise.split_budget_nm((10, 20), 100 + 2 * 30 + 7) == (2, 100, 7)
    assert realise.split_budget_nm((10, 20), 200) == (0, 200, 0)  # dense
    assert realise.split_budget_nm((10, 20), 199) == (3, 100, 9)
    for bad in (99, 201):
        with pytest.raises(GlrsError, match="budget"):
            realise.split_budget_nm((10, 20), bad)
    with pytest.raises(GlrsError, match="multiple of 4"):
        realise.split_budget_nm((10, 18), 100)


# ---- the realisation --------------------------------------------------------------------------------

@pytest.mark.parametrize("frac", [0.5, 0.6, 0.75, 0.97])
def test_realised_support_is_24_and_budget_spent(frac):
    W, H = _problem()
    m, n = W.shape
    budget = int(frac * m * n)
    f, rec = realise.realise_matrix(W, H, budget, realise.resolve_params(P24))
    mask = _mask_of(f, (m, n))
    assert _is_24(mask) and rec["nnz"] == m * n // 2 and not rec["dense"]
    assert rec["rank"] == (budget - m * n // 2) // (m + n)
    assert 0 <= rec["leftover"] < m + n
    assert rec["params"] == budget - rec["leftover"] == f["U"].numel() + f["V"].numel() + f["S_values"].numel()
    assert rec["error"] == pytest.approx(realise.output_error(W, _compose(f, (m, n)), H), rel=1e-9)
    assert rec["error"] <= rec["error_before_refit"]


def test_dense_budget_stays_exact():
    W, H = _problem()
    m, n = W.shape
    f, rec = realise.realise_matrix(W, H, m * n, realise.resolve_params(P24))
    assert rec["dense"] and rec["rank"] == 0 and rec["nnz"] == rec["params"] == m * n and rec["error"] == 0.0
    assert f["U"].shape == (m, 0) and torch.equal(_compose(f, (m, n)), W)


def test_refit_lowers_the_weighted_error_under_24():
    """On a random problem: same GoDec support, the refit against no refit (refit_iterations 0)."""
    for seed in range(3):
        W, H = _problem(m=32, n=48, seed=seed)
        m, n = W.shape
        budget = int(0.6 * m * n)
        _, plain = realise.realise_matrix(W, H, budget, realise.resolve_params(P24 | {"refit_iterations": 0}))
        f, fit = realise.realise_matrix(W, H, budget, realise.resolve_params(P24))
        assert plain["error"] == pytest.approx(plain["error_before_refit"])
        assert fit["error_before_refit"] == pytest.approx(plain["error"], rel=1e-9)  # the same decomposition
        assert fit["error"] < 0.9 * plain["error"]
        assert _is_24(_mask_of(f, (m, n)))


def test_godec_24_mask_at_rank_zero_is_the_24_mask_of_the_weights():
    from glrs.godec import SubspaceStep, godec
    from glrs.masks import nm_mask

    W, _ = _problem()
    _, _, mask = godec(W, 0, 0, 3, step=SubspaceStep, nm=(2, 4))
    assert torch.equal(mask, nm_mask(W.abs(), (2, 4)))


# ---- the budgets under the 2:4 floor ----------------------------------------------------------------

def _info(mats: dict, density=None) -> dict:
    info = {"matrices": {k: {"shape": list(s), "rank": 0, "nnz": b} for k, (s, b) in mats.items()}}
    return info | ({"target_density": density} if density is not None else {})


def test_budgets_redistributed_under_floor_and_cap():
    mats = {"a": ((8, 16), 128), "b": ((8, 16), 40), "c": ((16, 8), 90), "d": ((8, 32), 200), "e": ((4, 8), 20)}
    info = _info(mats)
    base = realise.matrix_budgets(info)
    out = realise.matrix_budgets_nm(info)
    assert sum(out.values()) == sum(base.values()) == sum(b for _, b in mats.values())
    for k, (s, _) in mats.items():
        assert s[0] * s[1] // 2 <= out[k] <= s[0] * s[1]
    assert out["a"] == 128  # the allocator made it dense: it stays dense
    assert out["b"] == 64  # below the floor: lifted to it
    # the others above their floors keep their order of excess, scaled down to pay for b
    assert out["c"] - 64 < 90 - 64 and out["d"] - 128 < 200 - 128
    assert (out["c"] - 64) / (out["d"] - 128) == pytest.approx((90 - 64) / (200 - 128), rel=0.1)


def test_budgets_nm_dense_matrices_give_when_the_rest_cannot_reach_their_floors():
    mats = {"a": ((8, 16), 128), "b": ((8, 16), 20), "c": ((8, 16), 60)}  # total 208 >= floors 192
    out = realise.matrix_budgets_nm(_info(mats))
    assert sum(out.values()) == 208 and out["a"] < 128 and out["b"] == 64 and out["c"] == 64
    # exactly at the floors: every matrix at its floor
    eq = realise.matrix_budgets_nm(_info({"a": ((8, 16), 100), "b": ((8, 16), 28)}))
    assert eq == {"a": 64, "b": 64}


def test_budgets_nm_infeasible_density_and_shape():
    with pytest.raises(GlrsError, match=r"needs >= 0.5"):
        realise.matrix_budgets_nm(_info({"a": ((8, 16), 50), "b": ((8, 16), 60)}))  # density 0.43
    # a target >= 0.5 that the allocator's rounding left a few parameters short: the floors
    short = _info({"a": ((64, 64), 2045), "b": ((64, 64), 2048)}, density=0.5)
    assert realise.matrix_budgets_nm(short) == {"a": 2048, "b": 2048}
    with pytest.raises(GlrsError, match=r"needs >= 0.5"):  # but not far short
        realise.matrix_budgets_nm(_info({"a": ((64, 64), 2000), "b": ((64, 64), 2048)}, density=0.5))
    with pytest.raises(GlrsError, match="multiple of 4"):
        realise.matrix_budgets_nm(_info({"a": ((8, 6), 40)}))


def test_realise_layer_24_writes_24_supports(tmp_path, monkeypatch):
    from glrs import modelio, stats

    W1, H1 = _problem(m=24, n=32, seed=1)
    W2, H2 = _problem(m=32, n=32, seed=2)
    monkeypatch.setattr(modelio, "read_layer", lambda model_dir, layer: {"q": W1.float(), "o": W2.float()})
    monkeypatch.setattr(stats, "read_layer", lambda path: {"q": H1, "o": H2})
    q, o = modelio.weight_name(0, "q"), modelio.weight_name(0, "o")
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"target_density": 0.6, "matrices": {
        q: {"shape": [24, 32], "rank": 0, "nnz": 300}, o: {"shape": [32, 32], "rank": 0, "nnz": 700}}}))
    meta = realise.realise_layer("unused", "unused", str(alloc), 0, P24, str(tmp_path / "l.safetensors"))
    _, factors = realise.read_realised(tmp_path / "l.safetensors")
    spent = 0
    for short, rec in meta["matrices"].items():
        shape = tuple(rec["shape"])
        assert _is_24(_mask_of(factors[rec["name"]], shape))
        assert rec["params"] == rec["budget"] - rec["leftover"] and rec["leftover"] < sum(shape)
        spent += rec["budget"]
    assert spent == 1000 and meta["params"]["sparsity"] == "2:4"
    assert meta["matrices"]["q"]["budget"] == 24 * 32 // 2  # 300 < floor 384: lifted, paid by o
    assert meta["matrices"]["q"]["allocated"] == 300


# ---- OATS nm -------------------------------------------------------------------------------------------

def test_oats_budget_nm():
    assert oats_budget_nm((16, 32), 0.5, (2, 4)) == (0, 256, 0)
    r, k, left = oats_budget_nm((16, 32), 0.7, (2, 4))
    assert k == 256 and r == (round(0.7 * 512) - 256) // 48 and left == round(0.7 * 512) - 256 - 48 * r < 48
    with pytest.raises(GlrsError, match=r">= 0.5"):
        oats_budget_nm((16, 32), 0.45, (2, 4))


def test_oats_decompose_nm_is_24_and_exact_in_its_factors():
    W, H = _problem(m=24, n=32)
    r, k, _ = oats_budget_nm(tuple(W.shape), 0.65, (2, 4))
    assert r > 0
    out, mask, _, f = oats_decompose(W, H.diagonal().sqrt(), r, k, 6, torch.float64, nm=(2, 4))
    assert _is_24(mask) and torch.equal(mask, _mask_of(f, W.shape))
    torch.testing.assert_close(_compose(f, W.shape), out, rtol=0, atol=1e-10)


def test_oats_compress_nm_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    out = OATS.compress(model, ids, 0.6, {"nm": "2:4", "iterations": 3}, 0, "cpu")
    shapes = target_shapes(model)
    for name, (m, n) in shapes.items():
        info = out.details["matrices"][name]
        assert _is_24(_mask_of(out.factors[name], (m, n)))
        assert info["nnz"] == m * n // 2 and 0 <= info["leftover"] < m + n
        assert out.params_kept[name] == info["rank"] * (m + n) + info["nnz"] == round(0.6 * m * n) - info["leftover"]
    assert out.details["unspent"] == sum(i["leftover"] for i in out.details["matrices"].values())
    with pytest.raises(GlrsError, match=r">= 0.5"):
        OATS.compress(model, ids, 0.4, {"nm": "2:4", "iterations": 1}, 0, "cpu")


def test_oats_nm_null_keeps_the_effective_params_and_feasibility():
    from glrs.methods import density_infeasible, effective_params

    assert "nm" not in effective_params("oats", {}) and "nm" not in effective_params("oats", {"nm": None})
    assert effective_params("oats", {"nm": "2:4"})["nm"] == "2:4"
    assert density_infeasible("oats", {"nm": "2:4"}, 0.6) == "" and density_infeasible("oats", {"nm": "2:4"}, 0.4)
    assert density_infeasible("wanda", {"nm": "2:4"}, 0.5) == "" and density_infeasible("wanda", {"nm": "2:4"}, 0.6)
    assert density_infeasible("wanda", {"nm": None}, 0.6) == ""
