"""The compressed model: factored low-rank + sparse form, its nn.Module, and a dense export.

Factored form (factored.safetensors), per target matrix W (m x n) with r kept
components and k kept sparse entries:
  <name>.U [m, r], <name>.sigma [r], <name>.V [n, r], <name>.S_index [k] (flat, ascending), <name>.S_values [k]
so that W~ = U diag(sigma) V^T + S. `LowRankSparseLinear` computes
y = ((x V) * sigma) U^T + x S^T without forming W~. The dense export is a plain
Hugging Face checkpoint with W~ written in place of W, loadable by
AutoModelForCausalLM.from_pretrained.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import modelio
from .errors import GlrsError

MATERIALIZE_VERSION = 1
FACTORED = "factored.safetensors"
DENSE_DIR = "hf"


class LowRankSparseLinear(nn.Module):
    """y = ((x V) * sigma) U^T + x S^T (+ bias): the cost is r(m+n) + nnz, not m*n."""

    def __init__(self, U, sigma, V, S_index, S_values, shape, bias=None):
        super().__init__()
        m, n = shape
        self.out_features, self.in_features = m, n
        self.U, self.sigma, self.V = nn.Parameter(U), nn.Parameter(sigma), nn.Parameter(V)
        rows, cols = S_index // n, S_index % n
        S = torch.sparse_coo_tensor(torch.stack([rows, cols]), S_values, (m, n), check_invariants=True).coalesce().to_sparse_csr()
        self.register_buffer("S", S)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = ((flat @ self.V) * self.sigma) @ self.U.T
        if self.S._nnz():
            y = y + (self.S @ flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return (self.U * self.sigma) @ self.V.T + self.S.to_dense()


def compose(U, sigma, V, S_index, S_values, shape) -> torch.Tensor:
    """W~ = U diag(sigma) V^T + S as a dense matrix."""
    W = (U * sigma) @ V.T
    W.view(-1).index_add_(0, S_index, S_values.to(W.dtype))
    return W


def _copy_non_weights(model_dir: Path, out: Path) -> None:
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != modelio.MANIFEST:
            shutil.copy2(p, out / p.name)


def write_dense_export(model_dir: Path, replacements: dict[str, torch.Tensor], out: Path) -> None:
    """Rewrite the checkpoint shard by shard, swapping in the compressed matrices."""
    out.mkdir(parents=True, exist_ok=True)
    _copy_non_weights(model_dir, out)
    for shard in sorted({*modelio._weight_map(model_dir).values()}):
        tensors = {}
        with safe_open(str(model_dir / shard), framework="pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
                if name in replacements:
                    tensors[name] = replacements[name].to(tensors[name].dtype).contiguous()
        save_file(tensors, str(out / shard), metadata=metadata or {"format": "pt"})


def save_factored(factors: dict[str, dict[str, torch.Tensor]], out_file: Path, info: dict) -> None:
    flat = {f"{name}.{part}": t.contiguous() for name, parts in factors.items() for part, t in parts.items()}
    save_file(flat, str(out_file), metadata={"glrs": json.dumps(info, sort_keys=True)})


def load_factored(compressed_dir: str | Path, device: str = "cpu"):
    """The compressed model with LowRankSparseLinear modules in place of the targets."""
    from transformers import AutoModelForCausalLM

    compressed_dir = Path(compressed_dir)
    model = AutoModelForCausalLM.from_pretrained(compressed_dir / DENSE_DIR)
    with safe_open(str(compressed_dir / FACTORED), framework="pt") as f:
        info = json.loads(f.metadata()["glrs"])
        for name, shape in info["shapes"].items():
            parts = {p: f.get_tensor(f"{name}.{p}") for p in ("U", "sigma", "V", "S_index", "S_values")}
            module_path = name.removesuffix(".weight")
            old = model.get_submodule(module_path)
            parent_path, child = module_path.rsplit(".", 1)
            setattr(model.get_submodule(parent_path), child, LowRankSparseLinear(**parts, shape=tuple(shape), bias=old.bias))
    return model.to(device).eval()


def factored_parameter_count(factors: dict[str, dict[str, torch.Tensor]]) -> int:
    """Kept parameters: r(m+n) per low-rank part (sigma folded into a factor), 1 per sparse value."""
    total = 0
    for parts in factors.values():
        total += parts["U"].numel() + parts["V"].numel() + parts["S_values"].numel()
    return total


def check_dir(path: Path) -> None:
    if not (path / FACTORED).is_file() or not (path / DENSE_DIR / "config.json").is_file():
        raise GlrsError(f"{path} is not a complete compressed model (factored.safetensors + hf/); rerun glrs materialize")

