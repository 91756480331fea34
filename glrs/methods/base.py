"""The interface every compression method implements, and the plumbing the baseline methods share.

* `MethodOutput`: what a method returns (dense compressed matrices, kept
  parameters per matrix counted as docs/design.md section 7 says, JSON-able details).
* Parameter and density checks (`resolve_params`, `pruning_setup`, `check_density`,
  `assert_density`), reading the result back (`finish`), and rank allocation for
  low-rank methods that keeps the overall density within rounding of one rank unit.

What is not the baselines' own lives in its own module: running decoder layers on
captured inputs (layer-sequential calibration, LayerStats) in glrs.layers; budgets
and masks (exact counts, top-k and N:M masks) in glrs.masks.

Kept parameters (docs/design.md section 7): unstructured / N:M = nnz, a low-rank
factorisation = r*(m+n), sparse + low-rank = r*(m+n) + nnz. Index overhead is
not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import GlrsError
from ..layers import decoder_layers, target_modules, target_shapes
from ..masks import DENSITY_TOLERANCE, check_nm_density, parse_nm
from ..modelio import weight_name


@dataclass
class MethodOutput:
    weights: dict[str, torch.Tensor]  # HF weight name -> compressed dense matrix, same shape/dtype as the original
    params_kept: dict[str, int]  # weight name -> kept parameters (docs/design.md section 7)
    details: dict = field(default_factory=dict)  # JSON-able per-method information
    # Optional factored form, in glrs.compressed's layout, for methods with a low-rank part:
    # weight name -> {U [m, r], sigma [r], V [n, r], S_index [k] int64 flat ascending, S_values [k]} with
    # weights[name] == U diag(sigma) V^T + S up to rounding. None for pure sparsity (S = the nonzeros of
    # `weights`) and for methods that do not provide it.
    factors: dict[str, dict[str, torch.Tensor]] | None = None

    def achieved_density(self, model) -> float:
        return density_of(self.params_kept, target_shapes(model))


class Method(Protocol):
    name: str

    def compress(self, model, calib_ids: torch.Tensor, density: float, params: dict, seed: int,
                 device: str) -> MethodOutput: ...


def check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise GlrsError(f"target density {density} is outside (0, 1]; give the kept fraction of parameters, e.g. 0.5")
    return density


def allocate_ranks(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, int]:
    """Ranks for a pure low-rank method at a uniform density, with the overall density as close
    to the target as the rank granularity allows.

    Each matrix first gets r = floor(density * m * n / (m + n)) (the uniform
    density rank); the remaining budget R = density * sum(m*n) - sum r(m+n) is
    below one rank unit per matrix and is spent by giving +1 rank to a subset
    of matrices whose units (m+n) sum closest to R (a bounded subset-sum over
    the few distinct units; among equal units the earliest matrices in layer
    order get the extra rank). The overall error is then at most half the gcd of
    the distinct units, typically a few hundred parameters out of billions.
    """
    names = list(shapes)
    budget = density * sum(m * n for m, n in shapes.values())
    ranks = {}
    for name in names:
        m, n = shapes[name]
        ranks[name] = min(min(m, n), int(math.floor(density * m * n / (m + n))))
    rest = budget - sum(ranks[k] * sum(shapes[k]) for k in names)
    # eligible matrices by unit
    by_unit: dict[int, list[str]] = {}
    for name in names:
        m, n = shapes[name]
        if ranks[name] < min(m, n):
            by_unit.setdefault(m + n, []).append(name)
    if rest <= 0:
        return ranks
    return spend_remainder(ranks, by_unit, rest)


def spend_remainder(ranks: dict[str, int], by_unit: dict[int, list[str]], rest: float) -> dict[str, int]:
    """Give +1 rank to the subset of candidates whose units (m + n) sum closest to `rest`.

    `by_unit` maps a unit to its candidate matrices in preference order; a
    bounded subset sum over the few distinct units (in steps of their gcd)
    finds the counts per unit, and the first candidates of each unit get them."""
    units = sorted(by_unit)
    if not units:
        return ranks
    limit = int(math.ceil(rest)) + max(units)
    g = 0
    for u in units:
        g = math.gcd(g, u)
    # reachable sums (in units of g) -> counts per unit that reach them
    reach: dict[int, tuple[int, ...]] = {0: tuple(0 for _ in units)}
    for ui, u in enumerate(units):
        step, cap = u // g, len(by_unit[u])
        new = dict(reach)
        for s, counts in reach.items():
            for c in range(1, cap + 1):
                t = s + c * step
                if t * g > limit:
                    break
                if t not in new:
                    new[t] = counts[:ui] + (c,) + counts[ui + 1:]
        reach = new
    best = min(reach, key=lambda s: (abs(s * g - rest), s))
    for u, c in zip(units, reach[best]):
        for name in by_unit[u][:c]:
            ranks[name] += 1
    return ranks


def density_of(params_kept: dict[str, int], shapes: dict[str, tuple[int, int]]) -> float:
    dense = sum(shapes[k][0] * shapes[k][1] for k in params_kept)
    return sum(params_kept.values()) / dense if dense else 0.0


def assert_density(params_kept: dict[str, int], shapes: dict[str, tuple[int, int]], density: float, method: str,
                   unspent: int = 0) -> float:
    """The achieved density, checked against the target. `unspent`: parameters of the budget the method
    could not spend (OATS N:M: rank comes in units of m + n); they count towards the target in the check."""
    achieved = density_of(params_kept, shapes)
    dense = sum(shapes[k][0] * shapes[k][1] for k in params_kept)
    if abs(achieved + (unspent / dense if dense else 0.0) - density) > DENSITY_TOLERANCE:
        raise GlrsError(f"{method}: achieved density {achieved:.5f} misses the target {density:.5f} by more than "
                        f"{DENSITY_TOLERANCE * 100:g} percentage points; the model's matrices are too small for this "
                        "target's granularity")
    return achieved


def collect_weights(model) -> dict[str, torch.Tensor]:
    """HF weight name -> current (compressed) weight of every target matrix, cloned to the CPU."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for short, mod in target_modules(layer).items():
            out[weight_name(i, short)] = mod.weight.detach().to("cpu").clone()
    return out


