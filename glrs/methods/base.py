"""The interface every compression method implements, and the machinery they share.

* `LayerStats`: second-order and mean-magnitude statistics of the input of one
  target linear over all calibration tokens.
* `MethodOutput`: what a method returns (dense compressed matrices, kept
  parameters per matrix counted as docs/design.md section 7 says, JSON-able details).
* `sequential_layers`: layer-sequential calibration as in the SparseGPT and
  Wanda reference code: the calibration batch goes through the embeddings once;
  then decoder layer i is run on the current hidden states with forward hooks
  on its target linears, the method compresses it, and the outputs of the
  *compressed* layer i are the inputs of layer i+1. Only one layer's
  activations (two buffers of [nsamples, seqlen, hidden]) are held.
* `collect_stats`: the same pass without compression, statistics of the dense
  model for every target matrix (for methods that allocate globally).
* Budget helpers shared by the methods: exact per-matrix counts, per-row top-k
  masks whose total is exact, N:M masks, and rank allocation for low-rank
  methods that keeps the overall density within rounding of one rank unit.

Kept parameters (docs/design.md section 7): unstructured / N:M = nnz, a low-rank
factorisation = r*(m+n), sparse + low-rank = r*(m+n) + nnz. Index overhead is
not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from ..errors import GlrsError
from ..modelio import TARGETS, weight_name

SHORTS = tuple(TARGETS)
# Groups of targets whose inputs are produced one after the other inside a decoder
# layer ("true sequential" order of the SparseGPT reference code).
TRUE_SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
DENSITY_TOLERANCE = 1e-3  # 0.1 percentage points, overall


@dataclass
class LayerStats:
    """Statistics of the INPUT x (dimension n) of one target linear over all calibration tokens."""

    H: torch.Tensor | None  # [n, n] float64: sum over tokens of x x^T (None when only the diagonal was asked for)
    abs_mean: torch.Tensor  # [n] float64: mean over tokens of |x_j|
    tokens: int  # number of tokens summed
    diag: torch.Tensor | None = None  # [n] float64 sum of x_j^2, set when H is None (moments="diag")

    @property
    def sq_norm(self) -> torch.Tensor:
        """[n] ||X_j||_2^2 = diag(H)."""
        if self.H is None:
            return self.diag.clone()
        return torch.diagonal(self.H).clone()

    @property
    def col_norm(self) -> torch.Tensor:
        """[n] ||X_j||_2."""
        return self.sq_norm.clamp_min(0).sqrt()

    def to(self, device) -> "LayerStats":
        return LayerStats(None if self.H is None else self.H.to(device), self.abs_mean.to(device), self.tokens,
                          None if self.diag is None else self.diag.to(device))


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


CompressLayer = Callable[[int, nn.Module, dict[str, LayerStats]], dict[str, torch.Tensor]]


# ---- model structure -------------------------------------------------------------------------

def decoder_layers(model) -> nn.ModuleList:
    try:
        return model.model.layers
    except AttributeError as e:
        raise GlrsError("the model has no model.layers: glrs methods need a Llama-style decoder "
                        "(LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, ...)") from e


def target_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    return {short: layer.get_submodule(path) for short, path in TARGETS.items()}


def target_shapes(model) -> dict[str, tuple[int, int]]:
    """HF weight name -> (m, n) of every target matrix of every layer, in layer order."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for short, mod in target_modules(layer).items():
            out[weight_name(i, short)] = tuple(mod.weight.shape)
    return out


def check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise GlrsError(f"target density {density} is outside (0, 1]; give the kept fraction of parameters, e.g. 0.5")
    return density


# ---- layer-sequential calibration --------------------------------------------------------------

