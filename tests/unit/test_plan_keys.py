"""Keys change when they must (docs/design.md section 4), checked on the whole Plan that make_plan returns.

Changing a stage's code version or one of its parameters must change that
stage's key and every key and path downstream of it, and nothing upstream or
beside it. The plan is flattened into nodes (one per stage output: the model,
Stage 1, calibration, each run's allocation and compressed model, each
evaluation protocol, each metrics file); `DOWNSTREAM` is the DAG of
docs/design.md section 3 written out by hand, and every change below is checked
against its closure exactly.
"""
from __future__ import annotations

import copy
import importlib

import pytest

from glrs import (allocate, compressed, config as glrs_config, data, evaluate, modelio, plan as glrs_plan, realise, rpca,
                  stats, zeroshot)


SEVERAL = ["refit", "wanda", "sparsegpt"]  # realise.mode as a list: every allocation realised by each


@pytest.fixture(scope="module", params=[("refit", "weights"), ("select", "weights"), ("select", "rpca"),
                                        ("wanda", "weights"), (SEVERAL, "weights")],
                ids=["refit-weights", "select-weights", "select-rpca", "wanda-weights", "several-weights"])
def base_config(tiny_llama_dir, request):
    cfg = glrs_config.load()
    cfg |= {"model": str(tiny_llama_dir), "layers": "all", "methods": ["cap", "wanda"],
            "allocators": ["uniform", "cap", "owl"], "target_density": [0.4, 0.5]}
    # CAP runs realised (refit) or materialised from the kept candidates; Stage 1 the weights (no files) or RPCA
    cfg["realise"] = {"mode": request.param[0]}
    cfg["stage1"] = request.param[1]
    cfg["evaluation"]["zeroshot"]["tasks"] = ["glrs_cloze"]
    return cfg


def nodes(p: glrs_plan.Plan) -> dict[str, str]:
    """Every key and path of the plan, by the stage output it names."""
    out = {"model": p.model_key, "model_dir": p.model_dir, "rpca": p.stage1_key, "rpca_files": "|".join(p.rpca_files),
           "calib": p.calib_key, "calib_file": p.calib_file, "zeroshot": p.zeroshot_key,
           "stats": p.stats_key, "stats_files": "|".join(p.stats_files)}
    for ds, key in p.eval_keys.items():
        out[f"eval:{ds}"] = key
        out[f"metrics:dense:{ds}"] = p.metrics_file(p.dense_target, ds)
    out["zs:dense"] = p.zeroshot_file(p.dense_target)
    for r in p.runs:
        if r.alloc_key:
            out[f"alloc:{r.label}"] = r.alloc_key
            out[f"alloc_files:{r.label}"] = "|".join([p.alloc_json(r), *p.alloc_masks(r).values()])
        if r.realise_key:
            out[f"realise:{r.label}"] = r.realise_key
            out[f"realise_files:{r.label}"] = "|".join(p.realised_files(r))
        out[f"comp:{r.label}"] = r.comp_key
        out[f"comp_dir:{r.label}"] = p.compressed_dir(r)
        for ds in p.eval_keys:
            out[f"metrics:{r.label}:{ds}"] = p.metrics_file(r.comp_key, ds)
        out[f"zs:{r.label}"] = p.zeroshot_file(r.comp_key)
    return out


