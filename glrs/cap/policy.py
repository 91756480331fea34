"""CAP Stage 2's Bernoulli policies over Stage-1 candidates: the paper's per-candidate policy
(`policy: entry`), the tied policy (`policy: tied`), the budget projection and the final selection.
The algorithm, its sources and every choice are described in glrs/cap/__init__.py."""
from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

_CHUNK = 1 << 25  # elements per float64 temporary in reductions
_OUT = 64.0  # a stepped probability is kept within [-64, 65] before the projection (float16 stays finite)

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


