"""The compressed model glrs ships: a compact low-rank + sparse checkpoint that loads as itself.

A compressed model directory (docs/format.md has the whole contract):

  config.json, tokenizer files, generation_config.json   copied from the prepared model
  glrs_format.json           format name and version, dtype, every target's shape, rank, nnz, support, file
  rest.safetensors           every tensor that is not a target matrix (embeddings, norms, biases), dense
  layer-00000.safetensors …  one file per decoder layer with its target matrices, each as
      <name>.U [m, r], <name>.V [n, r]   the low rank, sqrt(sigma) folded into both (the paper's U', V')
      <name>.values [k]                  the kept sparse values, row by row, in the model's dtype
      and the sparse support, whichever is smaller for that matrix:
      <name>.bitmask [m, ceil(n/8)] uint8   one bit a weight (bit j of byte b is column 8b + j), or
      <name>.row_offsets [m+1] int32 + <name>.cols [k] int16 (int32 when n > 32767)
      or, when the compact form would not be smaller, the dense matrix <name> itself.
  hf/                        a dense Hugging Face export, only when asked (`export: dense`)

Why: the previous layout (format 0: a factored file with int64 flat indices and float U, sigma, V, plus an
always-written dense export) was twice the original model on disk and could only be loaded through the
dense export. Here the kept values stay in the model's dtype and the support costs 1 bit a weight or
2 bytes a value. `load` builds the model with `LowRankSparseLinear` modules straight from these files;
no dense target matrix is formed, and files are read with plain reads (no mmap), so the host memory
while loading is what the tensors need.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from . import cas, modelio
from .errors import GlrsError

MATERIALISE_VERSION = 2  # 2: the compact format (glrs_format.json, per-layer files); 1: factored + dense export
FORMAT = "glrs-lowrank-sparse"
FORMAT_VERSION = 1  # bump when the layout changes; `load` reads every version up to its own
FORMAT_FILE = "glrs_format.json"
REST_FILE = "rest.safetensors"
DENSE_DIR = "hf"
EXPORTS = ("none", "dense")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "I8": torch.int8,
           "BOOL": torch.bool}


def layer_file(layer: int) -> str:
    return f"layer-{layer:05d}.safetensors"


# ---- the sparse support --------------------------------------------------------------------------

def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """[m, n] bool -> [m, ceil(n/8)] uint8, bit j of byte b = column 8b + j (compressed-tensors' order)."""
    m, n = mask.shape
    padded = torch.zeros(m, -(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :n] = mask
    weights = (1 << torch.arange(8, dtype=torch.int32, device=mask.device)).to(torch.uint8)
    return (padded.view(m, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # byte value -> its 8 bits, low first


def unpack_bitmask(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_bitmask: [m, ceil(n/8)] uint8 -> [m, n] bool. A table lookup (index_select): on the
    CPU ~70x faster than shifting every byte 8 times (0.7 against 52 ms for 1536 x 576)."""
    table = _BITS.to(bits.device)
    return table.index_select(0, bits.reshape(-1).int()).view(bits.shape[0], -1)[:, :n]


def is_2to4(mask: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of every row keeps at most 2: what NVIDIA's semi-structured
    sparsity runs (a pruned weight that happens to be 0 leaves its group with fewer)."""
    m, n = mask.shape
    return n % 4 == 0 and bool((mask.reshape(m, n // 4, 4).sum(-1) <= 2).all())


def _col_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= torch.iinfo(torch.int16).max + 1 else torch.int32


def support_bytes(shape: tuple[int, int], nnz: int) -> dict[str, int]:
    """Bytes each support encoding takes for `nnz` kept entries of an m x n matrix."""
    m, n = shape
    return {"bitmask": m * -(-n // 8), "cols": nnz * _col_dtype(n).itemsize + 4 * (m + 1)}


# ---- writing -------------------------------------------------------------------------------------

def encode(parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> tuple[dict, dict]:
    """(tensors without the name prefix, record) of one target in the compact layout.

    `parts`: U [m, r], sigma [r], V [n, r], S_index [k] int64 flat ascending, S_values [k] (the in-memory
    factored form every method and the realisation hand over). The record says how it is stored."""
    m, n = shape
    r, k = int(parts["sigma"].numel()), int(parts["S_index"].numel())
    esize = torch.empty(0, dtype=dtype).element_size()
    sup = support_bytes(shape, k)
    support = min(sup, key=sup.get) if k else "none"
    compact = esize * (r * (m + n) + k) + (sup[support] if k else 0)
    record = {"shape": [m, n], "rank": r, "nnz": k, "params": r * (m + n) + k}
    if compact >= esize * m * n:
        return {"": compose(**parts, shape=shape).to(dtype).contiguous()}, record | {"support": "dense", "bytes": esize * m * n}
    root = parts["sigma"].to(torch.float64).clamp_min(0).sqrt()
    out = {"U": (parts["U"].to(torch.float64) * root).to(dtype), "V": (parts["V"].to(torch.float64) * root).to(dtype),
           "values": parts["S_values"].to(dtype)}
    if k:
        sup_tensors, pattern = encode_support(parts["S_index"], shape, support)
        out |= sup_tensors
        record["pattern"] = pattern
    return {k_: v.contiguous() for k_, v in out.items()}, record | {"support": support, "bytes": compact}


def encode_support(index: torch.Tensor, shape: tuple[int, int], support: str | None = None) -> tuple[dict, str]:
    """({"bitmask"} or {"row_offsets", "cols"}, pattern) for flat ascending indices of an m x n matrix; the
    smaller encoding unless `support` names one. The one encoding of a sparse support: the compact model and
    the realisation's layer files (glrs.realise) share it."""
    m, n = shape
    idx = index.to(torch.int64).cpu()
    if support is None:
        sup = support_bytes(shape, int(idx.numel()))
        support = min(sup, key=sup.get)
    if support == "bitmask":
        mask = torch.zeros(m * n, dtype=torch.bool)
        mask[idx] = True
        mask = mask.view(m, n)
        return {"bitmask": pack_bitmask(mask)}, "2:4" if is_2to4(mask) else "unstructured"
    rows = idx // n
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(rows, minlength=m).cumsum(0)]).to(torch.int32)
    return {"row_offsets": offsets, "cols": (idx % n).to(_col_dtype(n))}, "unstructured"


def decode_support(tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of encode_support: the flat ascending int64 indices (row-major, as the factored form holds them)."""
    m, n = shape
    if "bitmask" in tensors:
        return torch.nonzero(unpack_bitmask(tensors["bitmask"], n).reshape(-1)).squeeze(1)
    offsets = tensors["row_offsets"].to(torch.int64)
    cols = tensors["cols"].to(torch.int64)
    if tensors["cols"].dtype == torch.int16:
        cols = cols & 0xFFFF  # n = 32768 wraps in int16
    rows = torch.repeat_interleave(torch.arange(m, dtype=torch.int64), offsets[1:] - offsets[:-1])
    return rows * n + cols


def parts_from_dense(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """The factored form of a plain (pruned) matrix: rank 0, its nonzeros as the sparse part."""
    m, n = W.shape
    flat = W.reshape(-1)
    idx = torch.nonzero(flat).squeeze(1)
    return {"U": W.new_zeros(m, 0), "sigma": W.new_zeros(0), "V": W.new_zeros(n, 0), "S_index": idx, "S_values": flat[idx]}


def write_layer(out_dir: Path, layer: int, factors: dict[str, dict[str, torch.Tensor]], shapes: dict[str, list[int]],
                dtype: torch.dtype) -> dict[str, dict]:
    """Encode one decoder layer's targets into layer-NNNNN.safetensors; returns name -> record."""
    tensors, records = {}, {}
    for name in sorted(factors):
        enc, rec = encode(factors[name], tuple(shapes[name]), dtype)
        tensors |= {(f"{name}.{part}" if part else name): t for part, t in enc.items()}
        records[name] = rec | {"file": layer_file(layer)}
    save_file(tensors, str(out_dir / layer_file(layer)), metadata={"format": "pt"})
    return records


def write_rest(out_dir: Path, model_dir: Path, targets: set[str]) -> torch.dtype:
    """Copy the prepared model's config, tokenizer and every non-target tensor; returns the targets' dtype."""
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (modelio.MANIFEST, "model.safetensors.index.json"):
            shutil.copy2(p, out_dir / p.name)
    wmap = modelio._weight_map(model_dir)
    missing = sorted(targets - set(wmap))
    if missing:
        raise GlrsError(f"{model_dir} has no tensor {missing[0]} (and {len(missing) - 1} more targets); "
                        "the compressed weights were made for another model")
    rest, dtype = {}, None
    for shard in sorted(set(wmap.values())):
        tensors = read_tensors(model_dir / shard)
        for name, t in tensors.items():
            if name in targets:
                dtype = dtype or t.dtype
            else:
                rest[name] = t
    save_file(rest, str(out_dir / REST_FILE), metadata={"format": "pt"})
    return dtype


def write_format(out_dir: Path, dtype: torch.dtype, num_layers: int, targets: dict[str, dict]) -> dict:
    header = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": str(dtype).removeprefix("torch."),
              "num_layers": num_layers, "targets": targets}
    cas.write_json_atomic(out_dir / FORMAT_FILE, header)
    return header


def write_model(out_dir: Path, model_dir: str | Path, layers) -> dict:
    """The compact checkpoint from `layers`: an iterable of (layer, name -> parts, name -> shape), consumed
    one layer at a time so that only one layer's factors are in memory (the 8B path streams)."""
    model_dir = Path(model_dir)
    manifest = modelio.read_manifest(model_dir)
    all_targets = {modelio.weight_name(i, s) for i in range(manifest["num_layers"]) for s in modelio.TARGETS}
    dtype = write_rest(out_dir, model_dir, all_targets)
    records = {}
    for layer, factors, shapes in layers:
        records |= write_layer(out_dir, layer, factors, shapes, dtype)
    uncompressed = sorted(all_targets - set(records))
    if uncompressed:  # layers left dense (config `layers`): their targets go into rest as they are
        wmap = modelio._weight_map(model_dir)
        rest = read_tensors(out_dir / REST_FILE)
        for name in uncompressed:
            rest[name] = read_tensors(model_dir / wmap[name], [name])[name]
        save_file(rest, str(out_dir / REST_FILE), metadata={"format": "pt"})
    return write_format(out_dir, dtype, manifest["num_layers"], records)


# ---- reading -------------------------------------------------------------------------------------

def read_tensors(path: Path, names=None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file by plain reads into their own storage (no mmap: a mapped file's pages
    would count twice in the host memory while loading). A truncated or damaged file is a GlrsError
    naming the file."""
    path = Path(path)
    fix = "the file is damaged or truncated; copy it again, or rerun the step that wrote it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > size - 8:
                raise ValueError(f"header length {hlen} exceeds the file size {size}")
            header = json.loads(f.read(hlen))
            header.pop("__metadata__", None)
            base, out = 8 + hlen, {}
            for name, spec in header.items():
                if names is not None and name not in names:
                    continue
                start, end = spec["data_offsets"]
                if base + end > size:
                    raise ValueError(f"tensor {name} ends at byte {base + end}, past the end of the file ({size})")
                buf = torch.empty(end - start, dtype=torch.uint8)
                f.seek(base + start)
                if end > start and f.readinto(memoryview(buf.numpy())) != end - start:
                    raise ValueError(f"short read of tensor {name}")
                out[name] = buf.view(_DTYPES[spec["dtype"]]).reshape(spec["shape"])
    except (OSError, ValueError, KeyError, struct.error, json.JSONDecodeError) as e:
        raise GlrsError(f"cannot read {path}: {e}; {fix}") from e
    return out


def read_format(path: str | Path) -> dict:
    file = Path(path) / FORMAT_FILE
    if not file.is_file():
        old = (Path(path) / "factored.safetensors").is_file()
        raise GlrsError(f"{path} is not a glrs compressed model (no {FORMAT_FILE})"
                        + ("; it was written by glrs before the compact format: rerun its materialise job" if old else ""))
    header = json.loads(file.read_text())
    if header.get("format") != FORMAT:
        raise GlrsError(f"{file}: format {header.get('format')!r}, expected {FORMAT!r}")
    if int(header.get("version", 0)) > FORMAT_VERSION:
        raise GlrsError(f"{path} was written in format version {header['version']}, newer than this glrs reads "
                        f"({FORMAT_VERSION}); upgrade glrs")
    return header


def check_dir(path: Path) -> None:
    header = read_format(path)
    for f in {REST_FILE, *(t["file"] for t in header["targets"].values())}:
        if not (Path(path) / f).is_file():
            raise GlrsError(f"{path} is not a complete compressed model: {f} is missing; rerun glrs materialise")


def is_compressed(path: str | Path) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


# ---- the module ----------------------------------------------------------------------------------

class LowRankSparseLinear(nn.Module):
    """y = (x V) U^T + x S^T (+ bias) with S held compactly (values + bitmask or row offsets + columns).

    The forward expands S into a dense matrix for one product at a time (a transient m x n), so the
    weights held stay compact; `to_semi_structured()` swaps a 2:4 sparse part for PyTorch's
    semi-structured tensor (cuSPARSELt on CUDA, fp16/bf16) that the sparse tensor cores run."""

    def __init__(self, shape, U, V, values, bitmask=None, row_offsets=None, cols=None, bias=None):
        super().__init__()
        self.out_features, self.in_features = shape
        self.U, self.V = nn.Parameter(U, requires_grad=False), nn.Parameter(V, requires_grad=False)
        self.values = nn.Parameter(values, requires_grad=False)
        for name, t in (("bitmask", bitmask), ("row_offsets", row_offsets), ("cols", cols)):
            self.register_buffer(name, t)
        self.bias = bias
        self.semi_structured = None

    @classmethod
    def from_tensors(cls, shape, tensors: dict[str, torch.Tensor], bias=None) -> "LowRankSparseLinear":
        return cls(shape, tensors["U"], tensors["V"], tensors["values"], tensors.get("bitmask"),
                   tensors.get("row_offsets"), tensors.get("cols"), bias)

    def support_mask(self) -> torch.Tensor:
        m, n = self.out_features, self.in_features
        if self.bitmask is not None:
            return unpack_bitmask(self.bitmask, n)
        mask = torch.zeros(m, n, dtype=torch.bool, device=self.values.device)
        if self.cols is not None:
            mask[self._rows(), self.cols.to(torch.int64) & 0xFFFF if self.cols.dtype == torch.int16 else self.cols.to(torch.int64)] = True
        return mask

    def _rows(self) -> torch.Tensor:
        counts = self.row_offsets[1:].to(torch.int64) - self.row_offsets[:-1].to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)

    def sparse_weight(self, dtype=None) -> torch.Tensor:
        """S as a dense m x n matrix."""
        dtype = dtype or self.values.dtype
        S = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.values.device)
        if self.values.numel():
            S.masked_scatter_(self.support_mask(), self.values.to(dtype))  # row-major order = the stored order
        return S

    def dense_weight(self, dtype=None) -> torch.Tensor:
        dtype = dtype or self.values.dtype
        return self.sparse_weight(dtype) + self.U.to(dtype) @ self.V.to(dtype).T

    def to_semi_structured(self) -> "LowRankSparseLinear":
        """Hold the sparse part as a 2:4 semi-structured tensor (needs CUDA, fp16/bf16, a 2:4 support)."""
        from torch.sparse import to_sparse_semi_structured

        from torch.sparse import SparseSemiStructuredTensor

        mask = self.support_mask()
        if not is_2to4(mask):
            raise GlrsError("to_semi_structured needs a sparse part in the 2:4 pattern; this matrix's support is not")
        # cuSPARSELt writes y = x S^T row-major. Alone it is slower (benchmarks/semi_structured_probe.py: 0.51 against
        # 0.29 ms, 14336 x 4096, 2048 tokens, H100), but without it every output is a transposed view that the
        # model then copies: the 8B-shaped model's prefill took 185 ms instead of 87 ms (1 x 2048, H100, bf16).
        SparseSemiStructuredTensor._FUSE_TRANSPOSE = True
        self.semi_structured = to_sparse_semi_structured(self.sparse_weight())
        self.values = nn.Parameter(self.values.new_zeros(0), requires_grad=False)
        self.bitmask = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        W = self.semi_structured if self.semi_structured is not None else self.sparse_weight(x.dtype)
        y = F.linear(flat, W)
        if self.U.shape[1]:  # the low rank added in the product's epilogue (one pass over y, not three)
            y = y.addmm_(flat @ self.V.to(x.dtype), self.U.to(x.dtype).T)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


# ---- loading -------------------------------------------------------------------------------------

class _EmptyOnMeta(torch.overrides.TorchFunctionMode):
    """torch.empty without a device goes to the meta device: the storage of nn.Linear / nn.Embedding
    weights is never allocated (buffers computed by arange, tensor, ... stay real)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextmanager
def _params_on_meta():
    """Build modules with their parameters on the meta device (no storage, not even for a moment, so the
    host memory while loading is what the compact tensors need), buffers as usual (rotary tables and
    embedding scales are computed at construction and kept)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        with _EmptyOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = t
    else:
        raise GlrsError(f"the compressed model holds {name}, which its config's model has no place for")


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None, semi_structured: bool = False):
    """The compressed model, built from its compact files alone: `LowRankSparseLinear` in place of every
    compressed target, never a dense target matrix; `dtype` casts floating weights (default: as stored).
    `semi_structured`: hold 2:4 sparse parts on the sparse tensor cores (CUDA, fp16/bf16)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    header = read_format(path)
    check_dir(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config = AutoConfig.from_pretrained(path)
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(torch, header["dtype"]))

    def cast(t):
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    for name, t in read_tensors(path / REST_FILE).items():
        _set_tensor(model, name, cast(t))
    by_file: dict[str, list[str]] = {}
    for name, rec in header["targets"].items():
        by_file.setdefault(rec["file"], []).append(name)
    for file in sorted(by_file):
        tensors = read_tensors(path / file)
        for name in by_file[file]:
            rec, module_path = header["targets"][name], name.removesuffix(".weight")
            if rec["support"] == "dense":
                _set_tensor(model, name, cast(tensors[name]))
                continue
            parts = {k.removeprefix(name + "."): cast(v) for k, v in tensors.items() if k.startswith(name + ".")}
            parent_path, child = module_path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            bias = getattr(parent, child).bias
            setattr(parent, child, LowRankSparseLinear.from_tensors(tuple(rec["shape"]), parts, bias))
    model.tie_weights()  # tied heads (SmolLM2, Gemma) are stored once, as the embedding
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise GlrsError(f"{path}: no weights for {left[:3]} ({len(left)} in all); the directory is incomplete — "
                        "rerun its materialise job")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model = model.to(device).eval()
    if semi_structured:
        use_semi_structured(model)
    return model


def compose(U, sigma, V, S_index, S_values, shape) -> torch.Tensor:
    """W~ = U diag(sigma) V^T + S as a dense matrix (from the in-memory factored form)."""
    W = (U * sigma) @ V.T
    W.view(-1).index_add_(0, S_index, S_values.to(W.dtype))
    return W


def write_dense_export(compressed_dir: Path, out: Path) -> None:
    """A plain Hugging Face checkpoint of the compressed model (W~ in place of each target), for tools
    that only read that; built from the compact files, one layer file at a time."""
    header = read_format(compressed_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in compressed_dir.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in (FORMAT_FILE, "info.json", "conditions.json"):
            shutil.copy2(p, out / p.name)
    tensors = read_tensors(compressed_dir / REST_FILE)
    files = sorted({t["file"] for t in header["targets"].values()})
    for file in files:
        stored = read_tensors(compressed_dir / file)
        for name, rec in header["targets"].items():
            if rec["file"] != file:
                continue
            if rec["support"] == "dense":
                tensors[name] = stored[name]
            else:
                parts = {k.removeprefix(name + "."): v for k, v in stored.items() if k.startswith(name + ".")}
                mod = LowRankSparseLinear.from_tensors(tuple(rec["shape"]), parts)
                tensors[name] = mod.dense_weight(torch.float64).to(parts["values"].dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def factored_parameter_count(factors: dict[str, dict[str, torch.Tensor]]) -> int:
    """Kept parameters: r(m+n) per low-rank part (sigma folded into the factors), 1 per sparse value."""
    return sum(p["U"].numel() + p["V"].numel() + p["S_values"].numel() for p in factors.values())


def directory_bytes(path: str | Path) -> dict[str, int]:
    """What a user ships, in bytes: the target matrices as stored, and the whole directory (without hf/)."""
    path = Path(path)
    header = read_format(path)
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name not in ("info.json", "conditions.json"))
    return {"targets": sum(t["bytes"] for t in header["targets"].values()), "directory": total}
