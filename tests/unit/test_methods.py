"""Baseline compression methods (glrs.methods): budgets, mechanics, and checks against direct
transcriptions of the papers' algorithms on small cases.

A tiny random Llama (hidden 64, 2 layers) with random token ids is enough for the mechanics;
the algorithmic checks use small random matrices with correlated inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

from glrs.compressed import compose
from glrs.errors import GlrsError
from glrs.methods import METHODS, effective_params, get_method, method_version
from glrs.layers import LayerStats, collect_stats, sequential_layers, target_modules, target_shapes
from glrs.masks import row_topk_mask, split_count
from glrs.methods.base import allocate_ranks
from glrs.methods.oats import oats_budget, oats_decompose
from glrs.methods.sparsegpt import sparsegpt_prune
from glrs.methods.svd import asvd_approx, svd_approx, svdllm_approx
from glrs.methods.wanda import wanda_mask
from glrs.modelio import TARGETS, weight_name

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0, attn: str | None = None):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if attn:
        cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(1))


def correlated_inputs(tokens: int, n: int, seed: int) -> torch.Tensor:
    """[tokens, n] float64 inputs with correlated features and uneven scales (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n) + torch.eye(n, dtype=torch.float64)
    scales = torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    return (Z @ A) * scales


def stats_of(X: torch.Tensor) -> LayerStats:
    return LayerStats(X.T @ X, X.abs().mean(0), X.shape[0])


def rel_err(W: torch.Tensor, W2: torch.Tensor, X: torch.Tensor) -> float:
    W, W2 = W.double(), W2.double()
    return float(torch.linalg.norm((W - W2) @ X.T) / torch.linalg.norm(W @ X.T))


# ---- every method: budget and mechanics ------------------------------------------------------------

FAST = {"oats": {"iterations": 3}}
CASES = [(name, FAST.get(name, {}), d) for name in sorted(METHODS) if name not in ("bolaco", "sslc")
         for d in (0.4, 0.7)]
CASES += [(name, {"nm": "2:4"}, 0.5) for name in ("magnitude", "wanda", "sparsegpt")]


@pytest.mark.parametrize("name,params,density", CASES)
def test_method_hits_density_and_touches_only_targets(name, params, density, calib_ids):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = get_method(name).compress(model, calib_ids, density, params, 0, "cpu")
    shapes = target_shapes(model)
    assert set(out.weights) == set(shapes) == set(out.params_kept)
    achieved = sum(out.params_kept.values()) / sum(m * n for m, n in shapes.values())
    assert abs(achieved - density) <= 1e-3
    assert out.details["achieved_density"] == pytest.approx(achieved)
    state = model.state_dict()
    for key, value in before.items():
        if key in shapes:
            W = out.weights[key]
            assert W.shape == value.shape and W.dtype == value.dtype
            assert torch.equal(state[key], W)  # the model now holds the compressed weights
            assert torch.isfinite(W).all()
            assert not torch.equal(W, value)
            m, n = W.shape
            if name in ("svd", "asvd", "svdllm"):
                rank = out.details["matrices"][key]["rank"]
                assert out.params_kept[key] == rank * (m + n)
                assert torch.linalg.matrix_rank(W.double(), rtol=1e-5) <= rank  # float32 storage: rounding noise
            elif name == "oats":
                info = out.details["matrices"][key]
                assert out.params_kept[key] == info["rank"] * (m + n) + info["nnz"]
            else:
                assert out.params_kept[key] == int((W != 0).sum())  # random weights: kept entries are nonzero
        else:
            assert torch.equal(state[key], value), f"{name} changed non-target tensor {key}"
    if name in ("svd", "asvd", "svdllm", "oats"):  # the factored form reproduces the dense weights
        assert set(out.factors) == set(shapes)
        for key, f in out.factors.items():
            m, n = shapes[key]
            assert out.params_kept[key] == f["U"].shape[1] * (m + n) + f["S_values"].numel()
            assert f["S_index"].dtype == torch.int64 and bool((f["S_index"].diff() > 0).all())
            assert bool((f["sigma"].diff() <= 0).all())
            torch.testing.assert_close(compose(**f, shape=(m, n)), out.weights[key], rtol=1e-4, atol=1e-6)
    else:
        assert out.factors is None
    if params.get("nm") == "2:4":
        for W in out.weights.values():
            assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) == 2).all()


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_nm_needs_matching_density(name, calib_ids):
    with pytest.raises(GlrsError, match="2:4"):
        get_method(name).compress(tiny_llama(), calib_ids, 0.4, {"nm": "2:4"}, 0, "cpu")


