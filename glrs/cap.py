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
matrices of layer 12; README, "Where glrs departs from the papers"). `realise.mode: select` materialises the kept candidates (the paper).

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
0 <= s <= 1. L is the calibration loss: [choice] the mean next-token
cross-entropy of the whole model on a batch of calibration sequences (the
paper's objective is "the loss on the calibration set"; it is evaluated with
forward passes only).

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

import hashlib
import json
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from . import allocate as _alloc
from .errors import GlrsError

CAP_VERSION = 2
SPACES = ("cap", "lowrank-only", "sparse-only")

# Config `allocator_params.<cap|lowrank-only|sparse-only>`: every key, its default and meaning.
ALLOC_PARAMS_DEFAULTS: dict = {
    "policy": "tied",          # tied ([departure], see TiedPolicy) | entry (the paper: one free probability per candidate)
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
    "offload": False,          # keep factors on the CPU, copy one decoder layer's at a time
    "dtype": "float32",        # model compute dtype: float32 | bfloat16 | float16
    "prob_dtype": "float32",   # storage of the probabilities: float32 | float16
}

_CHUNK = 1 << 25  # elements per float64 temporary in reductions
_OUT = 64.0  # a stepped probability is kept within [-64, 65] before the projection (float16 stays finite)


def _is_int(x, lo: int) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer() and x >= lo


def resolve_params(params: dict | None) -> dict:
    """Defaults merged with the given params, validated; unknown keys are an error."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(ALLOC_PARAMS_DEFAULTS))
    if unknown:
        raise GlrsError(f"unknown CAP allocator parameter(s) {unknown}; valid: {', '.join(ALLOC_PARAMS_DEFAULTS)}")
    p = {**ALLOC_PARAMS_DEFAULTS, **params}

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
        (p["policy"] in ("tied", "entry"), "policy must be tied or entry"),
        (number(p["logit_lr"]) and p["logit_lr"] > 0, "logit_lr must be a number > 0"),
        (p["init"] in ("activation", "magnitude", "uniform"), "init must be activation, magnitude or uniform"),
        (p["init_scale"] in ("matrix", "global"), "init_scale must be matrix or global"),
        (number(p["init_temperature"]) and p["init_temperature"] > 0, "init_temperature must be a number > 0"),
        (_is_int(p["sparse_group_size"], 1), "sparse_group_size must be an integer >= 1"),
        (_is_int(p["max_steps"], 0), "max_steps must be an integer >= 0"),
        (isinstance(p["offload"], bool), "offload must be true or false"),
        (p["dtype"] in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16"),
        (p["prob_dtype"] in ("float32", "float16"), "prob_dtype must be float32 or float16"),
    ]
    for ok, msg in checks:
        if not ok:
            raise GlrsError(f"allocator_params for CAP: {msg} (got {params})")
    for k in ("epochs", "batch_size", "samples_per_step", "baseline_window", "sparse_group_size", "max_steps"):
        p[k] = int(p[k])
    return p


# ---- budget projection and final selection (pure functions, any device) ----------------------------

def _chunks(t: torch.Tensor):
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i : i + _CHUNK]


def _g_and_slope(values: Sequence[torch.Tensor], costs: Sequence[float], tau: float) -> tuple[float, float]:
    """sum cost * clip(v - tau cost, 0, 1) and sum over the interior of cost^2, in float64."""
    tot, slope = [], []
    for v, c in zip(values, costs):
        for ch in _chunks(v):
            x = ch.double() - tau * c
            tot.append(x.clamp(0, 1).sum() * c)
            slope.append(((x > 0) & (x < 1)).sum().double() * (c * c))
    if not tot:
        return 0.0, 0.0
    both = torch.stack([torch.stack(tot).sum(), torch.stack(slope).sum()]).tolist()
    return both[0], both[1]


@torch.no_grad()
def project_budget(values: Sequence[torch.Tensor], costs: Sequence[float], budget: float,
                   *, rtol: float = 1e-9, max_iter: int = 300) -> float:
    """Euclidean projection, in place, onto {0 <= v <= 1, sum_i cost_i * sum(v_i) = budget}.

    values[i] is a tensor of variables that all cost costs[i]. The solution is
    v <- clip(v - tau * cost, 0, 1); tau is returned (+inf/-inf when the budget is
    0 / the whole capacity)."""
    costs = [float(c) for c in costs]
    if any(c <= 0 for c in costs):
        raise ValueError("costs must be positive")
    capacity = sum(c * v.numel() for v, c in zip(values, costs))
    if budget < 0 or budget > capacity * (1 + 1e-12):
        raise ValueError(f"budget {budget} outside [0, {capacity}]")
    if budget <= 0:
        for v in values:
            v.zero_()
        return math.inf
    if budget >= capacity:
        for v in values:
            v.fill_(1)
        return -math.inf
    nonempty = [(v, c) for v, c in zip(values, costs) if v.numel()]
    lo = min((float(v.min()) - 1.0) / c for v, c in nonempty)  # g(lo) = capacity > budget
    hi = max(float(v.max()) / c for v, c in nonempty)          # g(hi) = 0 < budget
    tau = 0.0 if lo < 0.0 < hi else 0.5 * (lo + hi)
    for _ in range(max_iter):
        g, slope = _g_and_slope(values, costs, tau)
        f = g - budget
        if abs(f) <= rtol * budget:
            break
        if f > 0:
            lo = tau
        else:
            hi = tau
        nxt = tau + f / slope if slope > 0 else None  # Newton on the current linear piece
        if nxt is None or not (lo < nxt < hi):
            nxt = 0.5 * (lo + hi)
        if nxt == tau:
            break
        tau = nxt
    for v, c in zip(values, costs):
        for ch in _chunks(v):
            ch.copy_((ch.double() - tau * c).clamp(0, 1))
    return tau


def selection_keys(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering candidates by probability, then by score (both >= 0)."""
    s = probs.float().clamp(0, 1) + 0.0  # + 0.0 turns -0.0 into +0.0 (its sign bit would break the order)
    sc = scores.float().clamp_min(0) + 0.0
    return (s.view(torch.int32).long() << 32) | sc.view(torch.int32).long()


