"""The seam between allocators and realisers: realise.mode wanda | sparsegpt spend any allocation's per-matrix
budgets as pure sparsity by the baselines' own pruning rules (glrs.realise.prune_matrix)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from glrs import modelio, pipeline, realise, stats
from glrs.errors import GlrsError
from glrs.layers import LayerStats
from glrs.masks import exact_count
from glrs.methods.sparsegpt import sparsegpt_prune
from glrs.methods.wanda import wanda_mask


def _problem(m=48, n=64, tokens=256, seed=0):
    """W [m, n] float32 (a model's dtype), and the input sum X^T X (what the baselines hold) with its token count;
    column scales span two orders of magnitude so that the activation weighting matters."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64).pow(3).float()
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, n, dtype=torch.float64)
    return W, X.T @ X, tokens


def _mask(factors: dict, shape) -> torch.Tensor:
    m, n = shape
    mask = torch.zeros(m * n, dtype=torch.bool)
    mask[factors["S_index"]] = True
    return mask.reshape(m, n)


def _dense(factors: dict, shape) -> torch.Tensor:
    m, n = shape
    W = torch.zeros(m * n, dtype=torch.float64)
    W[factors["S_index"]] = factors["S_values"].to(torch.float64)
    return W.reshape(m, n)


def _is_24(mask: torch.Tensor) -> bool:
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def _params(mode, **kw):
    return realise.resolve_params({"mode": mode} | kw)


def test_pruning_modes_keep_only_their_settings():
    """The refit's settings are checked but are not the pruning realisers' (so not in their keys); the default
    refit settings are unchanged."""
    assert realise.resolve_params({}) == {"mode": "refit", "rank_ratio": 0.1, "iterations": 40, "damp": 0.01,
                                          "refit_iterations": 30}
    assert _params("wanda", iterations=7, rank_ratio=0.3) == {"mode": "wanda"}
    assert _params("sparsegpt", iterations=7) == {"mode": "sparsegpt", "damp": 0.01}
    assert _params("wanda", sparsity="2:4") == {"mode": "wanda", "sparsity": "2:4"}
    assert _params("sparsegpt", sparsity="2:4", damp=0.1) == {"mode": "sparsegpt", "damp": 0.1, "sparsity": "2:4"}
    with pytest.raises(GlrsError, match="iterations"):
        _params("wanda", iterations=0)
    with pytest.raises(GlrsError, match="needs realise.mode refit, wanda or sparsegpt"):
        _params("select", sparsity="2:4")


@pytest.mark.parametrize("density", [0.5, 0.3, 0.77])
def test_wanda_realiser_is_the_wanda_baselines_mask(density):
    """At a uniform budget the realiser's mask is the Wanda baseline's (wanda_mask on the same W and statistics:
    the baseline's H is the sum X^T X, the statistics file's X^T X / tokens), its values W's, and it keeps exactly
    the budget (0.77: not a multiple of the rows, the extra entries to the rows whose next score is highest)."""
    W, Hsum, tokens = _problem()
    budget = exact_count(density, W.numel())
    f, rec = realise.prune_matrix(W, Hsum / tokens, budget, _params("wanda"))
    base = wanda_mask(W, LayerStats(H=Hsum, abs_mean=torch.zeros(W.shape[1]), tokens=tokens), density, None)
    mask = _mask(f, W.shape)
    assert torch.equal(mask, base)
    assert int(mask.sum()) == rec["nnz"] == rec["params"] == budget and rec["rank"] == 0
    assert f["U"].shape == (W.shape[0], 0) and f["sigma"].numel() == 0 and f["V"].shape == (W.shape[1], 0)
    assert torch.equal(f["S_index"], torch.sort(f["S_index"]).values)
    assert torch.equal(_dense(f, W.shape), (W * base).double())
    assert rec["error"] == rec["error_before_refit"] == pytest.approx(
        realise.output_error(W, W * base, Hsum / tokens), rel=1e-12)