def resolve_params(method: str, params: dict | None, defaults: dict) -> dict:
    """The method's defaults updated with `params`; unknown names are an error naming the known ones."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise GlrsError(f"{method}: unknown parameter(s) {', '.join(unknown)}; known: "
                        f"{', '.join(f'{k} (default {v!r})' for k, v in defaults.items()) or 'none'}")
    return {**defaults, **params}


def pruning_setup(method: str, density: float, params: dict | None, defaults: dict):
    """(density, params, N:M pattern or None) for the pruning methods, every check done once here."""
    density = check_density(density)
    p = resolve_params(method, params, defaults)
    nm = parse_nm(p["nm"])
    if nm is not None:
        check_nm_density(nm, density)
    return density, p, nm


def finish(model, method: str, density: float, params_kept: dict[str, int], details: dict,
           factors: dict[str, dict[str, torch.Tensor]] | None = None, unspent: int = 0) -> MethodOutput:
    """Check the overall density (`unspent`: see assert_density), read the compressed weights back from the
    model, report."""
    shapes = target_shapes(model)
    achieved = assert_density(params_kept, shapes, density, method, unspent)
    details = {"method": method, "target_density": density, "achieved_density": achieved,
               "params_kept": int(sum(params_kept.values())),
               "params_dense": int(sum(shapes[k][0] * shapes[k][1] for k in params_kept)), **details}
    return MethodOutput(collect_weights(model), {k: int(v) for k, v in params_kept.items()}, details, factors)


def write_weight(model, name: str, w: torch.Tensor) -> None:
    """Copy `w` into the target matrix called `name` (HF weight name), keeping its dtype and device."""
    param = model.get_parameter(name)
    with torch.no_grad():
        param.copy_(w.to(param.device, param.dtype))


def low_rank_factors(U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor, dtype: torch.dtype,
                     S_index: torch.Tensor | None = None, S_values: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A MethodOutput.factors entry on the CPU: U [m, r], sigma [r], V [n, r], and the sparse part (empty if none)."""
    if S_index is None:
        S_index = torch.zeros(0, dtype=torch.int64)
        S_values = torch.zeros(0, dtype=dtype)
    return {"U": U.detach().to("cpu", dtype).contiguous(), "sigma": sigma.detach().to("cpu", dtype).contiguous(),
            "V": V.detach().to("cpu", dtype).contiguous(), "S_index": S_index.detach().to("cpu", torch.int64).contiguous(),
            "S_values": S_values.detach().to("cpu", dtype).contiguous()}