@torch.no_grad()
def greedy_select(keys: Sequence[torch.Tensor], costs: Sequence[int], budget: int) -> list[torch.Tensor]:
    """Walk all candidates by key, highest first (ties: list order, then position), and keep
    each one whose cost still fits in the remaining budget.

    keys[i] holds the candidates that cost costs[i] each. Equivalent to the sequential
    loop but done with thresholds: each round keeps the longest prefix (in key order) of
    the candidates that can still fit, then the tied group at its boundary one by one;
    every round removes the boundary from play, so few rounds are needed."""
    costs = [int(c) for c in costs]
    chosen = [torch.zeros(k.shape, dtype=torch.bool, device=k.device) for k in keys]
    rem = int(budget)

    while rem > 0:
        live = [i for i, c in enumerate(costs) if c <= rem and keys[i].numel()]

        def cost_ge(t: int) -> int:
            counts = [torch.count_nonzero((keys[i] >= t) & ~chosen[i]) * costs[i] for i in live]
            return int(torch.stack(counts).sum()) if counts else 0

        total = cost_ge(0)
        if total == 0:
            break
        if total <= rem:
            for i in live:
                chosen[i] |= True
            rem -= total
            break
        maxkey = max(int(torch.where(chosen[i], -1, keys[i]).max()) for i in live)
        lo, hi = 0, maxkey + 1  # cost_ge(lo) > rem >= cost_ge(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost_ge(mid) <= rem:
                hi = mid
            else:
                lo = mid
        taken = cost_ge(hi)
        for i in live:
            chosen[i] |= keys[i] >= hi
        rem -= taken
        for i in live:  # the tied group at key lo: in list and position order while it fits
            if costs[i] > rem:
                continue
            idx = torch.nonzero((keys[i] == lo) & ~chosen[i]).reshape(-1)
            take = min(idx.numel(), rem // costs[i])
            if take:
                chosen[i][idx[:take]] = True
                rem -= take * costs[i]
    return chosen


def reinforce_grad(mask: torch.Tensor, probs: torch.Tensor, advantage, eps: float) -> torch.Tensor:
    """(L - delta) * d log p(mask | s) / ds = advantage * (m - s) / (s (1 - s) + eps)."""
    s = probs.float()
    return advantage * (mask.float() - s) / (s * (1 - s) + eps)


# ---- the policy: Bernoulli variables in blocks of equal cost ---------------------------------------

def _stream_seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MaskSample:
    """One draw of all keep-masks; block b's mask is regenerated on demand from its own seed."""

    def __init__(self, policy: "BernoulliPolicy", step: int, k: int):
        self.policy, self.step, self.k = policy, step, k

    def mask(self, b: int) -> torch.Tensor:
        pol = self.policy
        pol._gen.manual_seed(_stream_seed(pol.seed, self.step, self.k, b))
        s = pol.probs(b)
        return torch.rand(s.shape, generator=pol._gen, device=pol.device, dtype=torch.float32) < s


@dataclass
class StepResult:
    losses: list[float]
    baseline: float
    skipped: bool


class BernoulliPolicy:
    """Keep-probabilities of all candidates, the REINFORCE step and the budget projection.

    Block b has `sizes[b]` variables that cost `costs[b]` parameters each. All
    probabilities live in one flat tensor, laid out by cost class, so that the
    projection runs over a handful of large slices."""

    def __init__(self, sizes: Sequence[int], costs: Sequence[int], budget: int, *, seed: int, device: str = "cpu",
                 lr: float = 0.05, grad_eps: float = 1e-6, baseline: str = "ema", baseline_beta: float = 0.8,
                 baseline_window: int = 5, samples_per_step: int = 1, prob_dtype: torch.dtype = torch.float32):
        if len(sizes) != len(costs):
            raise ValueError("sizes and costs differ in length")
        self.sizes, self.costs = [int(n) for n in sizes], [int(c) for c in costs]
        self.budget, self.seed, self.device = int(budget), int(seed), torch.device(device)
        self.lr, self.grad_eps = float(lr), float(grad_eps)
        self.baseline_kind, self.beta = baseline, float(baseline_beta)
        self.samples_per_step = int(samples_per_step)
        if baseline == "loo" and self.samples_per_step < 2:
            raise ValueError("baseline loo needs samples_per_step >= 2")
        self.capacity = sum(n * c for n, c in zip(self.sizes, self.costs))
        if not 0 <= self.budget <= self.capacity:
            raise ValueError(f"budget {budget} outside [0, {self.capacity}]")
        order = sorted(range(len(self.sizes)), key=lambda b: (self.costs[b], b))
        self.offsets = [0] * len(self.sizes)
        self.classes: list[tuple[int, int, int]] = []  # (cost, start, stop) in the flat layout
        pos = 0
        for b in order:
            self.offsets[b] = pos
            if self.classes and self.classes[-1][0] == self.costs[b]:
                self.classes[-1] = (self.costs[b], self.classes[-1][1], pos + self.sizes[b])
            else:
                self.classes.append((self.costs[b], pos, pos + self.sizes[b]))
            pos += self.sizes[b]
        self.flat = torch.full((pos,), self.budget / max(self.capacity, 1), dtype=prob_dtype, device=self.device)
        self._gen = torch.Generator(device=self.device)
        self.t = 0
        self.delta: float | None = None
        self._window: deque = deque(maxlen=int(baseline_window))
        self.last_tau = 0.0

    # views
    def probs(self, b: int) -> torch.Tensor:
        return self.flat[self.offsets[b] : self.offsets[b] + self.sizes[b]]

    def _class_views(self, flat: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[int]]:
        flat = self.flat if flat is None else flat
        return [flat[a:z] for _, a, z in self.classes], [c for c, _, _ in self.classes]

    def expected_cost(self) -> float:
        views, costs = self._class_views()
        return _g_and_slope(views, costs, 0.0)[0] if views else 0.0

    def project(self) -> float:
        views, costs = self._class_views()
        self.last_tau = project_budget(views, costs, self.budget) if views else 0.0
        return self.last_tau

    # initialisation
    def set_probs(self, probs: Sequence[torch.Tensor], project: bool = True) -> None:
        for b, p in enumerate(probs):
            self.probs(b).copy_(p.reshape(-1))
        if project:
            self.project()

    def init_uniform(self) -> None:
        self.flat.fill_(self.budget / max(self.capacity, 1))
        self.project()

    def init_from_scores(self, score_of: Callable[[int], torch.Tensor], temperature: float = 1.0) -> None:
        """s = sigmoid((ln score - c) / T) with c set by bisection so that sum cost*s = budget."""
        z = torch.empty(self.flat.shape, dtype=torch.float32, device=self.device)
        for b in range(len(self.sizes)):
            sc = score_of(b).double().clamp_min(1e-300)
            z[self.offsets[b] : self.offsets[b] + self.sizes[b]] = (sc.log() / temperature).float().to(self.device)
        views, costs = self._class_views(z)

        def expected(c: float) -> float:
            tot = [torch.sigmoid(ch.double() - c).sum() * cost for v, cost in zip(views, costs) for ch in _chunks(v)]
            return float(torch.stack(tot).sum()) if tot else 0.0

        if z.numel() and 0 < self.budget < self.capacity:
            lo, hi = float(z.min()) - 50.0, float(z.max()) + 50.0
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if expected(mid) > self.budget:
                    lo = mid
                else:
                    hi = mid
                if hi - lo <= 1e-12 * max(1.0, abs(mid)):
                    break
            c = 0.5 * (lo + hi)
            for ch, out in zip(_chunks(z), _chunks(self.flat)):
                out.copy_(torch.sigmoid(ch.double() - c))
        del z
        self.project()

    # the policy-gradient step
    def sample(self, step: int, k: int) -> MaskSample:
        return MaskSample(self, step, k)

    def _advantages(self, losses: list[float]) -> tuple[list[float], float]:
        mean = sum(losses) / len(losses)
        if self.baseline_kind == "loo":
            K = len(losses)
            return [l - (K * mean - l) / (K - 1) for l in losses], mean
        if self.baseline_kind == "window":
            self._window.append(mean)
            delta = sum(self._window) / len(self._window)
        else:
            delta = mean if self.delta is None else self.beta * self.delta + (1 - self.beta) * mean
        self.delta = delta
        return [l - delta for l in losses], delta

    @torch.no_grad()
    def step(self, loss_fn: Callable[[MaskSample], float]) -> StepResult:
        """Draw samples_per_step masks, evaluate them, take one REINFORCE step and project."""
        t = self.t
        self.t += 1
        samples = [self.sample(t, k) for k in range(self.samples_per_step)]
        losses = [float(loss_fn(smp)) for smp in samples]
        if not all(math.isfinite(l) for l in losses):
            return StepResult(losses, float("nan") if self.delta is None else self.delta, True)
        adv, delta = self._advantages(losses)
        if any(a != 0.0 for a in adv):
            self._update(samples, adv)
        self.project()
        return StepResult(losses, delta, False)

    def _update(self, samples: list[MaskSample], adv: list[float]) -> None:
        """s <- s - lr * mean_k adv_k (m_k - s) / (s (1 - s) + eps), per variable."""
        K = len(samples)
        for b in range(len(self.sizes)):
            s = self.probs(b)
            s32 = s.float()
            num = torch.zeros_like(s32)
            for a, smp in zip(adv, samples):
                if a != 0.0:
                    num += a * (smp.mask(b).float() - s32)
            step_ = (self.lr / K) * torch.nan_to_num(num / (s32 * (1 - s32) + self.grad_eps), posinf=0.0, neginf=0.0)
            s.copy_((s32 - step_).clamp_(-_OUT, 1 + _OUT))

    # the final deterministic masks
    @torch.no_grad()
    def select(self, score_of: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        """Per block, bool keep-masks of the greedy-by-probability selection within the budget."""
        keys = torch.empty(self.flat.shape, dtype=torch.int64, device=self.device)
        for b in range(len(self.sizes)):
            sl = slice(self.offsets[b], self.offsets[b] + self.sizes[b])
            keys[sl] = selection_keys(self.flat[sl], score_of(b).to(self.device))
        views, costs = self._class_views(keys)
        chosen = torch.cat(greedy_select(views, costs, self.budget)) if views else torch.zeros(0, dtype=torch.bool)
        return [chosen[self.offsets[b] : self.offsets[b] + self.sizes[b]] for b in range(len(self.sizes))]


def logit_keys(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """int64 keys (>= 0) ordering candidates by logit (any sign), then by score (>= 0)."""
    bits = (logits.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 -> +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) + (1 << 31)  # IEEE order as unsigned 32 bits
    sc = scores.float().clamp_min(0) + 0.0
    return (ordered << 31) | sc.view(torch.int32).long()  # a non-negative float32 has 31 significant bits


class TiedPolicy(BernoulliPolicy):
    """[departure] Every candidate keeps its own Bernoulli variable, but its logit is tied:
    logit_i = z_i + theta_b - c, with z_i = ln(score_i) / T fixed at initialisation,
    one learned offset theta_b per block (a matrix's singular components, or its
    sparse entries) and one global shift c that holds the expected cost at the budget.

    Why: with one scalar loss per mask sample, REINFORCE cannot resolve ~10^7-10^9
    per-entry probabilities in a few hundred steps (each becomes a random walk and the
    final top-probability masks turn near-random: measured on SmolLM2, perplexity 2e7
    after training vs 8.9e3 at its own initialisation). Tying leaves REINFORCE a few
    hundred well-determined variables -- exactly the paper's question of how much rank
    and how many sparse entries each matrix of each layer keeps -- while the order of
    candidates inside a matrix is the initial importance order.

    Step: theta_b <- theta_b - lr * mean_k a_k * sum_i (m_ik - s_i) / sqrt(sum_i s_i (1 - s_i)),
    i.e. the REINFORCE gradient of theta_b (d log p / d theta_b = sum_i (m_i - s_i)) scaled
    by its Fisher information's square root, so one lr fits blocks of any size, and with the
    advantages a_k = adv_k / RMS(adv) normalised by their running RMS (EMA 0.9), so that lr is
    in logit units per step whatever the scale of the loss differences.
    Projection: c by bisection so that sum cost * s = budget (the tied policy's
    equivalent of projecting s onto the budget). Final masks: candidates by logit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flat = self.flat.float()  # the fixed logits z
        self.flat.zero_()
        self.theta = torch.zeros(len(self.sizes), dtype=torch.float64)
        self.shift = 0.0
        self.adv_sq: float | None = None  # running mean of advantage^2 (EMA 0.9): steps are in units of its RMS

    def probs(self, b: int) -> torch.Tensor:
        z = self.flat[self.offsets[b] : self.offsets[b] + self.sizes[b]]
        return torch.sigmoid(z + float(self.theta[b] - self.shift))

    def _expected(self, shift: float) -> tuple[float, float]:
        """Expected cost at shift c and its derivative -sum cost * s (1 - s), one pass in float64."""
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in range(len(self.sizes)):
            z = self.flat[self.offsets[b] : self.offsets[b] + self.sizes[b]]
            off = float(self.theta[b]) - shift
            for ch in _chunks(z):
                s = torch.sigmoid(ch.double() + off)
                tot += torch.stack([s.sum(), (s * (1 - s)).sum()]) * self.costs[b]
        g, slope = tot.tolist()
        return g, -slope

    def expected_cost(self) -> float:
        return self._expected(self.shift)[0]

    def project(self) -> float:
        """Shift c so that the expected cost equals the budget: Newton from the last c,
        safeguarded by bisection on a bracket (g is smooth and decreasing in c)."""
        if self.flat.numel() and 0 < self.budget < self.capacity:
            ext = [(float(v.min()), float(v.max())) for v in (self.probs_logits(b) for b in range(len(self.sizes)))
                   if v.numel()]
            lo, hi = min(e[0] for e in ext) - 60.0, max(e[1] for e in ext) + 60.0  # g(lo) > budget > g(hi)
            c = min(max(self.shift, lo), hi)
            for _ in range(200):
                g, slope = self._expected(c)
                if abs(g - self.budget) <= 1e-9 * self.budget:
                    break
                if g > self.budget:
                    lo = c
                else:
                    hi = c
                newton = c - (g - self.budget) / slope if slope < 0 else float("nan")
                c = newton if lo < newton < hi else 0.5 * (lo + hi)
                if hi - lo <= 1e-12:
                    break
            self.shift = c
        self.last_tau = self.shift
        return self.shift

    def probs_logits(self, b: int) -> torch.Tensor:
        """Block b's logits z + theta_b (before the global shift)."""
        return self.flat[self.offsets[b] : self.offsets[b] + self.sizes[b]] + float(self.theta[b])

    def set_probs(self, probs: Sequence[torch.Tensor], project: bool = True) -> None:
        raise NotImplementedError("a tied policy is set through its logits (init_from_scores)")

    def init_uniform(self) -> None:
        self.flat.zero_()
        self.theta.zero_()
        self.project()

    def init_from_scores(self, score_of: Callable[[int], torch.Tensor], temperature: float = 1.0) -> None:
        for b in range(len(self.sizes)):
            sc = score_of(b).double().clamp_min(1e-300)
            self.flat[self.offsets[b] : self.offsets[b] + self.sizes[b]] = (sc.log() / temperature).float().to(self.device)
        self.theta.zero_()
        self.project()

    def _update(self, samples: list[MaskSample], adv: list[float]) -> None:
        K = len(samples)
        mean_sq = sum(a * a for a in adv) / K
        self.adv_sq = mean_sq if self.adv_sq is None else 0.9 * self.adv_sq + 0.1 * mean_sq
        adv = [a / math.sqrt(self.adv_sq) for a in adv] if self.adv_sq > 0 else adv
        for b in range(len(self.sizes)):
            s = self.probs(b).double()
            fisher = float((s * (1 - s)).sum())
            if fisher <= 0.0:
                continue
            g = sum(a * float((smp.mask(b).double() - s).sum()) for a, smp in zip(adv, samples) if a != 0.0)
            self.theta[b] -= (self.lr / K) * g / math.sqrt(fisher)

    @torch.no_grad()
    def select(self, score_of: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        """Per block, bool keep-masks of the greedy-by-logit selection within the budget."""
        keys = torch.empty(self.flat.shape, dtype=torch.int64, device=self.device)
        for b in range(len(self.sizes)):
            sl = slice(self.offsets[b], self.offsets[b] + self.sizes[b])
            keys[sl] = logit_keys(self.probs_logits(b), score_of(b).to(self.device))
        views, costs = self._class_views(keys)
        chosen = torch.cat(greedy_select(views, costs, self.budget)) if views else torch.zeros(0, dtype=torch.bool)
        return [chosen[self.offsets[b] : self.offsets[b] + self.sizes[b]] for b in range(len(self.sizes))]


# ---- candidates of the model: blocks per matrix ------------------------------------------------------

@dataclass
class Block:
    matrix: int  # index into pools
    kind: str    # "rank" | "sparse"
    start: int   # first component / first sorted entry covered
    nvar: int    # Bernoulli variables
    group: int   # candidates per variable
    cost: int    # parameters per variable


def build_blocks(pools: list[_alloc.MatrixPool], space: str, group: int) -> list[Block]:
    blocks = []
    for i, p in enumerate(pools):
        R, K = p.sigma.numel(), p.s_abs.numel()
        if space != "sparse-only" and R:
            blocks.append(Block(i, "rank", 0, R, 1, p.rank_cost))
        if space != "lowrank-only" and K:
            full = K // group
            if full:
                blocks.append(Block(i, "sparse", 0, full, group, group))
            if K % group:
                blocks.append(Block(i, "sparse", full * group, 1, K % group, K % group))
    return blocks


def block_scores(pools: list[_alloc.MatrixPool], blocks: list[Block]) -> Callable[[int], torch.Tensor]:
    """Energy kept per parameter of each variable: sigma^2/(m+n), or mean v^2 over its entries."""
    def score(b: int) -> torch.Tensor:
        blk, p = blocks[b], pools[blocks[b].matrix]
        if blk.kind == "rank":
            return (p.sigma[blk.start : blk.start + blk.nvar].double() ** 2 / blk.cost).float()
        v = p.s_abs[blk.start : blk.start + blk.nvar * blk.group].double() ** 2
        return (v.reshape(blk.nvar, blk.group).sum(1) / blk.group).float()
    return score


@torch.no_grad()
def activation_block_scores(model_dir: str, calib_ids: torch.Tensor, pools: list[_alloc.MatrixPool],
                            blocks: list[Block], factors: dict, device: torch.device,
                            per_matrix: bool = True) -> Callable[[int], torch.Tensor]:
    """Output energy per parameter of each variable on the calibration inputs of the dense model:
    sigma_k^2 v_k^T H v_k / (m + n) for a component and S_ij^2 H_jj for an entry (mean over a
    group), H = X^T X / tokens of the matrix's input X. With `per_matrix`, each divided by the
    total over its matrix's candidates (sum of energy x cost): a share of that matrix's output
    energy, comparable across layers whose activations differ in scale by orders of magnitude,
    so that the initial allocation is balanced and the learned offsets do the cross-layer
    calibration that a local proxy cannot. [choice] The paper does not say how s
    starts; [lineage] initialises from a Wanda-style activation metric, of which this is the
    form that prices components and entries in the same unit (squared output error removed)."""
    from transformers import AutoModelForCausalLM

    from .methods.base import sequential_layers
    from .modelio import weight_name

    index = {p.name: i for i, p in enumerate(pools)}
    blocks_of: dict[int, list[int]] = {}
    for b, blk in enumerate(blocks):
        blocks_of.setdefault(blk.matrix, []).append(b)
    out: dict[int, torch.Tensor] = {}

    def record(i, _layer, stats):
        for short, st in stats.items():
            j = index.get(weight_name(i, short))
            if j is None:
                continue
            H = st.H / max(st.tokens, 1)
            f, n = factors[pools[j].name], pools[j].shape[1]
            for b in blocks_of.get(j, []):
                blk = blocks[b]
                if blk.kind == "rank":
                    sl = slice(blk.start, blk.start + blk.nvar)
                    V = f["V"][:, sl].to(H.device, torch.float64)
                    sigma = f["sigma"][sl].to(H.device, torch.float64)
                    e = sigma**2 * (V * (H @ V)).sum(0) / blk.cost
                else:
                    sl = slice(blk.start, blk.start + blk.nvar * blk.group)
                    cols = f["S_index"][sl].to(H.device).long() % n
                    e = f["S_values"][sl].to(H.device, torch.float64) ** 2 * torch.diagonal(H)[cols]
                    e = e.reshape(blk.nvar, blk.group).mean(1)
                out[b] = e.float().cpu()
        return {}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sequential_layers(model, calib_ids, str(device), record, propagate="dense")
    del model
    missing = [b for b in range(len(blocks)) if b not in out]
    if missing:
        raise GlrsError(f"activation scores missing for {len(missing)} blocks (matrix {pools[blocks[missing[0]].matrix].name}); "
                        "the prepared model does not match the RPCA files: rerun prepare_model and decompose")
    if per_matrix:
        for j, bs in blocks_of.items():
            total = sum(float(out[b].double().sum()) * blocks[b].cost for b in bs)
            for b in bs:
                out[b] = out[b] / total if total > 0 else out[b]
    return lambda b: out[b]


def _space_capacity(pools: list[_alloc.MatrixPool], space: str) -> int:
    rank = sum(p.sigma.numel() * p.rank_cost for p in pools)
    sparse = sum(p.s_abs.numel() for p in pools)
    return {"cap": rank + sparse, "lowrank-only": rank, "sparse-only": sparse}[space]


def space_budget(pools: list[_alloc.MatrixPool], density: float, space: str) -> int:
    """The global budget, with a clear error when the chosen space cannot hold it."""
    if space not in SPACES:
        raise GlrsError(f"unknown CAP space {space!r}; use one of {', '.join(SPACES)}")
    budget = _alloc.budget_for(pools, density)
    cap = _space_capacity(pools, space)
    if budget > cap:
        dense = sum(p.dense for p in pools)
        more = {"lowrank-only": "a larger rpca.lambda_scale (S sparser, L of higher rank)",
                "sparse-only": "a smaller rpca.lambda_scale (denser S)"}[space]
        raise GlrsError(
            f"target density {density} cannot be met by allocator {space}: Stage 1 left it candidates worth at most "
            f"{cap / dense:.4f} of the dense parameters; lower target_density to <= {cap / dense:.4f}, use allocator "
            f"cap (both spaces), or rerun RPCA with {more}"
        )
    return budget


# ---- the model with hooks that materialise W~ per layer ------------------------------------------------

@dataclass
class _Matrix:
    pool: _alloc.MatrixPool
    module: torch.nn.Module
    factors: dict[str, torch.Tensor]
    rank_block: int | None = None
    sparse_blocks: list[int] = field(default_factory=list)


def _read_factors(rpca_files: Sequence[str], pools: list[_alloc.MatrixPool], space: str,
                  device: torch.device, offload: bool) -> dict[str, dict[str, torch.Tensor]]:
    by_name = {p.name: p for p in pools}
    parts = {"cap": ("U", "sigma", "V", "S_values", "S_index"), "lowrank-only": ("U", "sigma", "V"),
             "sparse-only": ("S_values", "S_index")}[space]
    store = torch.device("cpu") if offload else device
    pin = offload and device.type == "cuda"
    out = {}
    for path in rpca_files:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["glrs"])
            for short, info in meta["matrices"].items():
                pool = by_name.get(info["name"])
                if pool is None:
                    continue
                t = {part: f.get_tensor(_alloc.layer_file_key(short, part)) for part in parts}
                m, n = pool.shape
                if "S_index" in t:
                    if t["S_values"].numel() != pool.s_abs.numel():
                        raise GlrsError(f"{path}: {short}.S_values does not match its pool; rerun the decompose job")
                    if m * n < 2**31:
                        t["S_index"] = t["S_index"].to(torch.int32)
                if "U" in t and t["U"].shape[1] != pool.sigma.numel():
                    raise GlrsError(f"{path}: {short}.U does not match its pool; rerun the decompose job")
                t = {k: (v.pin_memory() if pin else v.to(store)) for k, v in t.items()}
                out[pool.name] = t
    missing = [p.name for p in pools if p.name not in out]
    if missing:
        raise GlrsError(f"RPCA factors missing for {missing[:3]}...; pass every layer's RPCA file")
    return out


class _Engine:
    """The calibration loss of W~(mask sample), one decoder layer materialised at a time."""

    def __init__(self, model, mats: list[_Matrix], blocks: list[Block], device: torch.device, dtype: torch.dtype):
        self.model, self.mats, self.blocks, self.device, self.dtype = model, mats, blocks, device, dtype
        self.sample: MaskSample | None = None
        self.placeholder = torch.empty(0, dtype=dtype, device=device)
        by_layer: dict[int, list[_Matrix]] = {}
        for mat in mats:
            by_layer.setdefault(mat.pool.layer, []).append(mat)
        self.handles = []
        for layer, group in by_layer.items():
            mod = model.model.layers[layer]
            self.handles.append(mod.register_forward_pre_hook(lambda _m, _a, g=group: self._materialise(g)))
            self.handles.append(mod.register_forward_hook(lambda _m, _a, _o, g=group: self._release(g)))

    def _compose(self, mat: _Matrix) -> torch.Tensor:
        m, n = mat.pool.shape
        f = {k: v.to(self.device, non_blocking=True) for k, v in mat.factors.items()}
        if mat.rank_block is not None:
            keep = self.sample.mask(mat.rank_block).float()
            W = (f["U"].float() * (f["sigma"].float() * keep)) @ f["V"].float().T
        else:
            W = torch.zeros(m, n, dtype=torch.float32, device=self.device)
        if mat.sparse_blocks:
            parts = []
            for b in mat.sparse_blocks:
                mk = self.sample.mask(b).float()
                parts.append(mk.repeat_interleave(self.blocks[b].group) if self.blocks[b].group > 1 else mk)
            W.view(-1).index_add_(0, f["S_index"], f["S_values"].float() * torch.cat(parts))
        return W.to(self.dtype)

    def _materialise(self, group: list[_Matrix]) -> None:
        for mat in group:
            mat.module.weight.data = self._compose(mat)

    def _release(self, group: list[_Matrix]) -> None:
        for mat in group:
            mat.module.weight.data = self.placeholder

    @torch.no_grad()
    def loss(self, ids: torch.Tensor, sample: MaskSample) -> float:
        """Mean next-token cross-entropy of the batch; logits one sequence at a time."""
        self.sample = sample
        try:
            ids = ids.to(self.device, torch.long)
            hidden = self.model.model(input_ids=ids, use_cache=False).last_hidden_state
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for b in range(ids.shape[0]):
                logits = self.model.lm_head(hidden[b, :-1]).float()
                total += F.cross_entropy(logits, ids[b, 1:], reduction="sum").double()
            return float(total) / (ids.shape[0] * (ids.shape[1] - 1))
        finally:
            self.sample = None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _load_model(model_dir: str, mats_by_name: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    modules = {}
    for name in mats_by_name:
        mod = model.get_submodule(name.removesuffix(".weight"))
        mod.weight.data = torch.empty(0, dtype=dtype)  # the dense target weight is never needed again
        modules[name] = mod
    return model.to(device), modules


# ---- the allocator -------------------------------------------------------------------------------------

def allocate(pools: list[_alloc.MatrixPool], density: float, params: dict | None, seed: int, model_dir: str | None,
             rpca_files: Sequence[str], calib_ids: torch.Tensor | None, space: str = "cap",
             device: str = "cpu") -> _alloc.Allocation:
    """CAP Stage 2 over `space` ("cap" | "lowrank-only" | "sparse-only"): see the module docstring."""
    return allocate_with_info(pools, density, params, seed, model_dir, rpca_files, calib_ids, space, device)[0]


def allocate_with_info(pools, density, params, seed, model_dir, rpca_files, calib_ids, space="cap", device="cpu"):
    """As `allocate`, plus a dict of what happened (steps, losses, baselines, expected density)."""
    p = resolve_params(params)
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
        factors = _read_factors(rpca_files, pools, space, dev, p["offload"])

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
        dtype = getattr(torch, p["dtype"])
        model, modules = _load_model(model_dir, factors, dev, dtype)
        mats, by_index = [], {}
        for i, q in enumerate(pools):
            by_index[i] = _Matrix(q, modules[q.name], factors[q.name])
            mats.append(by_index[i])
        for b, blk in enumerate(blocks):
            if blk.kind == "rank":
                by_index[blk.matrix].rank_block = b
            else:
                by_index[blk.matrix].sparse_blocks.append(b)
        engine = _Engine(model, mats, blocks, dev, dtype)
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
        del engine, model, modules, mats
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