def downstream(p: glrs_plan.Plan) -> dict[str, set[str]]:
    """Direct successors of each node (docs/design.md section 3). Under stage1 weights there are no Stage-1
    files (their consumers split the weights): the Stage-1 key still reaches every allocation."""
    ds_list = list(p.eval_keys)
    files = {"rpca_files"} if p.rpca_files else set()
    g: dict[str, set[str]] = {
        "model": {"model_dir", "calib_file", "stats_files", "rpca", "calib", "stats", "zs:dense"} | files
                 | {f"metrics:dense:{d}" for d in ds_list} | {f"realise:{r.label}" for r in p.realised_runs},
        "rpca": files | {f"alloc:{r.label}" for r in p.cap_runs},
        "calib": {"calib_file"} | {f"alloc:{r.label}" for r in p.cap_runs if r.allocator in allocate.NEEDS_CALIBRATION}
                 | {f"comp:{r.label}" for r in p.baseline_runs} | {"stats"},
        "stats": {"stats_files"} | {f"alloc:{r.label}" for r in p.cap_runs if allocate.needs_stats(r.allocator, r.params)}
                 | {f"realise:{r.label}" for r in p.realised_runs},
        "zeroshot": {f"zs:{r.label}" for r in p.runs} | {"zs:dense"},
    }
    for d in ds_list:
        g[f"eval:{d}"] = {f"metrics:{r.label}:{d}" for r in p.runs} | {f"metrics:dense:{d}"}
    for r in p.runs:
        if r.alloc_key:
            g[f"alloc:{r.label}"] = {f"alloc_files:{r.label}", f"realise:{r.label}" if r.realise_key else f"comp:{r.label}"}
        if r.realise_key:
            g[f"realise:{r.label}"] = {f"realise_files:{r.label}", f"comp:{r.label}"}
        g[f"comp:{r.label}"] = {f"comp_dir:{r.label}", f"zs:{r.label}"} | {f"metrics:{r.label}:{d}" for d in ds_list}
    return g


def closure(p: glrs_plan.Plan, roots: set[str]) -> set[str]:
    g, seen, todo = downstream(p), set(), list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += g.get(n, ())
    return seen


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if before[k] != after[k]}


def labels(p, pred) -> set[str]:
    return {r.label for r in p.runs if pred(r)}


def _set(cfg: dict, path: str, value):
    *head, last = path.split(".")
    for k in head:
        cfg = cfg.setdefault(k, {})
    cfg[last] = value


def _realised(p, *modes) -> set[str]:
    return {f"realise:{r.label}" for r in p.realised_runs if r.realiser in modes}


def _modes(cfg) -> list[str]:
    mode = cfg["realise"]["mode"]
    return mode if isinstance(mode, list) else [mode]


# (what is changed, how, the nodes it reaches first)
VERSION_CHANGES = [
    ("model", modelio, "PREPARE_VERSION", lambda p: {"model"}),
    # the Stage-1 key: RPCA's code version where RPCA runs, the weights' split's otherwise
    ("rpca", rpca, "RPCA_VERSION", lambda p: {"rpca"} if p.stage1 == "rpca" else set()),
    ("stage1", "glrs.stage1", "WEIGHTS_VERSION", lambda p: {"rpca"} if p.stage1 == "weights" else set()),
    ("calib", data, "DATA_VERSION", lambda p: {"calib"}),
    ("alloc", allocate, "ALLOC_VERSION", lambda p: {f"alloc:{r.label}" for r in p.cap_runs}),
    ("cap", "glrs.cap", "CAP_VERSION", lambda p: {f"alloc:{r.label}" for r in p.cap_runs if r.allocator == "cap"}),
    ("stats", stats, "STATS_VERSION", lambda p: {"stats"}),
    ("realise", realise, "REALISE_VERSION", lambda p: {f"realise:{r.label}" for r in p.realised_runs}),
    # The compressed-model format is every method's output: its version reaches every compressed model.
    ("materialise", compressed, "MATERIALISE_VERSION", lambda p: {f"comp:{r.label}" for r in p.runs}),
    ("baseline", glrs_plan, "BASELINE_VERSION", lambda p: {f"comp:{r.label}" for r in p.baseline_runs}),
    ("wanda", "glrs.methods.wanda:Wanda", "version", lambda p: {f"comp:{r.label}" for r in p.baseline_runs if r.method == "wanda"}),
    ("eval", evaluate, "EVAL_VERSION", lambda p: {f"eval:{d}" for d in p.eval_keys}),
    ("zeroshot", zeroshot, "ZEROSHOT_VERSION", lambda p: {"zeroshot"}),
]


