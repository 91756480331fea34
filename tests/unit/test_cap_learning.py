"""Learning that reaches CAP's result, checked where the answer is known (issue 14).

For the paper's per-candidate policy (`policy: entry`): the model a mask sample is scored on holds
exactly the sampled candidates (an independent slow composition), the update is the paper's
s <- s - lr/K sum_k a_k (m_k - s) / (s (1 - s) + eps) (written out here), masks sampled through the
real allocator reach the loss in every space, and the final selection reads the learned probabilities.
For the default budget policy (glrs/cap/budget.py): the step is the mirrored estimator written out,
the sampled budgets reach the loss, and the final budgets are the learned offsets times offset_scale.
Each of these faults was planted in a scratch copy and fails a test here: the sampled sparse (or rank)
masks not reaching the composed weights; the 1/(s(1-s)) factor dropped; lr x 1e-9 (both policies);
the budget policy's losses scored at the unperturbed budgets; its gradient's sign flipped; the final
budgets taken at offset scale 0 (uniform) or 1 (offset_scale ignored).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from glrs import allocate, cap, stats
from glrs.cap import budget as cap_budget
from glrs.cap import candidates as cap_candidates
from glrs.cap import policy as cap_policy
from glrs.masks import capped_split

from conftest import slow_dense, tiny_decomposed

ENTRY = {"policy": "entry", "epochs": 1, "batch_size": 2, "samples_per_step": 2, "baseline": "loo", "init": "magnitude"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama decomposed by the real Stage 1, its pools, calibration ids and statistics."""
    root = tmp_path_factory.mktemp("cap_learning")
    t = tiny_decomposed(root)
    stats.collect(t["model_dir"], t["ids"], [0, 1], str(root / "stats"))
    return t | {"stats": [str(stats.layer_file(root / "stats", i)) for i in range(2)]}


def run(tiny, params, space="cap", density=0.5, with_stats=False):
    return cap.allocate_with_info(tiny["pools"], density, params, 0, tiny["model_dir"], tiny["stage1"], tiny["ids"],
                                  space=space, device="cpu", stats_files=tiny["stats"] if with_stats else None)


def same(a: allocate.Allocation, b: allocate.Allocation) -> bool:
    return all(torch.equal(a.rank_keep[k], b.rank_keep[k]) and torch.equal(a.sparse_keep[k], b.sparse_keep[k])
               for k in a.rank_keep)


# ---- the paper's entry policy -------------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["cap", "lowrank-only", "sparse-only"])
def test_the_scored_model_holds_exactly_the_sampled_candidates(tiny, space):
    """For a mask sample, each target weight the engine composes is the sum of the sampled components and
    entries of Stage 1, formed here one by one from the factors (square and non-square, both parts)."""
    pools, dev = tiny["pools"], torch.device("cpu")
    blocks = cap_candidates.build_blocks(pools, space, 1)
    factors = cap_candidates._read_factors(tiny["stage1"], pools, space, dev, offload=False)
    model, modules = cap_candidates._load_model(tiny["model_dir"], factors, dev, torch.float32)
    mats = cap_candidates.matrices(pools, modules, factors, blocks)
    pol = cap_policy.BernoulliPolicy([b.nvar for b in blocks], [b.cost for b in blocks],
                                     allocate.budget_for(pools, 0.5), seed=3)
    pol.set_probs([torch.full((b.nvar,), 0.5) for b in blocks], project=False)
    sample = pol.sample(0, 0)
    engine = cap_candidates._Engine(model, mats, blocks, dev, torch.float32)
    engine.sample = sample
    shapes = set()
    try:
        for mat in mats:
            m, n = mat.pool.shape
            shapes.add((m, n))
            f = mat.factors
            rk = sample.mask(mat.rank_block) if mat.rank_block is not None else torch.zeros(0, dtype=torch.bool)
            sk = (torch.cat([sample.mask(b) for b in mat.sparse_blocks]) if mat.sparse_blocks
                  else torch.zeros(0, dtype=torch.bool))
            assert 0 < int(rk.sum()) < rk.numel() if space != "sparse-only" else rk.numel() == 0
            assert 0 < int(sk.sum()) < sk.numel() if space != "lowrank-only" else sk.numel() == 0
            U = f["U"][:, rk] if "U" in f else torch.zeros(m, 0)
            V = f["V"][:, rk] if "V" in f else torch.zeros(n, 0)
            sigma = f["sigma"][rk] if "sigma" in f else torch.zeros(0)
            S_index = f["S_index"][sk] if "S_index" in f else torch.zeros(0, dtype=torch.int64)
            S_values = f["S_values"][sk] if "S_values" in f else torch.zeros(0)
            want = slow_dense(U, sigma, V, S_index, S_values, (m, n))
            torch.testing.assert_close(engine._compose(mat).double(), want, rtol=1e-5, atol=1e-6)
    finally:
        engine.close()
    assert shapes >= {(32, 32), (16, 32), (64, 32), (32, 64)}


