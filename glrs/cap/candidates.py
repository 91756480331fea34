"""The candidates of CAP's Bernoulli policies: blocks of Stage-1 components and entries per matrix,
their initial scores, and the two losses of a mask sample: the model whose target weights are composed
from it (`loss: cross-entropy`) and the layer-wise output reconstruction (`loss: reconstruction`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import allocate as _alloc
from ..errors import GlrsError
from ..stage1 import MatrixPool, Stage1
from .loss import calibration_loss
from .policy import MaskSample

SPACES = ("cap", "lowrank-only", "sparse-only")

# ---- candidates of the model: blocks per matrix ------------------------------------------------------

@dataclass
class Block:
    matrix: int  # index into pools
    kind: str    # "rank" | "sparse"
    start: int   # first component / first sorted entry covered
    nvar: int    # Bernoulli variables
    group: int   # candidates per variable
    cost: int    # parameters per variable


def build_blocks(pools: list[MatrixPool], space: str, group: int) -> list[Block]:
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


def block_scores(pools: list[MatrixPool], blocks: list[Block]) -> Callable[[int], torch.Tensor]:
    """Energy kept per parameter of each variable: sigma^2/(m+n), or mean v^2 over its entries."""
    def score(b: int) -> torch.Tensor:
        blk, p = blocks[b], pools[blocks[b].matrix]
        if blk.kind == "rank":
            return (p.sigma[blk.start : blk.start + blk.nvar].double() ** 2 / blk.cost).float()
        v = p.s_abs[blk.start : blk.start + blk.nvar * blk.group].double() ** 2
        return (v.reshape(blk.nvar, blk.group).sum(1) / blk.group).float()
    return score


@torch.no_grad()
def activation_block_scores(model_dir: str, calib_ids: torch.Tensor, pools: list[MatrixPool],
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

    from ..layers import sequential_layers
    from ..modelio import weight_name

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


def _space_capacity(pools: list[MatrixPool], space: str) -> int:
    rank = sum(p.sigma.numel() * p.rank_cost for p in pools)
    sparse = sum(p.s_abs.numel() for p in pools)
    return {"cap": rank + sparse, "lowrank-only": rank, "sparse-only": sparse}[space]


def space_budget(pools: list[MatrixPool], density: float, space: str) -> int:
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
    pool: MatrixPool
    module: torch.nn.Module | None  # None where no model is run (loss: reconstruction)
    factors: dict[str, torch.Tensor]
    rank_block: int | None = None
    sparse_blocks: list[int] = field(default_factory=list)


def matrices(pools, modules, factors, blocks) -> list[_Matrix]:
    """One _Matrix per pool (in pool order), each told which blocks are its rank block and its sparse blocks
    (`modules` None: no model, for the reconstruction loss)."""
    mats = [_Matrix(q, None if modules is None else modules[q.name], factors[q.name]) for q in pools]
    for b, blk in enumerate(blocks):
        if blk.kind == "rank":
            mats[blk.matrix].rank_block = b
        else:
            mats[blk.matrix].sparse_blocks.append(b)
    return mats


def _read_factors(stage1: Stage1, pools: list[MatrixPool], space: str,
                  device: torch.device, offload: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of every pool's Stage-1 factors that `space` composes W~ from, by matrix name, from a
    glrs.stage1.Stage1 (the decompose files, or the weights under stage1 weights)."""
    by_name = {p.name: p for p in pools}
    parts = {"cap": ("U", "sigma", "V", "S_values", "S_index"), "lowrank-only": ("U", "sigma", "V"),
             "sparse-only": ("S_values", "S_index")}[space]
    store = torch.device("cpu") if offload else device
    pin = offload and device.type == "cuda"
    out = {}
    for meta, tensors in stage1.read(parts):
        where = stage1.source(meta["layer"])
        for short, info in meta["matrices"].items():
            pool = by_name.get(info["name"])
            if pool is None:
                continue
            t = {part: tensors[_alloc.layer_file_key(short, part)] for part in parts}
            m, n = pool.shape
            if "S_index" in t:
                if t["S_values"].numel() != pool.s_abs.numel():
                    raise GlrsError(f"{where}: {short}.S_values does not match its pool; rerun the decompose job")
                if m * n < 2**31:
                    t["S_index"] = t["S_index"].to(torch.int32)
            if "U" in t and t["U"].shape[1] != pool.sigma.numel():
                raise GlrsError(f"{where}: {short}.U does not match its pool; rerun the decompose job")
            t = {k: (v.pin_memory() if pin else v.to(store)) for k, v in t.items()}
            out[pool.name] = t
    missing = [p.name for p in pools if p.name not in out]
    if missing:
        raise GlrsError(f"RPCA factors missing for {missing[:3]}...; pass every layer's RPCA file")
    return out