@pytest.mark.parametrize("stage,module,attr,roots", VERSION_CHANGES, ids=[c[0] for c in VERSION_CHANGES])
def test_code_version_reaches_exactly_its_downstream(stage, module, attr, roots, base_config, monkeypatch):
    before_plan = glrs_plan.make_plan(copy.deepcopy(base_config))
    before = nodes(before_plan)
    if isinstance(module, str):
        module, _, cls = module.partition(":")
        mod = importlib.import_module(module)
        mod = getattr(mod, cls) if cls else mod
    else:
        mod = module
    monkeypatch.setattr(mod, attr, getattr(mod, attr, 1) + 1, raising=False)
    after_plan = glrs_plan.make_plan(copy.deepcopy(base_config))
    expected = closure(before_plan, roots(before_plan))
    assert changed(before, nodes(after_plan)) == expected
    monkeypatch.undo()  # revert: the old keys are found again
    assert nodes(glrs_plan.make_plan(copy.deepcopy(base_config))) == before


PARAM_CHANGES = [
    ("dtype", "dtype", "bfloat16",
     lambda p: {"model", "zeroshot"} | {f"eval:{d}" for d in p.eval_keys}),  # the model's dtype is also the evaluation's
    ("rpca.tol", "rpca.tol", 1e-5, lambda p: {"rpca"} if p.stage1 == "rpca" else set()),  # no key where RPCA does not run
    ("calibration.nsamples", "calibration.nsamples", 16, lambda p: {"calib"}),
    ("seed", "seed", 1, lambda p: {"calib", "zeroshot"} | {f"alloc:{r.label}" for r in p.cap_runs}
     | {f"comp:{r.label}" for r in p.baseline_runs}),
    ("uniform.rank_fraction", "allocator_params.uniform.rank_fraction", 0.25,
     lambda p: {f"alloc:{r.label}" for r in p.cap_runs if r.allocator == "uniform"}),
    ("cap.lr", "allocator_params.cap.lr", 0.5,
     lambda p: {f"alloc:{r.label}" for r in p.cap_runs if r.allocator == "cap"}),
    ("cap.offset_scale", "allocator_params.cap.offset_scale", 1.0,  # the default policy's own settings
     lambda p: {f"alloc:{r.label}" for r in p.cap_runs if r.allocator == "cap"}),
    ("cap.pairs_per_step", "allocator_params.cap.pairs_per_step", 2,
     lambda p: {f"alloc:{r.label}" for r in p.cap_runs if r.allocator == "cap"}),
    # the refit's own settings reach only the refit's realisations; damp is also SparseGPT's (its percdamp)
    ("realise.iterations", "realise.iterations", 7, lambda p: _realised(p, "refit")),
    ("realise.rank_ratio", "realise.rank_ratio", 0.2, lambda p: _realised(p, "refit")),
    ("realise.damp", "realise.damp", 0.05, lambda p: _realised(p, "refit", "sparsegpt")),
    ("wanda.batch_size", "method_params.wanda.batch_size", 8,
     lambda p: {f"comp:{r.label}" for r in p.baseline_runs if r.method == "wanda"}),
    ("export", "export", "dense", lambda p: {f"comp:{r.label}" for r in p.runs}),  # hf/ is in the output
    ("evaluation.seqlen", "evaluation.seqlen", 128, lambda p: {f"eval:{d}" for d in p.eval_keys}),
    ("zeroshot.limit", "evaluation.zeroshot.limit", 10, lambda p: {"zeroshot"}),
]


@pytest.mark.parametrize("name,path,value,roots", PARAM_CHANGES, ids=[c[0] for c in PARAM_CHANGES])
def test_parameter_reaches_exactly_its_downstream(name, path, value, roots, base_config):
    before_plan = glrs_plan.make_plan(copy.deepcopy(base_config))
    cfg = copy.deepcopy(base_config)
    _set(cfg, path, value)
    after_plan = glrs_plan.make_plan(cfg)
    assert [r.label for r in after_plan.runs] == [r.label for r in before_plan.runs]
    expected = closure(before_plan, roots(before_plan))  # empty for realise settings when nothing is realised
    assert changed(nodes(before_plan), nodes(after_plan)) == expected