def test_the_entry_update_is_the_papers_step():
    """One update from two samples with known advantages equals the paper's formula, written out here,
    on probabilities where 1/(s(1-s)) varies from 4 to ~11 (so the factor cannot be dropped unseen)."""
    s0 = [torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]), torch.tensor([0.2, 0.6, 0.85])]
    pol = cap_policy.BernoulliPolicy([5, 3], [1, 4], 10, seed=5, lr=0.05, grad_eps=1e-6, baseline="loo",
                                     samples_per_step=2)
    pol.set_probs(s0, project=False)
    samples = [pol.sample(7, k) for k in range(2)]
    masks = [[smp.mask(b).double() for b in range(2)] for smp in samples]
    assert any(not torch.equal(masks[0][b], masks[1][b]) for b in range(2))
    adv = [0.7, -0.3]
    pol._update(samples, adv)
    for b in range(2):
        s = s0[b].double()
        want = s - 0.05 / 2 * sum(a * (mk[b] - s) for a, mk in zip(adv, masks)) / (s * (1 - s) + 1e-6)
        torch.testing.assert_close(pol.probs(b).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", ["cap", "lowrank-only", "sparse-only"])
def test_entry_policy_samples_reach_the_loss_through_the_allocator(tiny, space):
    """Two masks on the same batch see different losses in every space: with the masks of either kind
    of candidate cut off from the model, the space holding only that kind would score them alike."""
    _, info = run(tiny, ENTRY, space)
    assert info["steps"] == 3 and info["skipped_steps"] == 0
    assert all(len(step) == 2 for step in info["losses"])
    assert all(abs(a - b) > 1e-7 for a, b in info["losses"]), info["losses"]


def test_entry_policy_learned_probabilities_reach_the_final_selection(tiny):
    """Same seed and initialisation: a vanishing lr keeps the untrained masks, training changes them."""
    untrained, _ = run(tiny, {**ENTRY, "epochs": 0})
    frozen, _ = run(tiny, {**ENTRY, "lr": 1e-12})
    trained, info = run(tiny, {**ENTRY, "epochs": 2, "lr": 5.0})
    assert info["steps"] == 6
    assert same(untrained, frozen)
    assert not same(untrained, trained)


# ---- the default budget policy ---------------------------------------------------------------------------

def test_budget_step_is_the_mirrored_estimator():
    """Two steps of one pair each against a fixed linear loss, with theta, the advantage and its running
    mean square written out: theta <- clip(theta - lr * a * eps / rms, -max_shift, max_shift)."""
    dense, lr, sigma = [400, 900, 100], 0.05, 0.2
    pol = cap_budget.BudgetPolicy(dense, [[0], [1], [2]], 700, seed=2, sigma=sigma, lr=lr, max_shift=1.0)
    weight = [3.0, -1.0, 0.5]

    def loss(b):  # linear in the budget shares: larger share of matrix 0 costs loss
        return sum(w * bj / d for w, bj, d in zip(weight, b, dense))

    theta, adv_sq = torch.zeros(3, dtype=torch.float64), None
    for t in range(2):
        eps = pol.noise(t, 0)
        lp, lm = loss(pol.budgets(sigma * eps)), loss(pol.budgets(-sigma * eps))
        assert lp != lm
        a = (lp - lm) / (2 * sigma)
        adv_sq = a * a if adv_sq is None else 0.9 * adv_sq + 0.1 * a * a
        theta = (theta - lr * a * eps / math.sqrt(adv_sq)).clamp(-1.0, 1.0)
        assert pol.step([loss]) == [(lp, lm)]
        torch.testing.assert_close(pol.theta, theta, rtol=1e-12, atol=1e-12)
    assert float(theta.abs().max()) > 0.5 * lr


def test_budget_policy_samples_reach_the_loss_and_offsets_reach_the_budgets(tiny):
    """Through the allocator: every mirrored pair is scored at two different losses; the final budgets
    are those of the learned theta times offset_scale (recomputed here from theta), so offset_scale 0
    gives the uniform allocation and the default 0.5 neither that nor the unscaled offsets."""
    params = {"epochs": 2, "batch_size": 1, "pairs_per_step": 2, "budget_lr": 0.2}
    pools = tiny["pools"]
    names, layers = [p.name for p in pools], [p.layer for p in pools]
    budget = allocate.budget_for(pools, 0.5)
    _, info = run(tiny, params, with_stats=True)
    assert info["steps"] == 6
    assert all(abs(lp - lm) > 1e-7 for step in info["losses"] for lp, lm in step), info["losses"]
    pol = cap_budget.BudgetPolicy([p.dense for p in pools], cap_budget.budget_terms(names, layers, "layer+type"), budget,
                                  seed=0, sigma=0.2, lr=0.2, max_shift=0.7)
    pol.theta = torch.tensor(info["theta"], dtype=torch.float64)
    assert float(pol.theta.abs().max()) > 0.05
    learned = [info["learned_budgets"][n] for n in names]
    assert learned == pol.budgets(scale=0.5)
    uniform = capped_split(budget, [float(p.dense) for p in pools], [p.dense for p in pools])
    assert learned != uniform and learned != pol.budgets(scale=1.0)
    _, info0 = run(tiny, params | {"offset_scale": 0.0}, with_stats=True)
    assert info0["theta"] == info["theta"]  # the same learning
    assert [info0["learned_budgets"][n] for n in names] == uniform == pol.budgets(scale=0.0)


def test_learned_budgets_are_what_the_realisation_spends(tiny, tmp_path):
    """The default path end to end up to the realisation's input: Stage 1 split in memory (stage1
    none), the budget policy through pipeline.run_allocator, and the per-matrix budgets that
    glrs.realise reads back from the allocation file are the learned theta's (times offset_scale),
    recomputed here, not the uniform ones."""
    from glrs import pipeline, realise
    from glrs.stage1 import Stage1

    calib = tmp_path / "calib.safetensors"
    from safetensors.torch import save_file

    save_file({"input_ids": tiny["ids"].contiguous()}, str(calib))
    s1 = Stage1.from_weights(tiny["model_dir"], [0, 1])
    params = {"epochs": 2, "batch_size": 1, "pairs_per_step": 2, "budget_lr": 0.2}
    info = pipeline.run_allocator(s1, "cap", 0.5, params, 0, tiny["model_dir"], str(calib), str(tmp_path / "a.json"),
                                  str(tmp_path / "a.safetensors"), "cpu", tiny["stats"])
    pools = s1.pools()
    names = [p.name for p in pools]
    pol = cap_budget.BudgetPolicy([p.dense for p in pools],
                                  cap_budget.budget_terms(names, [p.layer for p in pools], "layer+type"),
                                  allocate.budget_for(pools, 0.5), seed=0, sigma=0.2, lr=0.2, max_shift=0.7)
    pol.theta = torch.tensor(info["stage2"]["theta"], dtype=torch.float64)
    assert float(pol.theta.abs().max()) > 0.05
    spent = realise.matrix_budgets(json.loads((tmp_path / "a.json").read_text()))
    assert [spent[n] for n in names] == pol.budgets(scale=0.5) != pol.budgets(scale=0.0)
