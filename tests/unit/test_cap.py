"""CAP Stage 2 (glrs.cap): estimator, projection, final masks, determinism, spaces.

The model-level tests run on a tiny random Llama (2 layers, hidden 32) decomposed
by the real Stage 1 (pipeline.decompose_layer), on the CPU."""
from __future__ import annotations

import math

import pytest
import torch

from glrs import allocate, cap
from glrs.cap import candidates as cap_candidates
from glrs.cap import policy as cap_policy
from glrs.errors import GlrsError

from conftest import tiny_decomposed

FAST = {"epochs": 1, "batch_size": 2, "policy": "tied"}  # 3 steps over 6 calibration sequences (Bernoulli policies)


# ---- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny random Llama, its per-layer RPCA files, pools and calibration ids."""
    t = tiny_decomposed(tmp_path_factory.mktemp("cap_tiny"))
    return t | {"dense": sum(p.dense for p in t["pools"])}


def run(tiny, density, params=None, seed=0, space="cap"):
    return cap.allocate_with_info(tiny["pools"], density, {**FAST, **(params or {})}, seed, tiny["model_dir"],
                                  tiny["stage1"], tiny["ids"], space=space, device="cpu")


def same(a: allocate.Allocation, b: allocate.Allocation) -> bool:
    return all(torch.equal(a.rank_keep[k], b.rank_keep[k]) and torch.equal(a.sparse_keep[k], b.sparse_keep[k])
               for k in a.rank_keep)


# ---- (1) the policy-gradient estimator --------------------------------------------------------------------

def test_reinforce_gradient_is_unbiased_for_a_known_loss():
    """L(m) = sum_i w_i (1 - m_i) has dE[L]/ds_i = -w_i; the estimator's mean must match, with or without
    a baseline subtracted."""
    s = torch.tensor([0.2, 0.5, 0.8, 0.5])
    w = torch.tensor([1.0, 2.0, 0.5, 0.0])
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(40000, 4, generator=gen) < s
    losses = ((1 - masks.float()) * w).sum(1)
    for baseline in (0.0, 1.7):
        est = cap_policy.reinforce_grad(masks, s, (losses - baseline)[:, None], eps=0.0).mean(0)
        assert torch.allclose(est, -w, atol=0.2), (baseline, est)
    # the sign alone: a component whose removal hurts gets a negative gradient (its s will grow)
    assert est[0] < -0.5 and est[1] < -1.0 and abs(float(est[3])) < 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_moves_probability_to_the_components_that_matter(seed):
    """Mixed costs: a cost-4 component whose removal costs 1.0 of loss and one that does not matter, and
    eight cost-1 entries of which two matter (0.5 each); budget 6 fits exactly the three that matter.
    From uniform probabilities, REINFORCE + projection must find them (the loss is noisy)."""
    w = [torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0])]
    pol = cap_policy.BernoulliPolicy([2, 8], [4, 1], 6, seed=seed, lr=0.05, baseline="ema", baseline_beta=0.8)
    pol.init_uniform()
    noise = torch.Generator().manual_seed(seed + 100)

    def loss(sample):
        dropped = sum(float((wb * (1 - sample.mask(b).float())).sum()) for b, wb in enumerate(w))
        return dropped + 0.1 * float(torch.randn((), generator=noise))

    start = [pol.probs(b).clone() for b in range(2)]
    for _ in range(300):
        res = pol.step(loss)
        assert not res.skipped
        assert abs(pol.expected_cost() - 6) < 1e-5
    big, small = pol.probs(0), pol.probs(1)
    assert float(big[0]) > float(start[0][0]) + 0.3 and float(big[0]) > float(big[1]) + 0.5
    assert float(small[:2].min()) > float(small[2:].max()) + 0.3
    keys = [cap_policy.selection_keys(pol.probs(b), torch.zeros(pol.sizes[b])) for b in range(2)]
    chosen = cap_policy.greedy_select(keys, [4, 1], 6)
    assert chosen[0].tolist() == [True, False]
    assert chosen[1].tolist() == [True, True] + [False] * 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tied_policy_moves_budget_to_the_block_that_matters(seed):
    """Three blocks, same importance scores inside each: block 0's entries cost loss when dropped (0.01
    each), block 1's do not, block 2 (cost-5 components) costs 0.02 per dropped component. From equal
    offsets, the learned offsets must rank the blocks by the loss per parameter of their marginal
    candidate (block 0 above block 2 above block 1), the expected cost staying on the budget."""
    sizes, costs, budget = [200, 200, 40], [1, 1, 5], 300
    w = [0.01, 0.0, 0.02]
    pol = cap_policy.TiedPolicy(sizes, costs, budget, seed=seed, lr=0.2, baseline="loo", samples_per_step=2)
    ramp = [torch.linspace(1.0, 2.0, n) for n in sizes]  # the same importance order inside each block
    pol.init_from_scores(lambda b: ramp[b], temperature=0.25)
    noise = torch.Generator().manual_seed(seed + 100)
    start = [float(pol.probs(b).mean()) for b in range(3)]

    def loss(sample):
        dropped = sum(w[b] * float((1 - sample.mask(b).float()).sum()) for b in range(3))
        return dropped + 0.05 * float(torch.randn((), generator=noise))

    for _ in range(300):
        pol.step(loss)
        assert abs(pol.expected_cost() - budget) < 1e-6 * budget
    theta = pol.theta.tolist()
    assert theta[0] > theta[2] > theta[1], theta
    kept = [float(pol.probs(b).mean()) for b in range(3)]
    assert kept[0] > start[0] + 0.2 and kept[1] < start[1] - 0.2, (start, kept)
    chosen = pol.select(lambda b: ramp[b])
    assert sum(int(c.sum()) * k for c, k in zip(chosen, costs)) == budget
    # inside a block the initial order is kept: the kept entries are a suffix of the ramp
    for c in chosen:
        idx = torch.nonzero(c).reshape(-1)
        assert idx.numel() == 0 or torch.equal(idx, torch.arange(c.numel() - idx.numel(), c.numel()))