class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the model passes to it."""

    def __init__(self, layer: nn.Module, index: int, sink: dict, stop_at: int):
        super().__init__()
        self.index, self.sink, self.stop_at = index, sink, stop_at
        if hasattr(layer, "attention_type"):  # Qwen2/Mistral-style models pick the mask by layer type
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise GlrsError("the decoder layer was called with positional arguments besides hidden_states; "
                            "this transformers version is not supported by glrs.methods.sequential_layers")
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        if self.index == self.stop_at:
            raise _Stop
        return hidden_states


def _move(module: nn.Module | None, device) -> None:
    if module is not None:
        module.to(device)


def _capture(model, calib_ids: torch.Tensor, device: str, batch_size: int):
    """Layer-0 inputs for all samples, and the per-layer kwargs for a batch of one sample.

    The kwargs (rotary position embeddings, causal mask, position ids) are
    captured once with batch size 1: every calibration sample has the same
    length and no padding, and their leading dimension 1 broadcasts over any
    batch. Each layer gets the kwargs the model passes to *it*, so models that
    mix sliding-window and full attention layers are handled.
    """
    inner = model.model
    layers = decoder_layers(model)
    originals = list(layers)
    nsamples, seqlen = calib_ids.shape
    sink: dict = {}
    hidden_size = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    emb_device = inner.embed_tokens.weight.device
    _move(inner.embed_tokens, device)
    # every rotary table: Gemma 3 under transformers 4.x has rotary_emb and rotary_emb_local (sliding layers)
    rotary = [m for name, m in inner.named_children() if name.startswith("rotary_emb")]
    for m in rotary:
        _move(m, device)
    try:
        # pass 1: kwargs of every layer (catchers pass hidden states through, the last one stops)
        inner.layers = nn.ModuleList(_Catcher(l, i, sink, len(originals) - 1) for i, l in enumerate(originals))
        with torch.no_grad():
            try:
                inner(input_ids=calib_ids[:1].to(device), use_cache=False)
            except _Stop:
                pass
        kwargs = [sink["kwargs"][i] for i in range(len(originals))]
        # pass 2: layer-0 inputs of all samples (the first catcher stops)
        inner.layers = nn.ModuleList([_Catcher(originals[0], 0, sink, 0)])
        hidden = torch.empty(nsamples, seqlen, hidden_size, dtype=dtype, device=device)
        with torch.no_grad():
            for s in range(0, nsamples, batch_size):
                try:
                    inner(input_ids=calib_ids[s:s + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
                hidden[s:s + batch_size] = sink["hidden"]
    finally:
        inner.layers = nn.ModuleList(originals)
        _move(inner.embed_tokens, emb_device)
        for m in rotary:
            _move(m, emb_device)
    for kw in kwargs:
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kw.pop("cache", None)
        kw["use_cache"] = False
    return hidden, kwargs


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_layer(layer, inps, outs, kw, batch_size, hooks: dict[str, nn.Linear] | None = None,
               moments: str = "full") -> dict[str, LayerStats]:
    """outs <- layer(inps); with hooks, accumulate LayerStats of the named linears' inputs.

    Linears that receive the very same input tensor (q, k, v; gate, up) share
    one LayerStats object: it is computed once. moments="diag" accumulates
    only diag(H) (LayerStats.H is None): n instead of n^2 work per token.
    """
    full = moments == "full"
    acc: dict[str, list] = {}
    last = {"x": None, "acc": None}
    handles = []

    def make_hook(short):
        def hook(module, args):
            x = args[0]
            if x is last["x"]:
                acc[short] = last["acc"]
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if short not in acc:
                n = x2.shape[1]
                acc[short] = [torch.zeros(n, n, dtype=torch.float64, device=x2.device) if full else
                              torch.zeros(n, dtype=torch.float64, device=x2.device),
                              torch.zeros(n, dtype=torch.float64, device=x2.device), 0]
            a = acc[short]
            if full:
                a[0].addmm_(x2.T, x2)
            else:
                a[0].add_((x2 * x2).sum(0))
            a[1].add_(x2.abs().sum(0))
            a[2] += x2.shape[0]
            last["x"], last["acc"] = x, a
        return hook

    for short, mod in (hooks or {}).items():
        handles.append(mod.register_forward_pre_hook(make_hook(short)))
    try:
        with torch.no_grad():
            for s in range(0, inps.shape[0], batch_size):
                outs[s:s + batch_size] = _layer_out(layer(inps[s:s + batch_size], **kw))
                last["x"] = last["acc"] = None
    finally:
        for h in handles:
            h.remove()
    stats, made = {}, {}
    for short, a in acc.items():
        key = id(a)
        if key not in made:
            if full:
                made[key] = LayerStats(a[0], a[1] / max(a[2], 1), a[2])
            else:
                made[key] = LayerStats(None, a[1] / max(a[2], 1), a[2], diag=a[0])
        stats[short] = made[key]
    return stats


def sequential_layers(model, calib_ids: torch.Tensor, device: str, compress_layer: CompressLayer, *,
                      groups: Iterable[Iterable[str]] | None = None, propagate: str = "compressed",
                      batch_size: int = 4, moments: str = "full", skip: set[int] | None = None,
                      compute_dtype: torch.dtype | None = None) -> None:
    """Layer-sequential calibration and compression, in place.

    For each decoder layer i, for each group of targets (default: one group
    with all seven, as the Wanda and SparseGPT reference code do; pass
    `groups=TRUE_SEQUENTIAL_GROUPS` to compress q/k/v, then o, then gate/up,
    then down, each with statistics taken after the previous groups were
    compressed): run the layer on the current hidden states with hooks on the
    group's linears, call `compress_layer(i, layer, stats)` and write the
    returned weights (any subset of shorts) into the layer. Then the layer's
    outputs are recomputed with the compressed weights and feed layer i+1.

    `propagate="dense"` feeds layer i+1 the outputs of the *dense* layer i
    instead (statistics of the dense model, as SVD-LLM and ASVD collect them);
    it needs a single group. `moments="diag"` collects only diag(H) (the
    column norms Wanda and OATS need; LayerStats.H is then None), which saves
    the n x n accumulation. Layers are moved to `device` one at a time and
    back to where they were. Statistics are on `device`. Layers in `skip` only
    pass their (dense) outputs on: no statistics, no compress_layer call (a
    resumed statistics job). `compute_dtype`: each layer runs in that dtype while
    it is on `device` and goes back in its own (a model kept in bfloat16 in
    memory, computed in float32 one layer at a time).
    """
    if moments not in ("full", "diag"):
        raise ValueError(f"moments must be 'full' or 'diag', not {moments!r}")
    if propagate not in ("compressed", "dense"):
        raise ValueError(f"propagate must be 'compressed' or 'dense', not {propagate!r}")
    groups = [list(g) for g in (groups or [SHORTS])]
    if propagate == "dense" and len(groups) != 1:
        raise ValueError("propagate='dense' needs a single group of targets")
    if calib_ids.dim() != 2:
        raise GlrsError(f"calibration ids must be [nsamples, seqlen], got shape {tuple(calib_ids.shape)}")
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    try:
        inps, kwargs = _capture(model, calib_ids, device, batch_size)
        outs = torch.empty_like(inps)
        for i, layer in enumerate(decoder_layers(model)):
            first = next(layer.parameters())
            home = (first.device,) if compute_dtype is None else (first.device, first.dtype)
            layer.to(device, *(() if compute_dtype is None else (compute_dtype,)))
            if skip and i in skip:
                _run_layer(layer, inps, outs, kwargs[i], batch_size)
                layer.to(*home)
                inps, outs = outs, inps
                continue
            mods = target_modules(layer)
            changed_after_pass = False
            for group in groups:
                stats = _run_layer(layer, inps, outs, kwargs[i], batch_size, {s: mods[s] for s in group}, moments)
                changed_after_pass = False
                new = compress_layer(i, layer, stats) or {}
                for short, w in new.items():
                    if short not in mods:
                        raise KeyError(f"compress_layer returned unknown target {short!r}; known: {SHORTS}")
                    target = mods[short].weight
                    if tuple(w.shape) != tuple(target.shape):
                        raise ValueError(f"layer {i} {short}: new weight has shape {tuple(w.shape)}, expected {tuple(target.shape)}")
                    with torch.no_grad():
                        target.copy_(w.to(target.device, target.dtype))
                    changed_after_pass = True
                del stats
            if changed_after_pass and propagate == "compressed":
                _run_layer(layer, inps, outs, kwargs[i], batch_size)
            layer.to(*home)
            inps, outs = outs, inps
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


def collect_stats(model, calib_ids: torch.Tensor, device: str, *, batch_size: int = 4,
                  stats_device: str = "cpu") -> dict[str, LayerStats]:
    """HF weight name -> LayerStats of the DENSE model (no compression), moved to `stats_device`.

    Targets that share an input (q/k/v, gate/up) share one LayerStats object.
    """
    out: dict[str, LayerStats] = {}

    def record(i, layer, stats):
        moved = {}
        for short, st in stats.items():
            if id(st) not in moved:
                moved[id(st)] = st.to(stats_device)
            out[weight_name(i, short)] = moved[id(st)]
        return {}

    sequential_layers(model, calib_ids, device, record, propagate="dense", batch_size=batch_size)
    return out


# ---- budgets and masks ---------------------------------------------------------------------------

def exact_count(density: float, numel: int) -> int:
    """Kept entries of one matrix: round(density * numel), at least 0, at most numel."""
    return max(0, min(numel, int(round(density * numel))))


def split_count(total: int, sizes: list[int]) -> list[int]:
    """Split `total` kept entries over consecutive parts of the given sizes in proportion,
    with cumulative rounding so the parts add up to `total` exactly."""
    whole = sum(sizes)
    out, cum, prev = [], 0, 0
    for s in sizes:
        cum += s
        nxt = int(round(total * cum / whole)) if whole else 0
        out.append(nxt - prev)
        prev = nxt
    return out


def capped_split(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Integers in proportion to `weights`, each at most its cap, adding up to min(total, sum caps):
    what a capped part cannot take goes to the others in proportion to their weights. Integer
    weights are split exactly by split_count (cumulative rounding in the given order); real ones
    are first put on an integer grid fine enough that its rounding is far below one unit."""
    total = min(int(total), sum(int(c) for c in caps))
    out: dict[int, int] = {}
    free = dict(enumerate(weights))
    left = total
    while free:
        mass = sum(free.values())
        scale = left / mass if mass > 0 else 0.0
        over = [i for i, w in free.items() if w * scale >= caps[i]]
        if not over:
            break
        for i in over:
            out[i] = int(caps[i])
            left -= int(caps[i])
            del free[i]
    idx = sorted(free)
    sizes = [free[i] for i in idx]
    if not all(isinstance(w, int) for w in sizes):
        grid = 2**40 / max(sum(sizes), 1e-300)
        sizes = [max(1, int(w * grid)) for w in sizes]
    for i, part in zip(idx, split_count(left, sizes)):  # adds up to `left` exactly
        out[i] = min(int(caps[i]), part)
    return [out[i] for i in range(len(caps))]


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` highest scores of the whole tensor (ties broken by index)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        idx = torch.topk(flat, keep, sorted=False).indices
        mask[idx] = True
    return mask.reshape(scores.shape)


def row_topk_mask(scores: torch.Tensor, keep_total: int) -> torch.Tensor:
    """Per-output-row comparison groups with an exact total: each row keeps floor(keep_total / m) or one more
    of its highest scores (ties to the lower column index); the rows that keep one more are those whose
    next-best score is highest. When keep_total is a multiple of m this is exactly per-row top-k. By a
    partial selection (topk), not a full sort of every row: several times faster, the same mask (a test
    holds it equal to the sort, ties included)."""
    m, n = scores.shape
    base, extra = divmod(int(keep_total), m) if m else (0, 0)
    if base >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if base > 0:
        thr = torch.topk(scores, base, dim=1, sorted=False).values.amin(1, keepdim=True)  # base-th largest
        mask = scores >= thr
        over = (mask.sum(1) > base).nonzero().squeeze(1)
        if over.numel():  # ties at the threshold: the lowest columns first
            sc, th = scores[over], thr[over]
            tie = sc == th
            need = base - (sc > th).sum(1, keepdim=True)
            mask[over] = (sc > th) | (tie & (torch.cumsum(tie, 1) <= need))
    else:
        mask = torch.zeros_like(scores, dtype=torch.bool)
    if extra > 0:
        rest = scores.masked_fill(mask, -float("inf"))
        cand, col = rest.max(1)  # first maximal column: what a stable descending sort puts at `base`
        rows = torch.argsort(cand, descending=True, stable=True)[:extra]
        mask[rows, col[rows]] = True
    return mask


def parse_nm(nm) -> tuple[int, int] | None:
    if nm is None or nm in ("", "null", "none", "None"):
        return None
    try:
        n_str, m_str = str(nm).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError as e:
        raise GlrsError(f"nm must look like '2:4' (keep N of every M consecutive inputs) or null, not {nm!r}") from e
    if not 0 < n < m:
        raise GlrsError(f"nm {nm!r}: need 0 < N < M")
    return n, m


def check_nm_density(nm: tuple[int, int], density: float) -> None:
    n, m = nm
    if abs(density - n / m) > 1e-9:
        raise GlrsError(f"N:M sparsity {n}:{m} keeps exactly {n}/{m} = {n / m:g} of the weights, but the target "
                        f"density is {density:g}; set target_density to {n / m:g} or use unstructured sparsity (nm: null)")


def nm_mask(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive inputs (columns) of each row."""
    n, m = nm
    rows, cols = scores.shape
    if cols % m:
        raise GlrsError(f"N:M sparsity {n}:{m} needs the input dimension to be a multiple of {m}; got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


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
