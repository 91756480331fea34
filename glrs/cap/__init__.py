"""Stage 2, CAP: global probabilistic allocation of singular components and sparse entries.

CAP = "Large Language Model Compression with Global Rank and Sparsity Optimization",
Zhou et al., arXiv 2505.03801 (v3, ICLR 2026). Stage 1 (glrs.rpca) split every
target matrix W (m x n) into L = U diag(sigma) V^T and a sparse S. Stage 2,
this module, decides which singular components and which entries of S survive,
for all layers at once, under one global parameter budget.

What it hands on. [departure] By default (`realise.mode: refit`) only the per-matrix totals of
the kept parameters leave this stage: glrs.realise spends each matrix's total on low-rank +
sparse weights refitted to the calibration inputs, because on SmolLM2 the kept RPCA candidates
themselves lose ~8x more of a matrix's output than the realisation (0.120 against 0.0145 on four
matrices of layer 12; docs/departures.md). `realise.mode: select` materialises the kept candidates (the paper).

Policies (`allocator_params.cap.policy`). The package's parts: `budget.py` -- the default
([departure]): REINFORCE over per-matrix budgets directly, the one quantity the realisation reads
(see that module); `policy.py` -- the paper's per-candidate Bernoulli policy (`entry`) and the tied
one (`tied`), with the budget projection and the final selection; `candidates.py` -- the Stage-1
candidates those two act on and the model that composes W~ from a mask sample. Measured (H200, 128 x 512
calibration, density 0.4 / 0.5 / 0.6, docs/results-history.md): the default realised to perplexity
18.66 / 13.72 / 11.75 against 21.11 / 13.83 / 11.68 for the uniform allocation and 44.83 / 17.66 / 12.62
for the best OATS; the paper as written (`policy: entry`, `realise.mode: select`) 6.77e6 at 0.5.

Sources. The paper's own text is not reachable from this workplace. What is
stated below as [paper] comes from two public secondary sources that read the
full v3 text: a paper note (method equations, settings) and a source-grounded
review of the v3 PDF/TeX (settings, and the remark that the paper leaves the
cost normalisation of the projection and of the final top-budget selection
under-specified). [lineage] marks details taken from the public code of the
predecessor method by the same corresponding author (Gao, Liu, Zhang et al.,
"Bypass Back-propagation: Optimization-based Structural Pruning for LLMs via
Policy Gradient", ACL 2025), on which CAP's Stage 2 is modelled. [choice] marks
what neither says and this module decides; [departure] marks a deliberate
difference from the paper.

Algorithm
---------
Variables. [paper] One Bernoulli keep-variable per singular component,
m_k ~ Bernoulli(s_k), and one per nonzero of S, n_ij ~ Bernoulli(s_ij). A mask
sample gives W~ = U diag(m * sigma) V^T + (n * S). Space "lowrank-only" has only
the component variables and drops S entirely from W~; "sparse-only" has only the
entry variables and drops L.
  Parameterisation ([departure], `policy: tied`, the default; `policy: entry` is
  the paper's): every candidate keeps its own Bernoulli variable, but its logit is
  logit_i = z_i + theta_b - c, with z_i = ln(score_i) / T fixed by the
  initialisation, one learned offset theta_b per block (one matrix's singular
  components, or its sparse entries: 420 blocks for SmolLM2-135M) and one global
  shift c that keeps the expected cost at B. REINFORCE then learns the paper's
  question -- how much rank and how many sparse entries each matrix of each layer
  keeps -- with a few hundred variables instead of ~10^7-10^9, and the order inside
  a matrix is the initial importance order. Why: measured on SmolLM2-135M (H200,
  whole held-out text, density 0.5), the untied per-entry policy after 384 steps
  gave perplexity 2.0e7 against 8.9e3 at its own initialisation (one scalar loss per
  mask cannot resolve 7e7 independent probabilities: each does a random walk and
  the final top-probability masks turn near-random), while the tied policy improved
  on its initialisation at every density (3490 -> 3060 at 0.5 after 128 steps).
  See TiedPolicy for its step and projection.
  Optional grouping ([choice], off by default = the paper): with
  `sparse_group_size: G > 1`, G consecutive entries of one matrix's S in Stage 1's
  |value|-descending order share one variable (cost G). This divides the number
  of variables (and the estimator's variance) by G.

Cost. [paper] A component of an m x n matrix costs m + n (sigma folded into a
factor), an entry costs 1. Budget B = round(density * dense) = allocate.budget_for.

Objective. [paper] min_s E_{m ~ p(.|s)} [ L(W~(m)) ] s.t. sum_k cost_k s_k = B,
0 <= s <= 1. L is the calibration loss (`loss`, policies entry and tied):
  `cross-entropy` (default, [choice]): the mean next-token cross-entropy of the
    whole model on a batch of calibration sequences, by forward passes only.
  `reconstruction` ([paper] as issue 24 reads it: a layer-wise output-reconstruction
    loss on the calibration set; config/paper.yaml): the mean over the target
    matrices of tr(E H E^T) / tr(W H W^T), E = W - W~(m), H = X^T X / tokens of the
    *dense* model's inputs over the whole calibration set (the activations job's
    files; equal to ||E X^T||_F^2 / ||W X^T||_F^2, so nothing is stored and no model
    runs). [choice] relative per matrix and averaged (the paper's normalisation is not
    known here), dense inputs (not the compressed model's), every calibration token in
    every step (a squared error needs no batch; the step count is still epochs x
    ceil(nsamples / batch_size)). See candidates._Reconstruction.

Estimator. [paper] REINFORCE: grad_s E[L] = E[ L * grad_s log p(m|s) ] with
grad_{s_k} log p(m_k|s_k) = (m_k - s_k) / (s_k (1 - s_k) + eps), a moving-average
baseline delta <- beta * delta + (1 - beta) * L, and the plain step
s <- s - lr * (L - delta) * (m - s) / (s (1 - s) + eps).
  [lineage] the baseline is updated with the current loss *before* the
  advantage L - delta is formed, and starts at the first loss (so the very first
  step moves nothing but the projection). [paper] "sliding window of five"
  [choice: read as that baseline]: the lineage code implements a moving-average
  "window" W as an EMA with weight 1/W, hence `baseline_beta: 0.8` = 1 - 1/5.
  `baseline: window` instead uses the plain mean of the last `baseline_window`
  losses, `baseline: loo` the leave-one-out mean of the other masks' losses on the
  *same* batch (needs samples_per_step >= 2; [departure] the default, see Steps: it
  removes the variance that comes from the calibration batch's difficulty, which
  a moving average over different batches cannot). With samples_per_step K > 1
  the K per-mask gradients are averaged ([lineage] samples K = 2 masks per batch;
  the paper's equations show one).
  A step whose loss is NaN/inf (e.g. fp16 overflow) is skipped ([lineage]).
  [choice] A stepped value is clamped to [-64, 65] before the projection (only
  so that float16 storage stays finite after a rare-event step of size
  ~ lr * adv / s; it changes the projection only if |tau| * cost > 63), and a
  0/0 gradient (grad_eps = 0 at s in {0, 1}) counts as 0.

Projection. [paper] "projecting s back onto the budget" after every step. This
module uses the exact Euclidean projection onto {0 <= s <= 1, sum cost*s = B}:
by the KKT conditions s_k <- clip(s_k - tau * cost_k, 0, 1) with one scalar tau,
found by safeguarded Newton/bisection on the piecewise-linear, monotone
g(tau) = sum cost * clip(s - tau cost, 0, 1) in float64 (Newton steps use the
exact slope -sum_{0<s<1} cost^2; bisection is the fallback), to |g - B| <= 1e-9 B.
[choice] The paper does not spell out the cost weighting of the projection; the
Euclidean projection is the only one consistent with its constraint. Note what it
implies: a component (cost m+n ~ 10^3) absorbs a budget correction (m+n)^2 times
more strongly than an entry. [lineage] projects with a uniform shift (all costs
equal there). Variables clipped to exactly 0 or 1 have zero gradient from then
on (as in the lineage code).

Initial probabilities. Not stated in the sources [choice]; s = sigmoid((ln score
- c) / init_temperature) with c found by bisection so that sum cost*s = B, then the
projection. T = 0.25 by default: samples differ from the top-score masks mostly
near each block's boundary, which is where the allocation is decided.
  `init: activation` (default): score = squared output error a candidate removes
    per parameter it costs on the calibration inputs of the dense model,
    sigma_k^2 v_k^T H v_k / (m+n) and S_ij^2 H_jj (H = X^T X / tokens); [lineage]
    also starts from an activation (Wanda) metric. With `init_scale: matrix`
    (default) each score is divided by its matrix's total, so scores are shares of
    that matrix's output energy: comparable across layers, whose raw activation
    energies differ by orders of magnitude. Measured (H200, no learning): matrix
    scaling 9601 / 3490 / 1206 at density 0.4 / 0.5 / 0.6, raw (`init_scale:
    global`) 16199 / 34029 / 11938, uniform allocation 25219 / 9203 / 3414.
  `init: magnitude`: sigma_k^2/(m+n) for a component and mean(v^2) over a
    variable's entries for S (Frobenius error removed per parameter). With no
    steps the final masks are exactly the global greedy "most energy per parameter
    first" allocation.
  `init: uniform`: s = B / capacity everywhere (already feasible).

Steps. [paper] 128 C4 calibration sequences (the pipeline's `calibration`
config sets the number and length), lr 0.05 (policy entry; the tied policy's
`logit_lr` is in its own units), "three iterations" [choice: read as 3 epochs
over the calibration set]. [departure] defaults `samples_per_step: 2` with
`baseline: loo` ([lineage] draws 2 masks per batch): the two masks see the same
batch, so its difficulty cancels from the advantage; the paper's moving average
(`baseline: ema`) keeps it, and it dwarfs the effect of a mask. [choice] `batch_size: 1` calibration
sequence per step, so 128 x 3 = 384 steps with the paper's data; the order of
sequences is a seeded permutation per epoch. `max_steps > 0` caps the steps.

Final masks. [paper] s is the importance score; the highest-probability
candidates are kept "top-K" until the budget. Here: all candidates ordered by s
(descending; ties -- e.g. the many s clipped to exactly 0 or 1 -- broken by the
init score, then by position), taken in that order whenever their cost still
fits in what is left of B (skip-and-continue greedy, so that cheap entries fill
the gap a component left: the kept parameters never exceed B and, in the spaces
with entries, meet it exactly when enough entries remain). [choice] The
selection is exact and memory-light: a 64-bit key (float bits of s, then of the
score) and bisection on the key threshold, no global sort.

Determinism. Every mask is drawn from a torch.Generator on `device`, seeded from
(seed, step, sample, block) by a hash, so masks are regenerated exactly in the
update instead of being stored, and the calibration order comes from a seeded
CPU generator: the same seed gives bit-identical masks on the CPU.

Forward passes (no backward, torch.no_grad)
-------------------------------------------
The Hugging Face model is loaded once; the dense weights of the target matrices
are freed. A forward pre-hook on every decoder layer materialises that layer's
seven W~ for the current mask sample, W~ = (U * (m * sigma)) V^T, then
index_add of (n * S_values) at S_index, in float32 and cast to the model dtype;
a forward hook frees them again. [choice] Materialising W~ per step beats the
factored form y = ((x V) * (m sigma)) U^T + x (n*S)^T here: a calibration step
runs T = batch x seqlen (>= 2048) tokens through each matrix, so the factored
form costs T (m+n) r + a sparse product with ~60-75% density (sparse kernels are
slower than dense ones at that density), while forming W~ costs m n r once per
step and the product is then one dense GEMM; for SmolLM2-135M the 210 W~ of one
step are ~60 GFLOP, a few ms on a GPU.

Memory and `offload`. Resident (default): factors (U, sigma, V, S values in the
checkpoint dtype, S indices as int32 when m*n < 2^31) and all probabilities on
`device`; dense target weights exist only for the layer being run. With
`offload: true` the factors stay in (pinned) CPU memory and only the running
layer's factors are copied to the device, inside the same pre-hook: the forward
is still layer by layer over the calibration batch, with one decoder layer's
factors on the device at a time. The probabilities always stay on the device
(every projection step reads all of them); `prob_dtype: float16` halves them for
`policy: entry`; the tied policy keeps one float32 logit per candidate instead.
For a 7B Llama (6.5e9 target parameters, ~65% of them S entries): 4.3e9
probabilities = 17 GB float32 (8.6 GB float16); resident factors add ~9 GB of S
values (bf16) + 17 GB of int32 indices + U, V; non-target weights ~1 GB. So 7B
fits one 80 GB GPU resident with `dtype: bfloat16` and on any 40 GB GPU with
`offload: true` (+ `prob_dtype: float16` below that). `sparse_group_size` is the
further lever: G = 8 divides the probability memory by 8.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
from tqdm import tqdm

from .. import allocate as _alloc
from ..errors import GlrsError
from .candidates import (_Engine, _load_model, _read_factors, _Reconstruction, activation_block_scores, block_scores,
                         build_blocks, matrices, read_reconstruction_targets, space_budget)
from .policy import BernoulliPolicy, TiedPolicy

CAP_VERSION = 5  # 5: offset_scale 0.5 by default (glrs/cap/budget.py)


# Config `allocator_params.<cap|lowrank-only|sparse-only>`: every key, its default and meaning.
ALLOC_PARAMS_DEFAULTS: dict = {
    "policy": "budget",        # budget ([departure], glrs/cap/budget.py: per-matrix budgets; space cap only) |
                               # tied ([departure], see TiedPolicy) | entry (the paper: one free probability per candidate)
    "sigma": 0.2,              # policy budget: std of a sample's log-budget perturbation
    "budget_lr": 0.05,         # policy budget: step of theta per normalised advantage (log-budget units)
    "max_shift": 0.7,          # policy budget: |theta| <= max_shift (a matrix keeps 1/2..2x the uniform budget)
    "tie": "layer+type",       # policy budget: offset = its layer's + its kind's (q..down) | one per matrix | per layer
    "pairs_per_step": 4,       # policy budget: mirrored pairs per step, each on its own calibration batch
    "offset_scale": 0.5,       # policy budget: the learned offsets are multiplied by this for the final budgets
                               # (< 1 pulls the allocation towards uniform; 0.5 measured best: glrs/cap/budget.py)
    "lr": 0.05,                # [paper] policy entry: step size of s <- s - lr (L - delta) grad log p
    "logit_lr": 0.1,           # policy tied: step size of the per-block logit offsets theta
    "epochs": 3,               # [paper "three iterations"] passes over the calibration sequences; 0 = init only
    "batch_size": 1,           # [choice] calibration sequences per policy-gradient step
    "samples_per_step": 2,     # [lineage] masks drawn (forward passes) per step; gradients averaged
    "baseline": "loo",         # loo (leave-one-out over the step's masks) | ema (the paper) | window
    "baseline_beta": 0.8,      # [paper "window 5" -> 1 - 1/5] EMA weight of the old baseline
    "baseline_window": 5,      # losses averaged by baseline: window
    "grad_eps": 1.0e-6,        # eps in (m - s) / (s (1 - s) + eps)
    "init": "activation",      # activation | magnitude | uniform: the importance score behind the initial s
    "init_scale": "matrix",    # matrix: scores as shares of their matrix's total | global: raw output energies
    "init_temperature": 0.25,  # s = sigmoid((ln score - c) / T); small T: masks sampled near each block's boundary
    "sparse_group_size": 1,    # sparse entries per Bernoulli variable (1 = per entry, the paper)
    "max_steps": 0,            # cap on steps (0: epochs * ceil(nsamples / batch_size))
    "offload": False,          # keep factors (policy budget: weights, ranks) on the CPU, one layer's on the device
    "dtype": "float32",        # model compute dtype: float32 | bfloat16 | float16
    "prob_dtype": "float32",   # storage of the probabilities: float32 | float16
}


# Settings added after allocation keys existed: accepted, but left out of the resolved (hashed, recorded)
# parameters while at their default, so that the keys of runs that do not set them stay (as
# glrs.methods.effective_params does for the baselines).
OPTIONAL: dict = {
    "loss": "cross-entropy",   # policies entry | tied: what a mask sample is scored by. cross-entropy: the model's
                               # next-token loss on the step's calibration batch ([choice], the default);
                               # reconstruction: the mean relative output error of the target matrices on the
                               # dense model's calibration inputs (the paper as issue 24 reads it; _Reconstruction)
}
LOSSES = ("cross-entropy", "reconstruction")


def _is_int(x, lo: int) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer() and x >= lo


def keeps_prefixes(allocator: str, params: dict) -> bool:
    """Whether the allocation keeps a prefix of every matrix's candidates (its top components and largest
    entries): every allocator but CAP's per-candidate policies. Its per-matrix counts (the .json) then
    say everything, and no keep-masks need be written."""
    if allocator in _alloc.NEEDS_CALIBRATION:
        return resolve_params(params, allocator)["policy"] == "budget"
    return True


def resolve_params(params: dict | None, space: str = "cap") -> dict:
    """Defaults merged with the given params, validated; unknown keys are an error. The spaces that
    restrict Stage 2 to one kind of candidate (lowrank-only, sparse-only) default to the tied policy:
    the budget policy decides per-matrix totals, which those ablations are not about."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(ALLOC_PARAMS_DEFAULTS) - set(OPTIONAL))
    if unknown:
        raise GlrsError(f"unknown CAP allocator parameter(s) {unknown}; valid: "
                        f"{', '.join([*ALLOC_PARAMS_DEFAULTS, *OPTIONAL])}")
    p = {**ALLOC_PARAMS_DEFAULTS, **OPTIONAL, **({"policy": "tied"} if space != "cap" else {}), **params}

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    checks = [
        (number(p["lr"]) and p["lr"] > 0, "lr must be a number > 0"),
        (_is_int(p["epochs"], 0), "epochs must be an integer >= 0"),
        (_is_int(p["batch_size"], 1), "batch_size must be an integer >= 1"),
        (_is_int(p["samples_per_step"], 1), "samples_per_step must be an integer >= 1"),
        (p["baseline"] in ("ema", "window", "loo"), "baseline must be ema, window or loo"),
        (p["baseline"] != "loo" or (_is_int(p["samples_per_step"], 2)), "baseline loo needs samples_per_step >= 2"),
        (number(p["baseline_beta"]) and 0 <= p["baseline_beta"] < 1, "baseline_beta must be in [0, 1)"),
        (_is_int(p["baseline_window"], 1), "baseline_window must be an integer >= 1"),
        (number(p["grad_eps"]) and p["grad_eps"] >= 0, "grad_eps must be a number >= 0"),
        (p["policy"] in ("budget", "tied", "entry"), "policy must be budget, tied or entry"),
        (p["policy"] != "budget" or space == "cap", f"policy budget works in space cap only, not {space}: use tied"),
        (number(p["sigma"]) and p["sigma"] > 0, "sigma must be a number > 0"),
        (number(p["budget_lr"]) and p["budget_lr"] > 0, "budget_lr must be a number > 0"),
        (number(p["max_shift"]) and p["max_shift"] > 0, "max_shift must be a number > 0"),
        (p["tie"] in ("matrix", "layer", "layer+type"), "tie must be matrix, layer or layer+type"),
        (_is_int(p["pairs_per_step"], 1), "pairs_per_step must be an integer >= 1"),
        (number(p["offset_scale"]) and p["offset_scale"] >= 0, "offset_scale must be a number >= 0"),
        (number(p["logit_lr"]) and p["logit_lr"] > 0, "logit_lr must be a number > 0"),
        (p["init"] in ("activation", "magnitude", "uniform"), "init must be activation, magnitude or uniform"),
        (p["init_scale"] in ("matrix", "global"), "init_scale must be matrix or global"),
        (number(p["init_temperature"]) and p["init_temperature"] > 0, "init_temperature must be a number > 0"),
        (_is_int(p["sparse_group_size"], 1), "sparse_group_size must be an integer >= 1"),
        (_is_int(p["max_steps"], 0), "max_steps must be an integer >= 0"),
        (isinstance(p["offload"], bool), "offload must be true or false"),
        (p["dtype"] in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16"),
        (p["prob_dtype"] in ("float32", "float16"), "prob_dtype must be float32 or float16"),
        (p["loss"] in LOSSES, f"loss must be one of {', '.join(LOSSES)}"),
        (p["loss"] == "cross-entropy" or p["policy"] != "budget",
         "loss reconstruction scores Stage-1 candidates: use it with policy entry or tied (the budget policy "
         "scores budgets by its own surrogate)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise GlrsError(f"allocator_params for CAP: {msg} (got {params})")
    for k in ("epochs", "batch_size", "samples_per_step", "pairs_per_step", "baseline_window", "sparse_group_size", "max_steps"):
        p[k] = int(p[k])
    return {k: v for k, v in p.items() if not (k in OPTIONAL and v == OPTIONAL[k])}


def loss_of(p: dict) -> str:
    """The loss a resolved parameter set asks for (absent: the default)."""
    return p.get("loss", OPTIONAL["loss"])



# ---- the allocator -------------------------------------------------------------------------------------

def allocate_with_info(pools, density, params, seed, model_dir, stage1, calib_ids, space="cap", device="cpu",
                       stats_files=None):
    """CAP Stage 2 over `space` ("cap" | "lowrank-only" | "sparse-only"), see the module docstring: (the
    allocation, a dict of what happened: steps, losses, baselines, expected density). `stage1`: where the
    pools' factors are read from (a glrs.stage1.Stage1, or the decompose files)."""
    p = resolve_params(params, space)
    if p["policy"] == "budget":
        return _allocate_budgets(pools, density, p, seed, model_dir, calib_ids, torch.device(device), stats_files)
    if not pools:
        raise GlrsError("CAP got no matrices: the RPCA files list no target matrix; rerun the decompose stage")
    budget = space_budget(pools, density, space)
    dev = torch.device(device)
    blocks = build_blocks(pools, space, p["sparse_group_size"])
    dense = sum(q.dense for q in pools)
    nseq = 0 if calib_ids is None else int(calib_ids.shape[0])
    per_epoch = math.ceil(nseq / p["batch_size"]) if nseq else 0
    steps = p["epochs"] * per_epoch
    if p["max_steps"]:
        steps = min(steps, p["max_steps"])
    if p["epochs"] and not steps:
        raise GlrsError("CAP needs calibration sequences (calib_ids is empty); run the calibrate stage or set epochs: 0")
    needs_model = steps > 0 or p["init"] == "activation"
    if needs_model:
        if calib_ids is None or calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
            shape = None if calib_ids is None else tuple(calib_ids.shape)
            raise GlrsError(f"calibration ids must be [nsamples, seqlen >= 2], got {shape}; run the calibrate stage, "
                            "or use init: magnitude with epochs: 0")
        if model_dir is None:
            raise GlrsError("CAP needs the prepared model directory for its forward passes (model_dir is None)")
        if steps and loss_of(p) == "reconstruction" and not stats_files:
            raise GlrsError("CAP's loss reconstruction needs the activations job's files (--stats)")
        factors = _read_factors(stage1, pools, space, dev, p["offload"])

    Policy, lr = (TiedPolicy, p["logit_lr"]) if p["policy"] == "tied" else (BernoulliPolicy, p["lr"])
    policy = Policy(
        [b.nvar for b in blocks], [b.cost for b in blocks], budget, seed=seed, device=device, lr=lr,
        grad_eps=p["grad_eps"], baseline=p["baseline"], baseline_beta=p["baseline_beta"],
        baseline_window=p["baseline_window"], samples_per_step=p["samples_per_step"],
        prob_dtype=getattr(torch, p["prob_dtype"]),
    )
    if p["init"] == "activation":
        scores = activation_block_scores(model_dir, calib_ids, pools, blocks, factors, dev,
                                         per_matrix=p["init_scale"] == "matrix")
    else:
        scores = block_scores(pools, blocks)
    if p["init"] == "uniform":
        policy.init_uniform()
    else:
        policy.init_from_scores(scores, p["init_temperature"])

    info = {"space": space, "budget": budget, "steps": steps, "params": p, "cap_version": CAP_VERSION,
            "losses": [], "baselines": [], "skipped_steps": 0}

    if steps:
        if loss_of(p) == "reconstruction":
            dense_w, H = read_reconstruction_targets(model_dir, stats_files, pools, dev, p["offload"])
            model, modules = None, None
            engine = _Reconstruction(matrices(pools, None, factors, blocks), blocks, dense_w, H, dev)
            del dense_w, H
        else:
            dtype = getattr(torch, p["dtype"])
            model, modules = _load_model(model_dir, factors, dev, dtype)
            engine = _Engine(model, matrices(pools, modules, factors, blocks), blocks, dev, dtype)
        order_gen = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(p["epochs"]):
            perm = torch.randperm(nseq, generator=order_gen)
            batches += [perm[i : i + p["batch_size"]] for i in range(0, nseq, p["batch_size"])]
        bar = tqdm(total=steps, desc=f"cap[{space}]", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        try:
            for t in range(steps):
                ids = calib_ids[batches[t]]
                res = policy.step(lambda smp: engine.loss(ids, smp))
                info["losses"].append(res.losses)
                info["baselines"].append(res.baseline)
                info["skipped_steps"] += int(res.skipped)
                bar.set_postfix(loss=f"{sum(res.losses) / len(res.losses):.4f}", base=f"{res.baseline:.4f}",
                                E_density=f"{policy.expected_cost() / dense:.5f}", refresh=False)
                bar.update(1)
        finally:
            bar.close()
            engine.close()
        del engine, model, modules
    if needs_model:
        del factors
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    info["expected_density"] = policy.expected_cost() / dense
    chosen = policy.select(scores)
    rank_keep, sparse_keep = {}, {}
    for q in pools:
        rank_keep[q.name] = torch.zeros(q.sigma.numel(), dtype=torch.bool)
        sparse_keep[q.name] = torch.zeros(q.s_abs.numel(), dtype=torch.bool)
    for blk, keep in zip(blocks, chosen):
        q = pools[blk.matrix]
        keep = keep.cpu()
        if blk.kind == "rank":
            rank_keep[q.name][blk.start : blk.start + blk.nvar] = keep
        else:
            sparse_keep[q.name][blk.start : blk.start + blk.nvar * blk.group] = keep.repeat_interleave(blk.group)
    alloc = _alloc.Allocation(rank_keep, sparse_keep)
    kept = alloc.params_kept(pools)
    info["params_kept"] = kept
    info["achieved_density"] = kept / dense
    print(f"cap[{space}]: {steps} steps ({info['skipped_steps']} skipped), budget {budget}, kept {kept} "
          f"(density {kept / dense:.6f}, target {density})", file=sys.stderr)
    return alloc, info


def _allocate_budgets(pools, density, p, seed, model_dir, calib_ids, dev, stats_files):
    """`policy: budget`: learn per-matrix budgets (glrs/cap/budget.py), then keep in each matrix its
    top Stage-1 candidates worth its budget (half to components where it has any), so that the
    allocation files keep their contract; the realisation reads only the per-matrix totals."""
    from .. import stats
    from .budget import learn_budgets

    if not pools:
        raise GlrsError("CAP got no matrices: the RPCA files list no target matrix; rerun the decompose stage")
    budget = space_budget(pools, density, "cap")
    if calib_ids is None or calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
        raise GlrsError("CAP's budget policy needs calibration ids [nsamples, seqlen >= 2]; run the calibrate stage")
    if model_dir is None or not stats_files:
        raise GlrsError("CAP's budget policy needs the prepared model (--model-dir) and the activations job's "
                        "files (--stats)")
    layers = sorted({q.layer for q in pools})
    if len(stats_files) != len(layers):
        raise GlrsError(f"CAP: {len(stats_files)} activation-statistics files for {len(layers)} layers")
    diag_of = {}  # only H's diagonals are read (every layer's H is ~1.6 GB in float64 at 8B)
    for layer, path in zip(layers, stats_files):
        diag_of[layer] = {short: d.float() for short, d in stats.read_diagonals(path).items()}
    H_diag = [diag_of[q.layer][q.short] for q in pools]
    budgets, info = learn_budgets([q.name for q in pools], [q.layer for q in pools], [q.shape for q in pools],
                                  budget, p, seed, model_dir, calib_ids, H_diag, dev)
    budget_of = dict(zip((q.name for q in pools), budgets))
    alloc = _alloc.matrix_prefixes(pools, lambda q: budget_of[q.name], 0.5)
    dense = sum(q.dense for q in pools)
    info |= {"space": "cap", "budget": budget, "params": p, "cap_version": CAP_VERSION,
             "learned_budgets": budget_of}
    kept = alloc.params_kept(pools)
    info["params_kept"], info["achieved_density"] = kept, kept / dense
    print(f"cap[budget]: {info['steps']} steps, budget {budget}, kept {kept} (density {kept / dense:.6f}, "
          f"target {density}); surrogate loss {info.get('surrogate_loss_uniform', float('nan')):.4f} at the uniform "
          f"allocation -> {info.get('surrogate_loss_learned', float('nan')):.4f} learned", file=sys.stderr)
    return alloc, info
