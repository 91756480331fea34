"""CAP Stage 2's `loss: reconstruction` (glrs.cap.candidates._Reconstruction): the mean over the target
matrices of the relative output error of a mask sample on the dense model's calibration inputs.

On the tiny random Llama of tests/conftest.py (2 layers, hidden 32), decomposed by the real Stage 1 (RPCA)
or split as L = 0, S = W (stage1 weights), with the real activations job's H files, on the CPU."""
from __future__ import annotations

import copy

import pytest
import torch

from glrs import allocate, cap, cas, stats
from glrs.cap import candidates as cc
from glrs.errors import GlrsError
from glrs.stage1 import Stage1

from conftest import slow_dense, tiny_decomposed

PAPER = {"policy": "entry", "loss": "reconstruction", "lr": 0.05, "samples_per_step": 1, "baseline": "ema",
         "init": "magnitude", "epochs": 1, "batch_size": 2}  # config/paper.yaml's Stage 2, 3 steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cap_recon")
    t = tiny_decomposed(root)
    stats.collect(t["model_dir"], t["ids"], [0, 1], str(root / "stats"))
    t["stats"] = [str(stats.layer_file(root / "stats", i)) for i in (0, 1)]
    t["exact"] = Stage1.from_weights(t["model_dir"], [0, 1])  # L = 0, S = W exactly
    t["exact_pools"] = t["exact"].pools()
    return t


class Masks:
    """A mask sample given as one bool tensor per block."""

    def __init__(self, masks):
        self.masks = masks

    def mask(self, b):
        return self.masks[b]


def engine(tiny, stage1, pools):
    dev = torch.device("cpu")
    blocks = cc.build_blocks(pools, "cap", 1)
    factors = cc._read_factors(stage1, pools, "cap", dev, offload=False)
    dense, H = cc.read_reconstruction_targets(tiny["model_dir"], tiny["stats"], pools, dev, offload=False)
    return cc._Reconstruction(cc.matrices(pools, None, factors, blocks), blocks, dense, H, dev), blocks, factors


def keep_fraction(blocks, frac):
    """Keep the first `frac` of every block (Stage 1's order: largest sigma / |S| first)."""
    return Masks([torch.arange(b.nvar) < round(frac * b.nvar) for b in blocks])


def test_all_kept_is_zero_when_l_plus_s_is_w_and_grows_as_candidates_are_dropped(tiny):
    rec, blocks, _ = engine(tiny, tiny["exact"], tiny["exact_pools"])
    losses = [rec.loss(tiny["ids"], keep_fraction(blocks, f)) for f in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert losses[0] == 0.0  # W~ = S = W, bit for bit
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(1.0, rel=1e-12)  # nothing kept: each matrix loses all its output energy


def test_all_kept_with_rpca_is_its_residual(tiny):
    """With RPCA's factors, L + S = W to the solver's tolerance (1e-7): all kept loses almost nothing."""
    rec, blocks, _ = engine(tiny, tiny["stage1"], tiny["pools"])
    assert 0.0 <= rec.loss(tiny["ids"], keep_fraction(blocks, 1.0)) < 1e-10
    assert rec.loss(tiny["ids"], keep_fraction(blocks, 0.5)) > 1e-4


def test_equals_the_direct_computation_on_the_dense_inputs(tiny):
    """A random mask over RPCA's candidates: the loss is the mean over the 14 matrices of
    ||(W - W~) X^T||_F^2 / ||W X^T||_F^2, X every calibration token's input to the matrix in the dense model
    (hooks on a plain forward pass), W~ composed the slow obvious way."""
    from transformers import AutoModelForCausalLM

    pools = tiny["pools"]
    rec, blocks, factors = engine(tiny, tiny["stage1"], pools)
    gen = torch.Generator().manual_seed(3)
    sample = Masks([torch.rand(b.nvar, generator=gen) < 0.6 for b in blocks])
    got = rec.loss(tiny["ids"], sample)

    model = AutoModelForCausalLM.from_pretrained(tiny["model_dir"], dtype=torch.float32).eval()
    inputs, handles = {}, []
    for q in pools:
        mod = model.get_submodule(q.name.removesuffix(".weight"))
        handles.append(mod.register_forward_pre_hook(
            lambda _m, args, name=q.name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).double())))
    with torch.no_grad():
        model(tiny["ids"])
    for h in handles:
        h.remove()
    errors = []
    for i, q in enumerate(pools):
        f = factors[q.name]
        mine = [b for b, blk in enumerate(blocks) if blk.matrix == i]
        rank = next(sample.mask(b) for b in mine if blocks[b].kind == "rank")
        sparse = next(sample.mask(b) for b in mine if blocks[b].kind == "sparse")
        W_new = slow_dense(f["U"], f["sigma"] * rank, f["V"], f["S_index"][sparse], f["S_values"][sparse], q.shape)
        W = model.get_submodule(q.name.removesuffix(".weight")).weight.detach().double()
        X = torch.cat(inputs[q.name])
        errors.append(float(((W - W_new) @ X.T).square().sum() / (W @ X.T).square().sum()))
    assert got == pytest.approx(sum(errors) / len(errors), rel=1e-6)