def test_logit_keys_follow_float_order_across_signs():
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(1000, generator=gen) * 30, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 60.0, -60.0])])
    keys = cap_policy.logit_keys(x, torch.zeros_like(x))
    assert bool((keys >= 0).all())
    order_keys = torch.argsort(keys, stable=True)
    assert torch.equal(x[order_keys], torch.sort(x, stable=True).values)


def test_non_finite_loss_skips_the_step():
    pol = cap_policy.BernoulliPolicy([4], [1], 2, seed=0)
    pol.init_uniform()
    before = pol.flat.clone()
    res = pol.step(lambda s: float("nan"))
    assert res.skipped and torch.equal(pol.flat, before)


def test_leave_one_out_baseline_cancels_batch_difficulty():
    """With loo, a loss offset shared by all masks of a step (the batch's difficulty) has no effect."""
    w = torch.tensor([1.0, 0.0, 0.0, 1.0])
    runs = []
    for offset in (0.0, 5.0):
        pol = cap_policy.BernoulliPolicy([4], [1], 2, seed=3, baseline="loo", samples_per_step=2)
        pol.init_uniform()
        for t in range(20):
            pol.step(lambda s, t=t: float((w * (1 - s.mask(0).float())).sum()) + offset * (t % 3))
        runs.append(pol.flat.clone())
    assert torch.allclose(runs[0], runs[1], atol=1e-5)


# ---- (2) the budget projection ------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 1e-4, 0.05, 0.37, 0.9, 0.9999, 1.0])
@pytest.mark.parametrize("spread", [(0.0, 1.0), (-0.5, 1.5), (0.9, 3.0), (-2.0, 0.05)])
def test_projection_is_exact_and_kkt(fraction, spread):
    gen = torch.Generator().manual_seed(7)
    costs = [1, 7, 300]
    values = [torch.rand(n, generator=gen) * (spread[1] - spread[0]) + spread[0] for n in (5000, 300, 40)]
    original = [v.clone() for v in values]
    capacity = sum(c * v.numel() for v, c in zip(values, costs))
    budget = fraction * capacity
    tau = cap_policy.project_budget(values, costs, budget)
    total = sum(c * float(v.double().sum()) for v, c in zip(values, costs))
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in values)
    assert abs(total - budget) <= 1e-6 * max(budget, 1.0)
    if math.isfinite(tau):  # KKT form of the Euclidean projection: one shift tau per unit of cost
        for v, v0, c in zip(values, original, costs):
            assert torch.allclose(v, (v0.double() - tau * c).clamp(0, 1).float(), atol=1e-6)