@pytest.mark.parametrize("density", [0.5, 0.35])
def test_sparsegpt_realiser_is_sparsegpt_prune(density):
    """At a uniform budget the realiser gives sparsegpt_prune's weights and mask at that density, with H as the
    statistics file holds it (the same H: bit for bit)."""
    W, Hsum, tokens = _problem(n=256)  # two of SparseGPT's 128-column blocks
    H = (Hsum / tokens).float().double()  # as stats.read_layer returns it
    budget = exact_count(density, W.numel())
    f, rec = realise.prune_matrix(W, H, budget, _params("sparsegpt"))
    W_ref, keep = sparsegpt_prune(W, H, density)
    assert torch.equal(_mask(f, W.shape), keep)
    assert torch.equal(_dense(f, W.shape).float(), W_ref)
    assert rec["nnz"] == rec["params"] == budget and rec["rank"] == 0
    assert rec["error"] < rec["error_before_refit"]  # the OBS update helps
    # the scale of H cancels: the baseline's sum X^T X prunes the same entries
    _, keep_sum = sparsegpt_prune(W, Hsum, density)
    assert (keep_sum != keep).float().mean() < 1e-3


@pytest.mark.parametrize("mode", realise.PRUNING_MODES)
def test_budgets_spent_exactly_and_checked(mode):
    W, Hsum, tokens = _problem(m=24, n=128)
    for budget in (0, 1, 777, 24 * 128 - 5, 24 * 128):
        f, rec = realise.prune_matrix(W, Hsum / tokens, budget, _params(mode))
        assert rec["nnz"] == rec["params"] == budget == f["S_values"].numel()
    assert torch.equal(_dense(f, W.shape).float(), W)  # the whole budget: W itself
    with pytest.raises(GlrsError, match="outside"):
        realise.prune_matrix(W, Hsum / tokens, 24 * 128 + 1, _params(mode))


@pytest.mark.parametrize("mode", realise.PRUNING_MODES)
def test_24_masks_are_valid_and_the_baselines(mode):
    W, Hsum, tokens = _problem(m=32, n=128)
    H = Hsum / tokens
    f, rec = realise.prune_matrix(W, H, 32 * 128 // 2 + 100, _params(mode, sparsity="2:4"))
    mask = _mask(f, W.shape)
    assert _is_24(mask) and rec["nnz"] == 32 * 128 // 2 and rec["leftover"] == 100 and not rec["dense"]
    if mode == "wanda":
        assert torch.equal(mask, wanda_mask(W, LayerStats(H=Hsum, abs_mean=torch.zeros(128), tokens=tokens), 0.5, (2, 4)))
    else:
        W_ref, keep = sparsegpt_prune(W, H, 0.5, (2, 4))
        assert torch.equal(mask, keep) and torch.equal(_dense(f, W.shape).float(), W_ref)
    f, rec = realise.prune_matrix(W, H, 32 * 128, _params(mode, sparsity="2:4"))  # dense stays dense
    assert rec["dense"] and rec["nnz"] == 32 * 128 and torch.equal(_dense(f, W.shape).float(), W)
    with pytest.raises(GlrsError, match="outside"):
        realise.prune_matrix(W, H, 32 * 128 // 2 - 1, _params(mode, sparsity="2:4"))


@pytest.mark.parametrize("mode", realise.PRUNING_MODES)
@pytest.mark.parametrize("sparsity", ["unstructured", "2:4"])
def test_realise_layer_honours_per_matrix_budgets(mode, sparsity, tmp_path, monkeypatch):
    """An allocation whose budgets differ across matrices (one of them dense) is spent matrix by matrix: each
    keeps its own budget (under 2:4 the floor m*n/2 unless dense), in the refit's file layout."""
    W1, H1, t = _problem(m=24, n=32, seed=1)
    W2, H2, _ = _problem(m=32, n=32, seed=2)
    W3, H3, _ = _problem(m=16, n=32, seed=3)
    monkeypatch.setattr(modelio, "read_layer", lambda model_dir, layer: {"q": W1, "o": W2, "down": W3})
    monkeypatch.setattr(stats, "read_layer", lambda path: {"q": H1 / t, "o": H2 / t, "down": H3 / t})
    q, o, d = (modelio.weight_name(0, s) for s in ("q", "o", "down"))
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"target_density": 0.6, "matrices": {
        q: {"shape": [24, 32], "rank": 0, "nnz": 400}, o: {"shape": [32, 32], "rank": 2, "nnz": 500},
        d: {"shape": [16, 32], "rank": 0, "nnz": 512}}}))
    info = json.loads(alloc.read_text())
    params = {"mode": mode} | ({"sparsity": sparsity} if sparsity != "unstructured" else {})
    meta = realise.realise_layer("unused", "unused", str(alloc), 0, params, str(tmp_path / "l.safetensors"))
    read_meta, factors = realise.read_realised(tmp_path / "l.safetensors")
    assert read_meta == json.loads(json.dumps(meta))
    want = realise.matrix_budgets(info) if sparsity == "unstructured" else realise.matrix_budgets_nm(info)
    assert want[d] == 512 and len(set(want.values())) == 3  # q and o differ; down is dense
    for short, rec in meta["matrices"].items():
        shape = tuple(rec["shape"])
        mask = _mask(factors[rec["name"]], shape)
        assert rec["budget"] == want[rec["name"]] and rec["rank"] == 0 and factors[rec["name"]]["U"].shape[1] == 0
        if sparsity == "unstructured" or rec["budget"] == shape[0] * shape[1]:
            assert rec["nnz"] == int(mask.sum()) == rec["budget"]
        else:
            assert _is_24(mask) and rec["nnz"] == rec["budget"] - rec["leftover"] == shape[0] * shape[1] // 2
    assert meta["matrices"]["down"]["nnz"] == 512  # the allocation made it dense: it stays dense