def test_density_sweep_shares_everything_upstream_of_allocation(base_config):
    """Adding a density adds runs; every existing key, and every key upstream of allocation, is kept."""
    before = nodes(glrs_plan.make_plan(copy.deepcopy(base_config)))
    cfg = copy.deepcopy(base_config)
    cfg["target_density"] = [0.4, 0.5, 0.6]
    after = nodes(glrs_plan.make_plan(cfg))
    assert {k: after[k] for k in before} == before
    assert len(after) > len(before)


def test_stage1_weights_plans_no_stage1_files(base_config):
    """Under stage1 weights nothing asks for a Stage-1 file: the allocation reads the model, and every consumer
    is told to split the weights; under rpca they read the decompose files."""
    p = glrs_plan.make_plan(copy.deepcopy(base_config))
    run = p.cap_runs[0]
    if p.stage1 == "weights":
        assert p.splits_weights and p.rpca_files == [] and p.spectra_files == []
        assert p.allocate_inputs(run.alloc_key)["model"] == p.model_dir and "rpca" not in p.allocate_inputs(run.alloc_key)
        assert p.stage1_args() == f"--split-layers {' '.join(map(str, p.layers))} --stage1-key {p.stage1_key}"
    else:
        assert not p.splits_weights and len(p.rpca_files) == len(p.layers)
        assert p.allocate_inputs(run.alloc_key)["rpca"] == p.rpca_files
        assert p.stage1_args([0]) == f"--rpca {p.rpca_file(0)}"
    assert p.spectra_layers == [0]  # of plots.spectra_layers [0, 14, 29], the tiny model's 3 layers have 0


BASELINES = ["magnitude", "wanda", "sparsegpt", "svd", "asvd", "svdllm", "oats", "bolaco", "sslc"]


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_code_version_reaches_exactly_its_runs(method, base_config, monkeypatch):
    """A baseline's algorithm version (its `version`, else its module's VERSION) is in its compressed
    keys: bumping it renews that method's runs and their metrics, nothing of the other methods."""
    from glrs import methods

    cfg = copy.deepcopy(base_config)
    cfg["methods"] = ["cap", *BASELINES]
    before_plan = glrs_plan.make_plan(copy.deepcopy(cfg))
    impl = methods.get_method(method)
    monkeypatch.setattr(impl, "version", methods.method_version(method) + 1, raising=False)
    after = nodes(glrs_plan.make_plan(copy.deepcopy(cfg)))
    roots = {f"comp:{r.label}" for r in before_plan.baseline_runs if r.method == method}
    assert roots and changed(nodes(before_plan), after) == closure(before_plan, roots)


def test_realise_sparsity_reaches_exactly_the_realise_keys(base_config):
    """realise.sparsity 2:4 is a realise setting like the others: it renews the realisations and what they
    feed, nothing upstream. Under 2:4 rank_ratio is ignored, so it changes nothing; an explicit
    `unstructured` is the default (the keys made before the setting existed)."""
    cfg = copy.deepcopy(base_config)
    cfg["target_density"] = [0.5, 0.6]  # 2:4 needs >= 0.5
    if "select" in _modes(cfg):
        with pytest.raises(glrs_plan.GlrsError, match="mode refit"):
            glrs_plan.make_plan(copy.deepcopy(cfg) | {"realise": cfg["realise"] | {"sparsity": "2:4"}})
        return
    before_plan = glrs_plan.make_plan(copy.deepcopy(cfg))
    same = copy.deepcopy(cfg)
    same["realise"]["sparsity"] = "unstructured"
    assert nodes(glrs_plan.make_plan(same)) == nodes(before_plan)
    nm = copy.deepcopy(cfg)
    nm["realise"]["sparsity"] = "2:4"
    after_plan = glrs_plan.make_plan(nm)
    assert [r.label for r in after_plan.runs] == [r.label for r in before_plan.runs] and not after_plan.excluded
    roots = {f"realise:{r.label}" for r in before_plan.realised_runs}
    assert roots and changed(nodes(before_plan), nodes(after_plan)) == closure(before_plan, roots)
    assert all("sparsity=2:4" in after_plan.cap_variant(r) for r in after_plan.cap_runs)
    nm["realise"]["rank_ratio"] = 0.3
    assert nodes(glrs_plan.make_plan(nm)) == nodes(after_plan)