def compose(mat: _Matrix, sample: MaskSample, blocks: list[Block], device: torch.device) -> torch.Tensor:
    """W~ = (U * (m * sigma)) V^T + (n * S) of one matrix for a mask sample, float32 on `device`."""
    m, n = mat.pool.shape
    f = {k: v.to(device, non_blocking=True) for k, v in mat.factors.items()}
    if mat.rank_block is not None:
        keep = sample.mask(mat.rank_block).float()
        W = (f["U"].float() * (f["sigma"].float() * keep)) @ f["V"].float().T
    else:
        W = torch.zeros(m, n, dtype=torch.float32, device=device)
    if mat.sparse_blocks:
        parts = []
        for b in mat.sparse_blocks:
            mk = sample.mask(b).float()
            parts.append(mk.repeat_interleave(blocks[b].group) if blocks[b].group > 1 else mk)
        W.view(-1).index_add_(0, f["S_index"], f["S_values"].float() * torch.cat(parts))
    return W


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
        return compose(mat, self.sample, self.blocks, self.device).to(self.dtype)

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
            return calibration_loss(self.model, ids, self.device)
        finally:
            self.sample = None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _Reconstruction:
    """`loss: reconstruction`, the paper's layer-wise objective as glrs reads it: the mean over the target
    matrices of the share of each matrix's output energy on the calibration inputs that the mask sample
    loses, tr(E H E^T) / tr(W H W^T) with E = W - W~ (glrs.realise.output_error, the realisation's own
    measure). H = X^T X / tokens is the *dense* model's input second moment over the whole calibration
    set (the activations job's files, glrs.stats): ||(W - W~) X^T||_F^2 = tokens * tr(E H E^T), so no
    activation is stored, no model is run, and every sample is scored on all calibration tokens (a
    squared error has no batch noise to average out). [choice] Per matrix and relative: the raw errors
    of SmolLM2's layers differ by orders of magnitude in activation scale, and their sum would let a few
    matrices decide everything. Cost per sample: compose W~ (m n r) and E H (m n^2) per matrix."""

    def __init__(self, mats: list[_Matrix], blocks: list[Block], dense: dict[str, torch.Tensor],
                 H: dict[str, torch.Tensor], device: torch.device):
        from ..realise import output_error

        self._error = output_error
        self.mats, self.blocks, self.device = mats, blocks, device
        self.dense, self.H = dense, H
        self.den = {}
        for mat in mats:
            W, Hm = dense[mat.pool.name].to(device, torch.float64), H[mat.pool.name].to(device, torch.float64)
            self.den[mat.pool.name] = float((W @ Hm * W).sum())

    @torch.no_grad()
    def loss(self, ids: torch.Tensor, sample: MaskSample) -> float:
        """The sample's mean relative output error (`ids` unused: H covers every calibration token)."""
        total = 0.0
        for mat in self.mats:
            name = mat.pool.name
            W_new = compose(mat, sample, self.blocks, self.device)
            H = self.H[name].to(self.device, torch.float64)
            total += self._error(self.dense[name].to(self.device), W_new, H, self.den[name])
        return total / len(self.mats)

    def close(self) -> None:
        pass


def read_reconstruction_targets(model_dir: str, stats_files: list[str], pools: list[MatrixPool],
                                device: torch.device, offload: bool) -> tuple[dict, dict]:
    """The dense weights and input second moments H of every pool's matrix, by name, for `loss:
    reconstruction`: W in the checkpoint's dtype, H in float32 as the stats files store it (one tensor
    for q/k/v and one for gate/up, as there), on `device`, or on the CPU with `offload` (moved per
    matrix when scored)."""
    from .. import modelio, stats

    layers = sorted({q.layer for q in pools})
    if not model_dir or not stats_files:
        raise GlrsError("CAP's loss reconstruction needs the prepared model (--model-dir) and the activations "
                        "job's files (--stats)")
    if len(stats_files) != len(layers):
        raise GlrsError(f"CAP: {len(stats_files)} activation-statistics files for {len(layers)} layers")
    store = torch.device("cpu") if offload else device
    by_layer = {q.layer: [] for q in pools}
    for q in pools:
        by_layer[q.layer].append(q)
    dense, H = {}, {}
    for layer, path in zip(layers, stats_files):
        weights, moments, moved = modelio.read_layer(model_dir, layer), stats.read_layer(path), {}
        for q in by_layer[layer]:
            W = weights[q.short]
            if tuple(W.shape) != tuple(q.shape):
                raise GlrsError(f"{q.name}: the prepared model's shape {tuple(W.shape)} is not Stage 1's {q.shape}; "
                                "rerun prepare_model and decompose")
            h = moments[q.short]
            if h.shape != (q.shape[1], q.shape[1]):
                raise GlrsError(f"{path}: H of {q.short} is {tuple(h.shape)}, not {q.shape[1]} square; delete the "
                                "activations job's files and rerun it")
            if id(h) not in moved:
                moved[id(h)] = h.to(store, torch.float32)  # what the stats file stores
            dense[q.name], H[q.name] = W.to(store), moved[id(h)]
    return dense, H


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


