"""CAP Stage 2, `policy: budget` (the default): learn how many parameters each matrix keeps.

[departure] What leaves Stage 2 under the default realisation (glrs.realise) is one number per
matrix: its parameter budget. This policy learns exactly that number, with the paper's estimator
(REINFORCE on the calibration loss, forward passes only, one global budget), instead of learning
~10^8 keep-probabilities of Stage-1 candidates whose per-matrix totals are then all that is used.

Policy. Matrix j's log-budget offset is a sum of learned variables: by default (`tie: layer+type`)
its decoder layer's plus its kind's (q, k, v, o, gate, up, down: 30 + 7 = 37 variables for SmolLM2);
`tie: layer` keeps only the layer's, `tie: matrix` gives every matrix its own. A sample draws
eps ~ N(0, I) over the variables and gives matrix j the budget
    b_j = B * d_j exp(o_j + sigma e_j) / sum_k d_k exp(o_k + sigma e_k)
(o_j, e_j: the sums of theta and of eps over j's variables), capped at its dense size d_j (what a cap
frees goes to the others in proportion), so every sample spends the global budget B exactly; theta = 0
is the uniform allocation, where learning starts.

Estimator. REINFORCE for a Gaussian policy, grad_theta log p = eps / sigma, with mirrored samples
(theta + sigma eps, theta - sigma eps) on the same calibration batch: each one's baseline is the
other's loss (the leave-one-out baseline of two samples), so the batch's difficulty cancels and
    g = (L+ - L-) / (2 sigma) * eps.
A step averages g over `pairs_per_step` pairs (4), each on its own batch, then
theta <- clip(theta - lr * g / rms, -max_shift, max_shift), rms the running root mean square of
(L+ - L-) / (2 sigma) (EMA 0.9), so that lr is in log-budget units per step. The final budgets are
those at `offset_scale` * theta (0.5 by default since CAP v5; < 1 pulls them towards uniform, see below).
Why these defaults (docs/results-history.md sections 2 and 3, docs/negative-results.md): one offset
per matrix and one pair a step (CAP v3) did not learn -- one loss difference per step cannot resolve
210 directions -- and its allocation realised worse than uniform (16.71 against 14.88, CPU, density
0.5); 37 variables and 4 pairs a step realised to 14.43 there, and on the H200 beat the uniform and
OWL allocations at densities 0.4 and 0.5 but not at 0.6 (11.75 against 11.68 / 11.64). The
surrogate's error grows more slowly with a lost budget than the realisation's, so its optimum
spreads the budgets further than the realisation wants: the H200's learned offsets, halved and
realised on the CPU, gave 19.82 / 12.19 against 20.15 / 12.37 unhalved and 22.84 / 12.35 uniform at
densities 0.4 / 0.6 (at 0.5 the CPU screen's offsets: 14.47 halved, 14.51 unhalved, 14.88 uniform),
so `offset_scale` is 0.5 since CAP v5 (1.0: the v4 allocation).

Loss surrogate. A sample's loss is the calibration cross-entropy of the model whose every target
matrix keeps its b_j largest Wanda scores |W_ij| sqrt(H_jj), the same share in every row: cheap
to form for any budgets (one comparison against a precomputed within-row rank per matrix), and it
responds to a matrix's budget the way its realisation does (more budget, less output error). The
realisation itself is too slow to run per sample.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
from tqdm import tqdm

from .. import gpuslots
from ..errors import GlrsError
from ..masks import capped_split
from .loss import calibration_loss
from .policy import _stream_seed


class BudgetPolicy:
    """Per-matrix log-budget offsets under one global budget (see the module docstring)."""

    def __init__(self, dense: Sequence[int], terms: Sequence[Sequence[int]], budget: int, *, seed: int,
                 sigma: float, lr: float, max_shift: float):
        self.dense = [int(d) for d in dense]
        self.terms = [list(t) for t in terms]  # matrix j's offset = sum of the variables terms[j]
        nvar = 1 + max((v for t in self.terms for v in t), default=-1)
        self.budget, self.seed = int(budget), int(seed)
        self.sigma, self.lr, self.max_shift = float(sigma), float(lr), float(max_shift)
        self.theta = torch.zeros(nvar, dtype=torch.float64)
        self.adv_sq: float | None = None
        self.t = 0

    def offsets(self, theta: torch.Tensor) -> list[float]:
        """Per-matrix log-budget offsets of the variables theta."""
        th = theta.tolist()
        return [sum(th[v] for v in t) for t in self.terms]

    def budgets(self, perturbation: torch.Tensor | None = None, scale: float = 1.0) -> list[int]:
        """Per-matrix budgets at scale * theta (+ a perturbation), exactly `budget` in all."""
        th = scale * self.theta if perturbation is None else scale * self.theta + perturbation
        w = [d * math.exp(o) for d, o in zip(self.dense, self.offsets(th))]
        return capped_split(self.budget, w, self.dense)

    def noise(self, step: int, pair: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_stream_seed(self.seed, "budget", step, pair))
        return torch.randn(self.theta.shape, generator=gen, dtype=torch.float64)

    def step(self, losses_of: Sequence) -> list[tuple[float, float]]:
        """One step from len(losses_of) mirrored pairs, pair k scored by losses_of[k](budgets) (each on
        its own calibration batch); returns their (L+, L-). Non-finite pairs are left out."""
        grad, used, out = torch.zeros_like(self.theta), 0, []
        for k, loss_of in enumerate(losses_of):
            eps = self.noise(self.t, k)
            lp = float(loss_of(self.budgets(self.sigma * eps)))
            lm = float(loss_of(self.budgets(-self.sigma * eps)))
            out.append((lp, lm))
            if not (math.isfinite(lp) and math.isfinite(lm)):
                continue
            a = (lp - lm) / (2 * self.sigma)
            self.adv_sq = a * a if self.adv_sq is None else 0.9 * self.adv_sq + 0.1 * a * a
            grad += a * eps
            used += 1
        self.t += 1
        if used and self.adv_sq:
            self.theta -= self.lr * grad / (used * math.sqrt(self.adv_sq))
            self.theta.clamp_(-self.max_shift, self.max_shift)
        return out


class PrunedSurrogate:
    """The calibration loss of the model whose target matrices keep their top Wanda scores at given
    budgets; each decoder layer's pruned weights exist only while that layer runs.

    Call it before moving the model to `device`: it takes the target weights out of their modules.
    Resident (default), the weights (in `dtype`) and their within-row ranks (int16 where n < 2^15) live
    on `device`: ~4 bytes a target weight in bfloat16, ~28 GB at 8B. `offload`: both stay in (pinned)
    CPU memory and the running layer's are copied to `device` in the pre-hook (the same product, so the
    same losses bit for bit); the device then holds the non-target weights and one layer's, ~2.5 GB at
    8B in bfloat16, at the price of one host-to-device copy of all targets per loss. `resident_bytes`
    (with offload) keeps the first matrices on the device up to that many bytes of weights + ranks, so a
    memory cap is spent on fewer copies."""

    def __init__(self, model, modules: Sequence[torch.nn.Module], layers: Sequence[int], H_diag: Sequence[torch.Tensor],
                 device: torch.device, dtype: torch.dtype, offload: bool = False, resident_bytes: int = 0):
        self.model, self.device, self.dtype = model, device, dtype
        self.modules = list(modules)
        self.weights, self.ranks = [], []
        pin_ok = torch.device(device).type == "cuda"
        left = resident_bytes if offload else None
        for mod, h in zip(self.modules, H_diag):
            m, n = mod.weight.shape
            size = m * n * (torch.empty(0, dtype=dtype).element_size() + (2 if n < 2**15 else 4))
            resident = left is None or size <= left
            if left is not None and resident:
                left -= size
            store, pin = (torch.device(device), False) if resident else (torch.device("cpu"), pin_ok)
            source = mod.weight.data
            W = source.to(device)
            score = W.float().abs() * h.to(W.device, torch.float32).clamp_min(0).sqrt().unsqueeze(0)
            order = torch.argsort(score, dim=1, descending=True, stable=True)
            del score
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(W.shape[1], device=W.device).expand_as(order).contiguous())
            del order
            rank = rank.to(torch.int16 if W.shape[1] < 2**15 else torch.int32).to(store)
            W = (W if resident else source).to(store, dtype)
            self.ranks.append(rank.pin_memory() if pin else rank)
            self.weights.append(W.pin_memory() if pin else W)
            mod.weight.data = torch.empty(0, dtype=dtype, device=device)
        self.keep: list[int] = [0] * len(self.modules)
        by_layer: dict[int, list[int]] = {}
        for j, layer in enumerate(layers):
            by_layer.setdefault(layer, []).append(j)
        self.placeholder = torch.empty(0, dtype=dtype, device=device)
        self.handles = []
        for layer, js in by_layer.items():
            mod = model.model.layers[layer]
            self.handles.append(mod.register_forward_pre_hook(lambda _m, _a, js=js: self._materialise(js)))
            self.handles.append(mod.register_forward_hook(lambda _m, _a, _o, js=js: self._release(js)))

    def _materialise(self, js: list[int]) -> None:
        for j in js:
            W = self.weights[j].to(self.device, non_blocking=True)
            rank = self.ranks[j].to(self.device, non_blocking=True)
            self.modules[j].weight.data = W * (rank < self.keep[j]).to(W.dtype)

    def _release(self, js: list[int]) -> None:
        for j in js:
            self.modules[j].weight.data = self.placeholder

    @torch.no_grad()
    def loss(self, ids: torch.Tensor, budgets: Sequence[int]) -> float:
        """Mean next-token cross-entropy of the batch with matrix j keeping budgets[j] entries."""
        self.keep = [int(round(b / W.shape[0])) for b, W in zip(budgets, self.weights)]
        return calibration_loss(self.model, ids, self.device)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def budget_terms(names: Sequence[str], layers: Sequence[int], tie: str) -> list[list[int]]:
    """Which variables make up each matrix's log-budget offset: its own (`matrix`), its decoder layer's
    (`layer`), or its layer's plus its kind's (`layer+type`: q, k, ..., down; 30 + 7 variables here)."""
    layer_var = {layer: i for i, layer in enumerate(sorted(set(layers)))}
    if tie == "matrix":
        return [[j] for j in range(len(names))]
    if tie == "layer":
        return [[layer_var[layer]] for layer in layers]
    kind_of = [n.rsplit(".", 2)[-2] for n in names]  # model.layers.3.self_attn.q_proj.weight -> q_proj
    kind_var = {kind: len(layer_var) + i for i, kind in enumerate(sorted(set(kind_of)))}
    return [[layer_var[layer], kind_var[kind]] for kind, layer in zip(kind_of, layers)]


def learn_budgets(names: Sequence[str], layers: Sequence[int], shapes: Sequence[tuple[int, int]], budget: int,
                  params: dict, seed: int, model_dir: str, calib_ids: torch.Tensor, H_diag: Sequence[torch.Tensor],
                  device: torch.device) -> tuple[list[int], dict]:
    """(per-matrix budgets, info): the learned allocation of `budget` over the named target matrices."""
    from transformers import AutoModelForCausalLM

    dense = [m * n for m, n in shapes]
    policy = BudgetPolicy(dense, budget_terms(names, layers, params["tie"]), budget, seed=seed,
                          sigma=params["sigma"], lr=params["budget_lr"], max_shift=params["max_shift"])
    nseq, pairs = int(calib_ids.shape[0]), params["pairs_per_step"]
    steps = params["epochs"] * math.ceil(nseq / (params["batch_size"] * pairs))
    if params["max_steps"]:
        steps = min(steps, params["max_steps"])
    info: dict = {"policy": "budget", "steps": steps, "losses": [], "skipped_steps": 0}
    if steps == 0:
        return policy.budgets(), info
    dtype = getattr(torch, params["dtype"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = [model.get_submodule(n.removesuffix(".weight")) for n in names]
    for mod, shape in zip(modules, shapes):
        if tuple(mod.weight.shape) != tuple(shape):
            raise GlrsError(f"the prepared model's {mod} has shape {tuple(mod.weight.shape)}, the RPCA files say "
                            f"{tuple(shape)}: rerun prepare_model and decompose")
    cap = gpuslots.memory_cap_bytes() if device.type == "cuda" else None
    offload = bool(params["offload"]) or cap is not None
    resident = 0
    if cap is not None and not params["offload"]:  # what the cap leaves after the rest of the model and a reserve
        targets = {id(mod.weight) for mod in modules}
        rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in targets)
        resident = max(0, cap - rest - (4 * 2**30 + cap // 8))
    engine = PrunedSurrogate(model, modules, layers, H_diag, device, dtype, offload=offload, resident_bytes=resident)
    model.to(device)  # the non-target weights (embeddings, norms, lm_head); the targets are the engine's
    if offload:
        print(f"cap[budget]: target weights offloaded to {'pinned ' if device.type == 'cuda' else ''}CPU memory "
              f"beyond the first {resident / 2**30:.1f} GiB", file=sys.stderr)
    order_gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(params["epochs"]):
        perm = torch.randperm(nseq, generator=order_gen)
        batches += [perm[i : i + params["batch_size"]] for i in range(0, nseq, params["batch_size"])]
    probe = calib_ids[: min(nseq, params["batch_size"] * 2)]
    try:
        info["surrogate_loss_uniform"] = engine.loss(probe, policy.budgets())
        bar = tqdm(total=steps, desc="cap[budget]", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        for t in range(steps):
            step_batches = [batches[(t * pairs + k) % len(batches)] for k in range(pairs)]
            res = policy.step([lambda b, ids=calib_ids[i]: engine.loss(ids, b) for i in step_batches])
            info["losses"].append([list(r) for r in res])
            info["skipped_steps"] += int(not all(math.isfinite(x) for r in res for x in r))
            mean = sum(x for r in res for x in r) / (2 * len(res))
            bar.set_postfix(loss=f"{mean:.4f}", spread=f"{float(policy.theta.abs().max()):.3f}", refresh=False)
            bar.update(1)
        bar.close()
        learned = policy.budgets(scale=params["offset_scale"])
        info["surrogate_loss_learned"] = engine.loss(probe, learned)
    finally:
        engine.close()
    info["theta"] = policy.theta.tolist()
    return learned, info
