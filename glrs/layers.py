"""Running a Llama-style model's decoder layers one at a time on captured inputs.

* `decoder_layers`, `target_modules`, `target_shapes`: the model's structure (its decoder layers, the
  seven target linears of a layer, the shape of every target matrix by HF weight name).
* `LayerStats`: second-order and mean-magnitude statistics of the input of one
  target linear over all calibration tokens.
* `sequential_layers`: layer-sequential calibration as in the SparseGPT and
  Wanda reference code: the calibration batch goes through the embeddings once;
  then decoder layer i is run on the current hidden states with forward hooks
  on its target linears, the caller compresses it, and the outputs of the
  *compressed* layer i are the inputs of layer i+1. Only one layer's
  activations (two buffers of [nsamples, seqlen, hidden]) are held.
* `collect_stats`: the same pass without compression, statistics of the dense
  model for every target matrix (for methods that allocate globally).

Shared by everything that calibrates on activations: the layer statistics (glrs.stats), CAP's
candidates (glrs.cap.candidates), the realisation (glrs.realise) and the baseline methods
(glrs.methods); none of it is specific to a baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import GlrsError
from .modelio import TARGETS, weight_name

SHORTS = tuple(TARGETS)
# Groups of targets whose inputs are produced one after the other inside a decoder
# layer ("true sequential" order of the SparseGPT reference code).
TRUE_SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


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
                            "this transformers version is not supported by glrs.layers.sequential_layers")
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