def test_projection_keeps_a_feasible_point_and_handles_edges():
    v = [torch.full((10,), 0.25), torch.full((2,), 0.25)]
    tau = cap_policy.project_budget(v, [1, 5], 0.25 * (10 + 10))
    assert abs(tau) < 1e-12 and all(torch.all(x == 0.25) for x in v)
    single = [torch.tensor([3.0])]
    cap_policy.project_budget(single, [2], 1.0)
    assert float(single[0]) == 0.5
    empty_and_one = [torch.zeros(0), torch.tensor([0.1, 0.9])]
    cap_policy.project_budget(empty_and_one, [3, 1], 1.0)
    assert abs(float(empty_and_one[1].sum()) - 1.0) < 1e-6
    with pytest.raises(ValueError):
        cap_policy.project_budget([torch.rand(3)], [1], 3.5)
    with pytest.raises(ValueError):
        cap_policy.project_budget([torch.rand(3)], [1], -1)


def test_projection_exact_at_scale_in_float32():
    """Millions of variables with the cost mix of a real model (components ~ 10^3, entries 1)."""
    gen = torch.Generator().manual_seed(1)
    values = [torch.rand(2_000_000, generator=gen) * 1.2 - 0.1, torch.rand(3000, generator=gen), torch.rand(900, generator=gen)]
    costs = [1, 1152, 2112]
    budget = 2_345_678
    cap_policy.project_budget(values, costs, budget)
    total = sum(c * float(v.double().sum()) for v, c in zip(values, costs))
    assert abs(total - budget) <= 1e-6 * budget


# ---- (3) the final masks ---------------------------------------------------------------------------------------

def _sequential_greedy(keys, costs, budget):
    items = sorted((-int(k), i, j) for i, ks in enumerate(keys) for j, k in enumerate(ks.tolist()))
    chosen = [torch.zeros(k.numel(), dtype=torch.bool) for k in keys]
    rem = budget
    for _, i, j in items:
        if costs[i] <= rem:
            chosen[i][j] = True
            rem -= costs[i]
    return chosen


def test_greedy_select_equals_the_sequential_walk_with_ties():
    gen = torch.Generator().manual_seed(5)
    for trial in range(40):
        sizes = [int(x) for x in torch.randint(0, 30, (3,), generator=gen)]
        costs = [1, 3, 7]
        keys = [torch.randint(0, 6 if trial % 2 else 1 << 40, (n,), generator=gen) for n in sizes]
        capacity = sum(n * c for n, c in zip(sizes, costs))
        budget = int(torch.randint(0, capacity + 2, (1,), generator=gen))
        got = cap_policy.greedy_select(keys, costs, budget)
        want = _sequential_greedy(keys, costs, budget)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), (trial, sizes, budget)
        assert sum(int(g.sum()) * c for g, c in zip(got, costs)) <= budget


def test_selection_keys_order_by_probability_then_score():
    p = torch.tensor([0.5, 0.5, 1.0, 0.0, -0.0, 0.25])
    sc = torch.tensor([1.0, 2.0, 0.0, 5.0, 6.0, 1e-30])
    order = torch.argsort(cap_policy.selection_keys(p, sc), descending=True, stable=True).tolist()
    assert order == [2, 1, 0, 5, 4, 3]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_cap_masks_meet_the_budget(tiny, density):
    alloc, info = run(tiny, density)
    budget = allocate.budget_for(tiny["pools"], density)
    kept = alloc.params_kept(tiny["pools"])
    assert kept <= budget
    assert abs(kept / tiny["dense"] - density) < 1e-3  # within 0.1 percentage points
    assert budget - kept == 0  # entries (cost 1) fill the last gap exactly
    assert info["steps"] == 3 and len(info["losses"]) == 3
    assert abs(info["expected_density"] - budget / tiny["dense"]) < 1e-6
    for p in tiny["pools"]:
        assert alloc.rank_keep[p.name].dtype == torch.bool and alloc.rank_keep[p.name].shape == p.sigma.shape
        assert alloc.sparse_keep[p.name].shape == p.s_abs.shape