@pytest.mark.parametrize("mode", realise.PRUNING_MODES)
def test_pruned_layers_materialise_on_a_tiny_llama(mode, tiny_prepared, tmp_path):
    """Statistics, an allocation, the pruning realiser layer by layer and materialise_realised, unchanged: the
    compressed model keeps the allocation's parameters and holds the realised weights."""
    from glrs import compressed

    pipeline.calibrate(str(tiny_prepared), {"dataset": "pydoc", "nsamples": 2, "seqlen": 16}, 0, str(tmp_path / "c.st"))
    stats.collect(str(tiny_prepared), pipeline.load_calibration(tmp_path / "c.st"), [0, 1, 2], str(tmp_path / "stats"))
    from glrs.stage1 import Stage1

    pipeline.run_allocator(Stage1.from_weights(tiny_prepared, [0, 1, 2], "k"), "uniform", 0.5, {"rank_fraction": 0.5},
                           0, None, None, str(tmp_path / "a.json"), str(tmp_path / "a.safetensors"))
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"r_{i}.safetensors"))
        realise.realise_layer(str(tiny_prepared), str(stats.layer_file(tmp_path / "stats", i)), str(tmp_path / "a.json"),
                              i, {"mode": mode}, files[-1])
    info = pipeline.materialise_realised(str(tiny_prepared), files, str(tmp_path / "a.json"),
                                         {"method": "cap", "allocator": "uniform"}, str(tmp_path / "out"), export="dense")
    alloc = json.loads((tmp_path / "a.json").read_text())
    assert info["params_kept"] == sum(realise.matrix_budgets(alloc).values())
    assert abs(info["achieved_density"] - 0.5) < 1e-3 and info["realisation"] == realise.resolve_params({"mode": mode})
    dense = {}
    for shard in (tmp_path / "out" / compressed.DENSE_DIR).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            dense |= {k: fh.get_tensor(k) for k in fh.keys()}
    for path in files:  # the dense export holds the realised (pruned) matrices
        _, factors = realise.read_realised(path)
        for name, f in factors.items():
            torch.testing.assert_close(dense[name].double(), _dense(f, dense[name].shape), rtol=0, atol=0, msg=name)