def test_registry_and_parameter_errors(calib_ids):
    with pytest.raises(GlrsError, match="wanda"):
        get_method("no-such-method")
    with pytest.raises(GlrsError, match="blocksize"):
        get_method("sparsegpt").compress(tiny_llama(), calib_ids, 0.5, {"block_size": 64}, 0, "cpu")
    with pytest.raises(GlrsError, match="density"):
        get_method("magnitude").compress(tiny_llama(), calib_ids, 1.5, {}, 0, "cpu")
    assert effective_params("sparsegpt", {"percdamp": 0.1})["percdamp"] == 0.1
    assert effective_params("sparsegpt", {})["blocksize"] == 128  # defaults are part of what gets hashed
    with pytest.raises(GlrsError, match="iterations"):
        effective_params("oats", {"iters": 3})
    assert all(method_version(n) >= 1 for n in ("magnitude", "wanda", "sparsegpt", "svd", "asvd", "svdllm", "oats"))


# ---- budget helpers ----------------------------------------------------------------------------------

def test_allocate_ranks_is_optimal_on_a_small_case():
    shapes = {"a": (32, 32), "b": (64, 32), "c": (32, 64), "d": (64, 32)}
    for density in (0.3, 0.4, 0.55, 0.7):
        ranks = allocate_ranks(shapes, density)
        budget = density * sum(m * n for m, n in shapes.values())
        got = abs(sum(ranks[k] * sum(shapes[k]) for k in shapes) - budget)
        # brute force over floor / floor+1 for every matrix
        floors = {k: math.floor(density * m * n / (m + n)) for k, (m, n) in shapes.items()}
        best = min(abs(sum((floors[k] + e) * sum(shapes[k]) for k, e in zip(shapes, extra)) - budget)
                   for extra in __import__("itertools").product((0, 1), repeat=len(shapes)))
        assert got == pytest.approx(best)
        assert all(ranks[k] - floors[k] in (0, 1) for k in shapes)


def test_row_topk_mask_and_split_count():
    scores = torch.rand(7, 11, generator=torch.Generator().manual_seed(3))
    for keep in (0, 5, 30, 35, 77):
        mask = row_topk_mask(scores, keep)
        assert int(mask.sum()) == keep
        per_row = mask.sum(1)
        assert int(per_row.max() - per_row.min()) <= 1
        # within a row, every kept score beats every pruned one
        for r in range(7):
            if 0 < per_row[r] < 11:
                assert scores[r][mask[r]].min() > scores[r][~mask[r]].max()
    assert sum(split_count(101, [3, 5, 8])) == 101


# ---- Wanda: against the paper's pseudo-code ---------------------------------------------------------

def slow_wanda_mask(W, X, sparsity):
    """Loop transcription of the paper's Algorithm: metric = |W| * ||X_j||, sort each row, prune int(C_in*s)."""
    rows, cols = W.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    norms = [math.sqrt(sum(float(X[t, j]) ** 2 for t in range(X.shape[0]))) for j in range(cols)]
    for i in range(rows):
        metric = [abs(float(W[i, j])) * norms[j] for j in range(cols)]
        order = sorted(range(cols), key=lambda j: metric[j])
        for j in order[:int(cols * sparsity)]:
            keep[i, j] = False
    return keep


def slow_nm_mask(W, X, n_keep, m_group):
    rows, cols = W.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    norms = [float(torch.linalg.norm(X[:, j])) for j in range(cols)]
    for i in range(rows):
        for g in range(0, cols, m_group):
            metric = {j: abs(float(W[i, j])) * norms[j] for j in range(g, g + m_group)}
            for j in sorted(metric, key=metric.get, reverse=True)[:n_keep]:
                keep[i, j] = True
    return keep