def test_grouped_sparse_entries_stay_whole_and_meet_the_budget(tiny):
    G = 4
    alloc, _ = run(tiny, 0.5, {"sparse_group_size": G})
    budget = allocate.budget_for(tiny["pools"], 0.5)
    kept = alloc.params_kept(tiny["pools"])
    assert kept <= budget and abs(kept / tiny["dense"] - 0.5) < 1e-3
    for p in tiny["pools"]:
        keep = alloc.sparse_keep[p.name]
        full = keep.numel() // G * G
        groups = keep[:full].reshape(-1, G)
        assert torch.all(groups.all(1) | ~groups.any(1))
        tail = keep[full:]
        assert tail.all() or not tail.any()


def test_float16_probabilities_and_uniform_init(tiny):
    alloc, _ = run(tiny, 0.4, {"prob_dtype": "float16", "init": "uniform"})
    kept = alloc.params_kept(tiny["pools"])
    assert kept <= allocate.budget_for(tiny["pools"], 0.4) and abs(kept / tiny["dense"] - 0.4) < 1e-3


@pytest.mark.parametrize("policy", ["tied", "entry"])
def test_without_steps_the_masks_are_the_greedy_energy_per_parameter_allocation(tiny, policy):
    """epochs 0, magnitude init: no model is needed; keeping by probability (entry) or by
    logit (tied) = keeping by sigma^2/(m+n) and v^2."""
    pools = tiny["pools"]
    params = {"epochs": 0, "init": "magnitude", "policy": policy}
    alloc, info = cap.allocate_with_info(pools, 0.5, params, 0, None, tiny["stage1"], None)
    assert info["steps"] == 0
    blocks = cap_candidates.build_blocks(pools, "cap", 1)
    score = cap_candidates.block_scores(pools, blocks)
    keys = [cap_policy.selection_keys(torch.ones(b.nvar), score(i)) for i, b in enumerate(blocks)]
    want = cap_policy.greedy_select(keys, [b.cost for b in blocks], allocate.budget_for(pools, 0.5))
    for blk, w in zip(blocks, want):
        got = (alloc.rank_keep if blk.kind == "rank" else alloc.sparse_keep)[pools[blk.matrix].name]
        assert torch.equal(got, w)