def test_nm_runs_at_densities_they_cannot_keep_are_left_out(base_config):
    """2:4 keeps at least (CAP's realisation, OATS) or exactly (Wanda) half of each matrix: the plan leaves
    out the other densities and says so; a method left with no density at all is an error."""
    cfg = copy.deepcopy(base_config)
    if "select" in _modes(cfg):
        return
    cfg["methods"] = ["cap", "wanda", "oats"]
    cfg["target_density"] = [0.4, 0.5, 0.6]
    plain = glrs_plan.make_plan(copy.deepcopy(cfg))
    cfg["realise"]["sparsity"] = "2:4"
    cfg["method_params"] = {"wanda": {"nm": "2:4"}, "oats": {"nm": "2:4"}}
    p = glrs_plan.make_plan(copy.deepcopy(cfg))
    got = {(r.method, r.density) for r in p.runs}
    assert {d for m, d in got if m == "cap"} == {0.5, 0.6} and {d for m, d in got if m == "oats"} == {0.5, 0.6}
    assert {d for m, d in got if m == "wanda"} == {0.5}
    assert sorted(x.split(":")[0] for x in p.excluded) == ["cap@0.4", "oats@0.4", "wanda@0.4", "wanda@0.6"]
    # cap@0.4 per allocator and realiser
    assert not plain.excluded and len(plain.runs) == len(p.runs) + len(cfg["allocators"]) * len(_modes(cfg)) + 3
    cfg["target_density"] = [0.4]
    with pytest.raises(glrs_plan.GlrsError, match="none of"):
        glrs_plan.make_plan(cfg)


# ---- the seam: several realisers of one allocation (realise.mode a list) ------------------------------------

def test_default_refit_key_is_unchanged(base_config):
    """The refit's resolved settings, and so the realise key of the default config, are those made before the
    pruning realisers existed (pinned: 5205d87b37b7 over fixed input keys, REALISE_VERSION 4); naming the mode, or a list of it
    alone, plans the same keys and paths."""
    from glrs import cas

    assert cas.key_of("realise", realise.REALISE_VERSION, {"model": "m", "alloc": "a", "stats": "s"},
                      realise.resolve_params({})) == "5205d87b37b7"
    cfg = copy.deepcopy(base_config)
    if _modes(cfg) != ["refit"]:
        return
    plain = nodes(glrs_plan.make_plan(copy.deepcopy(cfg)))
    for mode in (["refit"], None):
        other = copy.deepcopy(cfg)
        if mode is None:
            del other["realise"]["mode"]
        else:
            other["realise"]["mode"] = mode
        assert nodes(glrs_plan.make_plan(other)) == plain


