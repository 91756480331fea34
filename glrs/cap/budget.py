"""CAP Stage 2, `policy: budget` (the default): learn how many parameters each matrix keeps.

[departure] What leaves Stage 2 under the default realisation (glrs.realise) is one number per
matrix: its parameter budget. This policy learns exactly that number, with the paper's estimator
(REINFORCE on the calibration loss, forward passes only, one global budget), instead of learning
~10^8 keep-probabilities of Stage-1 candidates whose per-matrix totals are then all that is used.

Policy. One log-budget offset theta_j per matrix (`tie: matrix`; `tie: layer` shares one per
decoder layer). A sample draws eps ~ N(0, I) and gives matrix j the budget
    b_j = B * d_j exp(theta_j + sigma eps_j) / sum_k d_k exp(theta_k + sigma eps_k),
capped at its dense size d_j (what a cap frees goes to the others in proportion), so every sample
spends the global budget B exactly; theta = 0 is the uniform allocation, where learning starts.

Estimator. REINFORCE for a Gaussian policy, grad_theta log p = eps / sigma, with mirrored samples
(theta + sigma eps, theta - sigma eps) on the same calibration batch: each one's baseline is the
other's loss (the leave-one-out baseline of two samples), so the batch's difficulty cancels and
    g = (L+ - L-) / (2 sigma) * eps.
Step: theta <- clip(theta - lr * g / rms, -max_shift, max_shift), rms the running root mean square
of (L+ - L-) / (2 sigma) (EMA 0.9), so that lr is in log-budget units per step.

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

from ..errors import GlrsError
from ..methods.base import capped_split
from .loss import calibration_loss
from .policy import _stream_seed


class BudgetPolicy:
    """Per-matrix log-budget offsets under one global budget (see the module docstring)."""

    def __init__(self, dense: Sequence[int], groups: Sequence[int], budget: int, *, seed: int, sigma: float,
                 lr: float, max_shift: float):
        self.dense = [int(d) for d in dense]
        self.groups = torch.tensor(list(groups), dtype=torch.long)  # matrix -> variable
        self.budget, self.seed = int(budget), int(seed)
        self.sigma, self.lr, self.max_shift = float(sigma), float(lr), float(max_shift)
        self.theta = torch.zeros(int(self.groups.max()) + 1 if len(self.groups) else 0, dtype=torch.float64)
        self.adv_sq: float | None = None
        self.t = 0

    def budgets(self, offsets: torch.Tensor | None = None) -> list[int]:
        """Per-matrix budgets at theta (+ a perturbation of theta), exactly `budget` in all."""
        th = self.theta if offsets is None else self.theta + offsets
        w = [d * math.exp(float(th[g])) for d, g in zip(self.dense, self.groups.tolist())]
        return capped_split(self.budget, w, self.dense)

    def noise(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_stream_seed(self.seed, "budget", step))
        return torch.randn(self.theta.shape, generator=gen, dtype=torch.float64)

    def step(self, loss_of) -> tuple[float, float]:
        """One mirrored pair: loss_of(budgets) at theta +- sigma eps; returns (L+, L-)."""
        eps = self.noise(self.t)
        self.t += 1
        lp = float(loss_of(self.budgets(self.sigma * eps)))
        lm = float(loss_of(self.budgets(-self.sigma * eps)))
        if not (math.isfinite(lp) and math.isfinite(lm)):
            return lp, lm
        a = (lp - lm) / (2 * self.sigma)
        self.adv_sq = a * a if self.adv_sq is None else 0.9 * self.adv_sq + 0.1 * a * a
        if self.adv_sq > 0:
            self.theta -= self.lr * (a / math.sqrt(self.adv_sq)) * eps
            self.theta.clamp_(-self.max_shift, self.max_shift)
        return lp, lm


class PrunedSurrogate:
    """The calibration loss of the model whose target matrices keep their top Wanda scores at given
    budgets; each decoder layer's pruned weights exist only while that layer runs."""

    def __init__(self, model, modules: Sequence[torch.nn.Module], layers: Sequence[int], H_diag: Sequence[torch.Tensor],
                 device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.modules = list(modules)
        self.weights, self.ranks = [], []
        for mod, h in zip(self.modules, H_diag):
            W = mod.weight.data
            score = W.float().abs() * h.to(W.device, torch.float32).clamp_min(0).sqrt().unsqueeze(0)
            order = torch.argsort(score, dim=1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(W.shape[1], device=W.device).expand_as(order).contiguous())
            self.ranks.append(rank.to(torch.int16 if W.shape[1] < 2**15 else torch.int32).to(device))
            self.weights.append(W.to(device, dtype))
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
            W, rank = self.weights[j], self.ranks[j]
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


def learn_budgets(names: Sequence[str], layers: Sequence[int], shapes: Sequence[tuple[int, int]], budget: int,
                  params: dict, seed: int, model_dir: str, calib_ids: torch.Tensor, H_diag: Sequence[torch.Tensor],
                  device: torch.device) -> tuple[list[int], dict]:
    """(per-matrix budgets, info): the learned allocation of `budget` over the named target matrices."""
    from transformers import AutoModelForCausalLM

    dense = [m * n for m, n in shapes]
    if params["tie"] == "layer":
        ids_of = {layer: i for i, layer in enumerate(sorted(set(layers)))}
        groups = [ids_of[layer] for layer in layers]
    else:
        groups = list(range(len(names)))
    policy = BudgetPolicy(dense, groups, budget, seed=seed, sigma=params["sigma"], lr=params["budget_lr"],
                          max_shift=params["max_shift"])
    nseq = int(calib_ids.shape[0])
    steps = params["epochs"] * math.ceil(nseq / params["batch_size"])
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
    model.to(device)
    engine = PrunedSurrogate(model, modules, layers, H_diag, device, dtype)
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
            ids = calib_ids[batches[t]]
            lp, lm = policy.step(lambda b: engine.loss(ids, b))
            info["losses"].append([lp, lm])
            info["skipped_steps"] += int(not (math.isfinite(lp) and math.isfinite(lm)))
            bar.set_postfix(loss=f"{(lp + lm) / 2:.4f}", spread=f"{float(policy.theta.abs().max()):.3f}", refresh=False)
            bar.update(1)
        bar.close()
        info["surrogate_loss_learned"] = engine.loss(probe, policy.budgets())
    finally:
        engine.close()
    info["theta"] = policy.theta.tolist()
    return policy.budgets(), info