def test_activation_scores_are_output_energy_per_parameter(tiny):
    """init: activation prices a component sigma_k^2 v_k^T H v_k / (m + n) and an entry S_ij^2 H_jj, with
    H = X^T X / tokens of the matrix's input in the dense model; init_scale matrix divides by the
    matrix's total. Checked against hooks on a direct forward pass of the dense model."""
    from transformers import AutoModelForCausalLM

    pools = tiny["pools"]
    blocks = cap_candidates.build_blocks(pools, "cap", 1)
    factors = cap_candidates._read_factors(tiny["stage1"], pools, "cap", torch.device("cpu"), offload=False)
    raw = cap_candidates.activation_block_scores(tiny["model_dir"], tiny["ids"], pools, blocks, factors, torch.device("cpu"),
                                      per_matrix=False)
    scaled = cap_candidates.activation_block_scores(tiny["model_dir"], tiny["ids"], pools, blocks, factors, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(tiny["model_dir"], dtype=torch.float32).eval()
    name = pools[blocks[0].matrix].name
    grams = []
    handle = model.get_submodule(name.removesuffix(".weight")).register_forward_pre_hook(
        lambda _m, args: grams.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model(tiny["ids"])
    handle.remove()
    X = torch.cat(grams)
    H = X.T @ X / X.shape[0]
    f, (m, n) = factors[name], pools[blocks[0].matrix].shape
    mine = [b for b, blk in enumerate(blocks) if pools[blk.matrix].name == name]
    rank_b = next(b for b in mine if blocks[b].kind == "rank")
    sparse_b = next(b for b in mine if blocks[b].kind == "sparse")
    V, sigma = f["V"].double(), f["sigma"].double()
    want_rank = sigma**2 * torch.einsum("nk,nm,mk->k", V, H, V) / (m + n)
    want_sparse = f["S_values"].double() ** 2 * torch.diagonal(H)[f["S_index"].long() % n]
    torch.testing.assert_close(raw(rank_b).double(), want_rank, rtol=1e-4, atol=0)
    torch.testing.assert_close(raw(sparse_b).double(), want_sparse, rtol=1e-4, atol=0)
    total = float(want_rank.sum()) * (m + n) + float(want_sparse.sum())
    torch.testing.assert_close(scaled(rank_b).double(), want_rank / total, rtol=1e-4, atol=0)


# ---- (4) determinism ---------------------------------------------------------------------------------------------

def test_same_seed_same_masks_and_offload_changes_nothing(tiny):
    a, ia = run(tiny, 0.5, seed=11)
    b, ib = run(tiny, 0.5, seed=11)
    c, ic = run(tiny, 0.5, {"offload": True}, seed=11)
    assert same(a, b) and same(a, c)
    assert ia["losses"] == ib["losses"] == ic["losses"]
    _, other = run(tiny, 0.5, seed=12)
    assert other["losses"] != ia["losses"]  # a different seed draws different masks


def test_engine_loss_with_everything_kept_is_the_dense_loss(tiny):
    """W~ with all masks on is L + S = W (to the RPCA tolerance): the hooked forward must reproduce the
    dense model's own loss."""
    from transformers import AutoModelForCausalLM

    pools, dev = tiny["pools"], torch.device("cpu")
    blocks = cap_candidates.build_blocks(pools, "cap", 1)
    factors = cap_candidates._read_factors(tiny["stage1"], pools, "cap", dev, offload=False)
    model, modules = cap_candidates._load_model(tiny["model_dir"], factors, dev, torch.float32)
    mats = cap_candidates.matrices(pools, modules, factors, blocks)

    class AllOn:
        def mask(self, b):
            return torch.ones(blocks[b].nvar, dtype=torch.bool)

    engine = cap_candidates._Engine(model, mats, blocks, dev, torch.float32)
    got = engine.loss(tiny["ids"], AllOn())
    engine.close()
    dense = AutoModelForCausalLM.from_pretrained(tiny["model_dir"]).eval()
    with torch.no_grad():
        want = float(dense(input_ids=tiny["ids"], labels=tiny["ids"]).loss)
    assert abs(got - want) < 1e-4


# ---- (5) the restricted spaces ------------------------------------------------------------------------------------

def test_lowrank_only_keeps_no_sparse_entry(tiny):
    alloc, _ = run(tiny, 0.4, space="lowrank-only")
    pools = tiny["pools"]
    assert not any(bool(alloc.sparse_keep[p.name].any()) for p in pools)
    assert any(bool(alloc.rank_keep[p.name].any()) for p in pools)
    budget, kept = allocate.budget_for(pools, 0.4), alloc.params_kept(pools)
    # components are indivisible: the gap is less than the cheapest component still out
    assert 0 <= budget - kept < min(p.rank_cost for p in pools)


def test_sparse_only_keeps_no_singular_component(tiny):
    alloc, _ = run(tiny, 0.4, space="sparse-only")
    pools = tiny["pools"]
    assert not any(bool(alloc.rank_keep[p.name].any()) for p in pools)
    assert alloc.params_kept(pools) == allocate.budget_for(pools, 0.4)


def test_spaces_that_cannot_hold_the_budget_raise(tiny):
    pools = tiny["pools"]
    lowrank_cap = sum(p.sigma.numel() * p.rank_cost for p in pools) / tiny["dense"]
    sparse_cap = sum(p.s_abs.numel() for p in pools) / tiny["dense"]
    with pytest.raises(GlrsError, match="lambda_scale"):
        cap_candidates.space_budget(pools, lowrank_cap + 0.05, "lowrank-only")
    with pytest.raises(GlrsError, match="sparse-only"):
        run(tiny, sparse_cap + 0.02, space="sparse-only")
    with pytest.raises(GlrsError):
        cap_candidates.space_budget(pools, 0.5, "dense-only")


def test_parameters_are_validated():
    assert cap.resolve_params({}) == cap.ALLOC_PARAMS_DEFAULTS
    with pytest.raises(GlrsError, match="unknown"):
        cap.resolve_params({"learning_rate": 0.1})
    for bad in ({"lr": 0}, {"baseline": "loo", "samples_per_step": 1}, {"sparse_group_size": 0}, {"init": "random"}, {"dtype": "int8"},
                {"policy": "free"}, {"logit_lr": -1}, {"init_scale": "layer"}):
        with pytest.raises(GlrsError):
            cap.resolve_params(bad)


def test_same_masks_regenerated_for_the_update():
    """The update regenerates each block's mask from its seed: a sample must give the same mask twice."""
    pol = cap_policy.BernoulliPolicy([1000, 10], [1, 50], 600, seed=4)
    pol.init_uniform()
    smp = pol.sample(3, 0)
    for b in range(2):
        assert torch.equal(smp.mask(b), smp.mask(b))
    assert not torch.equal(pol.sample(3, 0).mask(0), pol.sample(4, 0).mask(0))
    assert [c for c, _, _ in pol.classes] == [1, 50]


def test_float16_probabilities_survive_huge_steps():
    """A rare-event REINFORCE step can be ~ lr * adv / s: float16 storage must stay finite and the
    projection must still meet the budget."""
    pol = cap_policy.BernoulliPolicy([2000, 30], [1, 40], 700, seed=2, lr=5.0, grad_eps=0.0, prob_dtype=torch.float16)
    pol.init_uniform()
    for t in range(5):
        res = pol.step(lambda s, t=t: 1e4 * (t % 2) + float(s.mask(0).float().mean()))
        assert not res.skipped
        assert bool(torch.isfinite(pol.flat).all()) and float(pol.flat.min()) >= 0 and float(pol.flat.max()) <= 1
        assert abs(pol.expected_cost() - 700) < 700 * 1e-3  # float16 rounding of 2030 values


# ---- learning that reaches the result (through the real allocator entry point) ----------------------------

def test_sampled_masks_reach_the_loss(tiny):
    """Two masks on the same batch must see different losses: if the mask did not reach the model the
    leave-one-out advantages would all be zero and nothing could be learned."""
    _, info = run(tiny, 0.5)
    assert info["steps"] == 3
    assert all(len(step) == 2 for step in info["losses"])
    assert any(abs(a - b) > 1e-6 for a, b in info["losses"])


def test_learned_offsets_reach_the_final_selection(tiny):
    """Same seed and initialisation: with training the kept masks differ from the untrained ones, and
    with a vanishing step size they do not (the selection reads the learned state, nothing else)."""
    untrained, _ = run(tiny, 0.5, {"epochs": 0})
    frozen, _ = run(tiny, 0.5, {"logit_lr": 1e-12})
    trained, info = run(tiny, 0.5, {"epochs": 3, "logit_lr": 5.0})
    assert same(untrained, frozen)
    assert not same(untrained, trained)
    assert info["steps"] == 9


def test_the_papers_entry_policy_trains_through_the_allocator(tiny):
    alloc, info = run(tiny, 0.5, {"policy": "entry", "lr": 0.05, "samples_per_step": 1, "baseline": "ema",
                                  "init": "magnitude"})
    assert info["steps"] == 3 and info["skipped_steps"] == 0
    assert all(len(step) == 1 and math.isfinite(step[0]) for step in info["losses"])
    assert info["params_kept"] <= allocate.budget_for(tiny["pools"], 0.5)
    untrained, _ = run(tiny, 0.5, {"policy": "entry", "init": "magnitude", "epochs": 0})
    assert not same(alloc, untrained)