def test_several_realisers_are_the_union_of_single_ones(base_config):
    """realise.mode [refit, wanda, sparsegpt]: every allocation is realised by each; each realiser's keys are the
    ones a config naming it alone plans, the allocations are shared, and the variant (info.json, summary.csv)
    names the realiser."""
    cfg = copy.deepcopy(base_config)
    if "select" in _modes(cfg) or cfg["stage1"] != "weights":
        return
    cfg["realise"]["mode"] = SEVERAL
    several = glrs_plan.make_plan(copy.deepcopy(cfg))
    got = {(r.allocator, r.density, r.realiser): (r.alloc_key, r.realise_key, r.comp_key) for r in several.cap_runs}
    assert len(got) == len(several.cap_runs) == len(cfg["allocators"]) * len(cfg["target_density"]) * len(SEVERAL)
    assert len({r.realise_key for r in several.cap_runs}) == len(several.cap_runs)  # one realisation each
    assert len({r.comp_key for r in several.runs}) == len(several.runs)
    assert len(nodes(several)) == len(set(nodes(several)))  # labels tell the realisers apart
    for mode in SEVERAL:
        one = copy.deepcopy(cfg)
        one["realise"]["mode"] = mode
        alone = glrs_plan.make_plan(one)
        assert {(r.allocator, r.density, r.realiser): (r.alloc_key, r.realise_key, r.comp_key)
                for r in alone.cap_runs} == {k: v for k, v in got.items() if k[2] == mode}
        assert {r.comp_key for r in alone.baseline_runs} == {r.comp_key for r in several.baseline_runs}
        for r in several.cap_runs:
            if r.realiser == mode:
                assert several.realise_params_of(r) == alone.realise_params
                assert f"realise={mode}" in several.cap_variant(r) == several.run_info(r)["variant"]
    assert several.realise_params == several.realise_modes["refit"]
    assert {k[:2] for k in got} == {(r.allocator, r.density) for r in several.cap_runs}
    assert len({r.alloc_key for r in several.cap_runs}) == len(cfg["allocators"]) * len(cfg["target_density"])


def test_pruning_realisers_take_24_and_select_does_not(base_config):
    cfg = copy.deepcopy(base_config)
    if cfg["stage1"] != "weights":
        return
    cfg["target_density"] = [0.5]
    cfg["realise"] = {"mode": ["wanda", "sparsegpt"], "sparsity": "2:4"}
    p = glrs_plan.make_plan(copy.deepcopy(cfg))
    assert all(p.cap_variant(r).endswith(f"realise={r.realiser} sparsity=2:4") for r in p.cap_runs)
    assert all(p.realise_params_of(r) == realise.resolve_params({"mode": r.realiser, "sparsity": "2:4"})
               for r in p.cap_runs)
    cfg["realise"]["mode"] = ["wanda", "select"]
    with pytest.raises(glrs_plan.GlrsError, match="mode refit, wanda or sparsegpt"):
        glrs_plan.make_plan(cfg)


def test_validation_adds_its_own_files_and_changes_no_key(base_config):
    """evaluation.validation adds one validation perplexity per model and dataset, each in a file of its own
    (a key of the validation text, never an evaluation key), and leaves every other key and path as it was."""
    before_plan = glrs_plan.make_plan(copy.deepcopy(base_config))
    cfg = copy.deepcopy(base_config)
    cfg["evaluation"]["validation"] = True
    after_plan = glrs_plan.make_plan(cfg)
    assert nodes(after_plan) == nodes(before_plan) and before_plan.val_keys == {}
    ds = cfg["evaluation"]["datasets"][0]
    assert set(after_plan.val_keys) == set(after_plan.eval_keys)
    assert after_plan.val_keys[ds] != after_plan.eval_keys[ds]
    assert after_plan.ppl_role(ds, after_plan.val_keys[ds]) == "validation"
    assert after_plan.ppl_role(ds, after_plan.eval_keys[ds]) == "evaluation"
    with pytest.raises(glrs_plan.GlrsError, match="no perplexity"):
        after_plan.ppl_role(ds, "0" * 12)
    added = set(after_plan.all_metrics()) - set(before_plan.all_metrics())
    targets = [after_plan.dense_target] + [r.comp_key for r in after_plan.runs]
    assert added == {after_plan.metrics_file(t, d, "validation") for t in targets for d in after_plan.val_keys}
    assert all(after_plan.val_keys[ds] in f for f in added)
    assert after_plan.calibration_dataset(after_plan.dense_target) == ""
    assert after_plan.calibration_dataset(targets[1]) == cfg["calibration"]["dataset"]