@pytest.mark.parametrize("density", [0.4, 0.7])
def test_wanda_mask_matches_paper_pseudocode(density):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(9, 20, generator=g)
    X = correlated_inputs(40, 20, seed=6)
    fast = wanda_mask(W, stats_of(X), density, None)
    assert torch.equal(fast, slow_wanda_mask(W, X, round(1 - density, 6)))
    assert torch.equal(wanda_mask(W, stats_of(X), 0.5, (2, 4)), slow_nm_mask(W, X, 2, 4))


def test_wanda_in_model_uses_layer_inputs(calib_ids):
    """Layer 0's masks equal the pseudo-code's on the inputs captured from the dense model."""
    model = tiny_llama()
    captured = {}
    hooks = [target_modules(model.model.layers[0])[s].register_forward_pre_hook(
        lambda mod, args, s=s: captured.setdefault(s, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for s in TARGETS]
    dense = {s: target_modules(model.model.layers[0])[s].weight.detach().clone() for s in TARGETS}
    with torch.no_grad():
        model(calib_ids)
    for h in hooks:
        h.remove()
    out = get_method("wanda").compress(model, calib_ids, 0.5, {}, 0, "cpu")
    for s in TARGETS:
        X = torch.cat(captured[s])
        expected = slow_wanda_mask(dense[s], X, 0.5)
        assert torch.equal(out.weights[weight_name(0, s)] != 0, expected)


# ---- SparseGPT: against a column-by-column OBS transcription of Algorithm 1 -------------------------

def slow_sparsegpt(W, X, density, blocksize, nm=None, percdamp=0.01):
    """Algorithm 1 without the Cholesky / lazy-batch tricks: process columns one by one, OBS-update all
    remaining weights with the explicit inverse Hessian of the remaining columns, and remove each column
    from H^-1 by Gaussian elimination. Mask per block of `blocksize` columns by w^2 / [H_F^-1]_cc."""
    W = W.double().clone()
    rows, cols = W.shape
    H = X.T @ X
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            block = range(j, min(j + blocksize, cols))
            Hc, diag = Hinv.clone(), []
            for c in block:  # [H_{F_c}^-1]_cc: the diagonal after eliminating the block's earlier columns
                diag.append(Hc[c, c].item())
                Hc = Hc - torch.outer(Hc[:, c], Hc[c, :]) / Hc[c, c]
            sal = W[:, block.start:block.stop] ** 2 / torch.tensor(diag, dtype=torch.float64)
            k = round((1 - density) * sal.numel())
            flat = sorted(range(sal.numel()), key=lambda t: sal.reshape(-1)[t].item())[:k]
            for t in flat:
                pruned[t // len(block), block.start + t % len(block)] = True
        if nm is not None and j % nm[1] == 0:
            n_keep, group = nm
            Hc, diag = Hinv.clone(), []
            for c in range(j, j + group):
                diag.append(Hc[c, c].item())
                Hc = Hc - torch.outer(Hc[:, c], Hc[c, :]) / Hc[c, c]
            for r in range(rows):
                sal = {c: W[r, c].item() ** 2 / diag[c - j] for c in range(j, j + group)}
                for c in sorted(sal, key=sal.get)[:group - n_keep]:
                    pruned[r, c] = True
        err = torch.where(pruned[:, j], W[:, j], torch.zeros_like(W[:, j])) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    W[pruned] = 0
    return W, ~pruned


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_algorithm_1_and_beats_magnitude_and_wanda(nm):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(12, 40, generator=g, dtype=torch.float64)
    X = correlated_inputs(300, 40, seed=8)
    density, blocksize = 0.5, 16  # blocks 16, 16, 8: also a partial block
    fast, keep = sparsegpt_prune(W, X.T @ X, density, nm, blocksize=blocksize, dtype=torch.float64)
    slow, slow_keep = slow_sparsegpt(W, X, density, blocksize, nm)
    e_fast, e_slow = rel_err(W, fast, X), rel_err(W, slow, X)
    assert abs(e_fast - e_slow) <= 0.01 * e_slow
    assert (keep == slow_keep).float().mean() >= 0.99
    assert int(keep.sum()) == W.numel() // 2
    magnitude = W * row_topk_mask(W.abs(), W.numel() // 2) if nm is None else None
    wanda = W * wanda_mask(W, stats_of(X), density, nm)
    assert e_fast < rel_err(W, wanda, X)
    if magnitude is not None:
        assert e_fast < rel_err(W, magnitude, X)


# ---- SVD-LLM: truncation loss is the theoretical one --------------------------------------------------

def test_svdllm_truncation_loss_equals_discarded_singular_values():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(24, 40, generator=g, dtype=torch.float64)
    X = correlated_inputs(300, 40, seed=10)
    H = X.T @ X
    for rank in (0, 5, 12, 24):
        approx, info = svdllm_approx(W, H, rank)
        loss = float(torch.linalg.norm((W - approx) @ X.T) ** 2)
        # independent route: any C with C C^T = H gives W C the singular values sqrt(eig(W H W^T))
        eig = torch.linalg.eigvalsh(W @ H @ W.T).clamp_min(0)  # ascending
        theory = float(eig[: W.shape[0] - rank].sum())
        assert loss == pytest.approx(theory, rel=1e-8, abs=1e-8 * float(eig.sum()))
        assert info["truncation_loss"] == pytest.approx(theory, rel=1e-8, abs=1e-8 * float(eig.sum()))
        assert info["shift"] == 0.0
        if 0 < rank < 24:  # whitening is optimal for the output error among rank-r approximations
            assert rel_err(W, approx, X) < rel_err(W, svd_approx(W, rank), X)
            assert rel_err(W, approx, X) < rel_err(W, asvd_approx(W, X.abs().mean(0), rank), X)


def test_svdllm_handles_singular_statistics():
    g = torch.Generator().manual_seed(11)
    W = torch.randn(16, 32, generator=g, dtype=torch.float64)
    X = correlated_inputs(12, 32, seed=12)  # 12 tokens < 32 inputs: X X^T is singular
    X[:, 3] = 0  # and one input is never active
    approx, info = svdllm_approx(W, X.T @ X, 8)
    assert info["shift"] > 0
    assert torch.isfinite(approx).all()
    assert rel_err(W, approx, X) < rel_err(W, svd_approx(W, 8), X)


# ---- OATS: alternating thresholding converges and beats either part alone ---------------------------

def test_oats_error_decreases_and_beats_each_part_alone():
    g = torch.Generator().manual_seed(13)
    m, n = 32, 48
    low = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64)
    outliers = torch.zeros(m, n, dtype=torch.float64)
    idx = torch.randperm(m * n, generator=g)[:150]
    outliers.view(-1)[idx] = 8 * torch.randn(150, generator=g, dtype=torch.float64)
    W = low + outliers + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)
    X = correlated_inputs(200, n, seed=14)
    d = torch.linalg.norm(X, dim=0)
    density = 0.4
    r, k = oats_budget((m, n), density, 0.25)
    assert r * (m + n) + k == round(density * m * n) and r > 0 and k > 0
    approx, mask, history, factors = oats_decompose(W, d, r, k, 30, torch.float64, track=True)
    assert all(b <= a + 1e-12 for a, b in zip(history, history[1:]))  # alternating projections never go up
    assert history[-1] < history[0]
    assert int(mask.sum()) == k

    def scaled_err(A):
        return float(torch.linalg.norm((W - A) * d) / torch.linalg.norm(W * d))

    assert scaled_err(approx) == pytest.approx(history[-1], rel=1e-9)
    budget = round(density * m * n)
    low_only = svd_approx(W * d, budget // (m + n)) / d
    sparse_only = W * row_topk_mask((W * d).abs(), budget)
    assert scaled_err(approx) < scaled_err(low_only)
    assert scaled_err(approx) < scaled_err(sparse_only)
    one_iter, _, _, _ = oats_decompose(W, d, r, k, 1, torch.float64)
    torch.testing.assert_close(compose(**factors, shape=(m, n)), approx)
    assert factors["U"].shape[1] == r and factors["S_values"].numel() == k
    assert scaled_err(approx) < scaled_err(one_iter)


# ---- sequential_layers / collect_stats ------------------------------------------------------------

def hooked_inputs(model, calib_ids, layer):
    """Direct computation: inputs of layer `layer`'s targets in a plain forward pass of the whole batch."""
    got = {}
    mods = target_modules(model.model.layers[layer])
    hooks = [mods[s].register_forward_pre_hook(
        lambda mod, args, s=s: got.__setitem__(s, args[0].reshape(-1, args[0].shape[-1]).double()))
        for s in TARGETS]
    with torch.no_grad():
        logits = model(calib_ids).logits
    for h in hooks:
        h.remove()
    return got, logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sequential_layers_identity_and_stats(attn, calib_ids):
    model = tiny_llama(attn=attn)
    direct0, logits = hooked_inputs(model, calib_ids, 0)
    direct1, _ = hooked_inputs(model, calib_ids, 1)
    seen = {}

    def unchanged(i, layer, stats):
        seen[i] = stats
        return {s: target_modules(layer)[s].weight.detach().clone() for s in stats}

    sequential_layers(model, calib_ids, "cpu", unchanged, batch_size=3)  # 4 samples: batches of 3 and 1
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, logits)
    for i, direct in ((0, direct0), (1, direct1)):
        assert set(seen[i]) == set(TARGETS)
        for s, X in direct.items():
            st = seen[i][s]
            assert st.tokens == calib_ids.numel()
            torch.testing.assert_close(st.H, X.T @ X, rtol=1e-5, atol=1e-8 * float(X.abs().max()) ** 2)
            torch.testing.assert_close(st.abs_mean, X.abs().mean(0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(st.sq_norm, (X ** 2).sum(0), rtol=1e-5, atol=1e-7)
    assert seen[0]["q"] is seen[0]["v"] and seen[0]["gate"] is seen[0]["up"]  # shared inputs computed once


def test_sequential_layers_feeds_compressed_outputs_forward(calib_ids):
    def halve_layer0(i, layer, stats):
        return {s: target_modules(layer)[s].weight.detach() * 0.5 for s in stats} if i == 0 else {}

    model = tiny_llama()
    seen = {}
    sequential_layers(model, calib_ids, "cpu", lambda i, l, s: (seen.__setitem__(i, s), halve_layer0(i, l, s))[1])
    # layer 1 saw the outputs of the *compressed* layer 0: compare with a forward of the compressed model
    direct1, _ = hooked_inputs(model, calib_ids, 1)
    torch.testing.assert_close(seen[1]["down"].H, direct1["down"].T @ direct1["down"], rtol=1e-5, atol=1e-6)

    # propagate="dense" (statistics of the dense model) and collect_stats see the dense hidden states
    dense = tiny_llama()
    direct_dense, _ = hooked_inputs(dense, calib_ids, 1)
    seen_dense = {}
    sequential_layers(tiny_llama(), calib_ids, "cpu",
                      lambda i, l, s: (seen_dense.__setitem__(i, s), halve_layer0(i, l, s))[1], propagate="dense")
    stats = collect_stats(dense, calib_ids, "cpu")
    X = direct_dense["down"]
    torch.testing.assert_close(seen_dense[1]["down"].H, X.T @ X, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[weight_name(1, "down")].H, X.T @ X, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen[1]["down"].H, X.T @ X, rtol=1e-3)


def test_true_sequential_groups_see_compressed_predecessors(calib_ids):
    """SparseGPT's true_sequential: o's statistics come after q/k/v of the same layer were compressed."""
    model = tiny_llama()
    calls = []

    def zero_v(i, layer, stats):
        calls.append((i, sorted(stats), stats))
        return {"v": torch.zeros_like(target_modules(layer)["v"].weight)} if "v" in stats else {}

    from glrs.layers import TRUE_SEQUENTIAL_GROUPS
    sequential_layers(model, calib_ids, "cpu", zero_v, groups=TRUE_SEQUENTIAL_GROUPS)
    assert [c[1] for c in calls[:4]] == [sorted(g) for g in TRUE_SEQUENTIAL_GROUPS]
    o_stats = calls[1][2]["o"]
    assert float(o_stats.H.abs().max()) == 0.0  # v = 0 makes the attention output, o's input, zero


def test_diagonal_moments_match_full(calib_ids):
    full, diag = {}, {}
    sequential_layers(tiny_llama(), calib_ids, "cpu", lambda i, l, s: full.__setitem__(i, s) or {})
    sequential_layers(tiny_llama(), calib_ids, "cpu", lambda i, l, s: diag.__setitem__(i, s) or {}, moments="diag")
    for i in full:
        for s in TARGETS:
            assert diag[i][s].H is None
            torch.testing.assert_close(diag[i][s].sq_norm, full[i][s].sq_norm, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(diag[i][s].abs_mean, full[i][s].abs_mean)