def run(tiny, params, seed=0, stats_files="default"):
    return cap.allocate_with_info(tiny["pools"], 0.5, params, seed, tiny["model_dir"], tiny["stage1"], tiny["ids"],
                                  device="cpu", stats_files=tiny["stats"] if stats_files == "default" else stats_files)


def same(a, b):
    return all(torch.equal(a.rank_keep[k], b.rank_keep[k]) and torch.equal(a.sparse_keep[k], b.sparse_keep[k])
               for k in a.rank_keep)


@pytest.mark.parametrize("policy", ["entry", "tied"])
def test_the_policy_with_this_loss_is_deterministic_and_learns_from_it(tiny, policy):
    params = PAPER | {"policy": policy}
    a, ia = run(tiny, params, seed=5)
    b, ib = run(tiny, params, seed=5)
    assert same(a, b) and ia["losses"] == ib["losses"]
    assert ia["steps"] == 3 and ia["skipped_steps"] == 0 and ia["params"]["loss"] == "reconstruction"
    assert all(0.0 < step[0] < 1.0 for step in ia["losses"])  # relative errors of partial masks
    c, ic = run(tiny, params | {"offload": True}, seed=5)  # W, H and factors on the CPU side: same numbers
    assert same(a, c) and ic["losses"] == ia["losses"]
    _, other = run(tiny, params, seed=6)
    assert other["losses"] != ia["losses"]
    ce, ice = run(tiny, params | {"loss": "cross-entropy"}, seed=5)
    assert ice["losses"] != ia["losses"]  # the loss is what the policy saw: cross-entropy is ~ln(96) here
    assert ia["params_kept"] <= allocate.budget_for(tiny["pools"], 0.5)


def test_missing_or_wrong_inputs_are_clear_errors(tiny):
    with pytest.raises(GlrsError, match="--stats"):
        run(tiny, PAPER, stats_files=None)
    with pytest.raises(GlrsError, match="2 activation-statistics files for 1 layers"):
        cc.read_reconstruction_targets(tiny["model_dir"], tiny["stats"], [tiny["pools"][0]], torch.device("cpu"), False)
    with pytest.raises(GlrsError, match="policy entry or tied"):
        cap.resolve_params({"loss": "reconstruction"})  # the default budget policy has its own surrogate
    with pytest.raises(GlrsError, match="loss must be one of"):
        cap.resolve_params({"loss": "mse", "policy": "tied"})


def test_allocation_keys_change_only_when_the_loss_is_set(tiny_llama_dir):
    """`loss` was added after allocation keys existed: left at its default (or named as it) it is not in the
    resolved parameters, so the keys stay (pinned over fixed input keys: computed before the setting
    existed); set to reconstruction it changes exactly the CAP allocations and what follows them, which
    also read the activations job's files."""
    from glrs import config as glrs_config, plan as glrs_plan

    def key(params):
        return cas.key_of("alloc", allocate.ALLOC_VERSION,
                          {"rpca": "r", "layers": "0,1", "calib": "c", "cap_version": str(cap.CAP_VERSION)},
                          {"allocator": "cap", "density": 0.5, "params": cap.resolve_params(params), "seed": 0})

    assert key({}) == key({"loss": "cross-entropy"}) == "6996628a0090"
    assert key({"policy": "entry"}) == key({"policy": "entry", "loss": "cross-entropy"}) == "d95f42e5e9fc"
    assert key({"policy": "entry", "loss": "reconstruction"}) != key({"policy": "entry"})

    cfg = glrs_config.load()
    cfg |= {"model": str(tiny_llama_dir), "layers": [0, 1], "methods": ["cap"], "allocators": ["uniform", "cap"],
            "target_density": [0.5], "allocator_params": {"cap": {"policy": "entry"}}}
    plans = {}
    for loss in (None, "cross-entropy", "reconstruction"):
        c = copy.deepcopy(cfg)
        if loss:
            c["allocator_params"]["cap"]["loss"] = loss
        plans[loss] = glrs_plan.make_plan(c)
    runs = {loss: {r.allocator: r for r in p.runs} for loss, p in plans.items()}
    assert [r.comp_key for r in runs[None].values()] == [r.comp_key for r in runs["cross-entropy"].values()]
    assert runs["reconstruction"]["uniform"].comp_key == runs[None]["uniform"].comp_key
    recon = runs["reconstruction"]["cap"]
    assert recon.alloc_key != runs[None]["cap"].alloc_key and recon.comp_key != runs[None]["cap"].comp_key
    assert "stats" in plans["reconstruction"].allocate_inputs(recon.alloc_key)
    assert "stats" not in plans[None].allocate_inputs(runs[None]["cap"].alloc_key)
    assert "loss=reconstruction" in plans["reconstruction"].cap_variant(recon)  # the summary tells the two apart
    assert "loss=" not in plans[None].cap_variant(runs[None]["cap"])
